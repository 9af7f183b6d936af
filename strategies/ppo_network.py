"""The PPO agent's feature extractor: the newest rows of the state window, not all of it.

The state is ``[window, dim]``, flattened for SB3's MLP. The market features already
summarise history (returns over several horizons, realised volatility over windows), so
the older rows mostly add inputs whose noise a small agent learns to chase. Reading the
last ``frames`` rows keeps the observation schema (and the engine) unchanged while the
network sees ``frames · dim`` numbers.
"""

from __future__ import annotations

import gymnasium as gym
import torch
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor


class RecentFramesExtractor(BaseFeaturesExtractor):
    """Flattened ``[window, dim]`` observation → its last ``frames`` rows, flattened (oldest first)."""

    def __init__(self, observation_space: gym.spaces.Box, dim: int, frames: int = 1) -> None:
        size = int(observation_space.shape[-1]) if len(observation_space.shape) == 1 else None
        if size is None or dim <= 0 or size % dim:
            shape = observation_space.shape
            raise ValueError(f"observation of shape {shape} is not a flattened [window, {dim}]")
        window = size // dim
        if not 1 <= frames <= window:
            raise ValueError(f"frames must be in [1, {window}], got {frames}")
        super().__init__(observation_space, features_dim=frames * dim)
        self.start = size - frames * dim

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return observations[:, self.start :]
