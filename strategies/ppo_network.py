"""The PPO agent's network parts: what it reads of the state, and how it explores.

The state is ``[window, dim]``, flattened for SB3's MLP. The market features already
summarise history (returns over several horizons, realised volatility over windows), so
the older rows mostly add inputs whose noise a small agent learns to chase. Reading the
last ``frames`` rows keeps the observation schema (and the engine) unchanged while the
network sees ``frames · dim`` numbers. ``columns`` narrows each row further to chosen features:
the synthetic market's edges (funding carry, crash risk in the IV surface) sit in a handful of its
69 features, and every other input is one more noise source for the policy's mean to follow.
"""

from __future__ import annotations

from collections.abc import Sequence

import gymnasium as gym
import torch
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor


class RecentFramesExtractor(BaseFeaturesExtractor):
    """Flattened ``[window, dim]`` observation → its last ``frames`` rows (oldest first), flattened.

    With ``columns``, only those feature indices of each row, in that order.
    """

    def __init__(
        self,
        observation_space: gym.spaces.Box,
        dim: int,
        frames: int = 1,
        columns: Sequence[int] | None = None,
    ) -> None:
        size = int(observation_space.shape[-1]) if len(observation_space.shape) == 1 else None
        if size is None or dim <= 0 or size % dim:
            shape = observation_space.shape
            raise ValueError(f"observation of shape {shape} is not a flattened [window, {dim}]")
        window = size // dim
        if not 1 <= frames <= window:
            raise ValueError(f"frames must be in [1, {window}], got {frames}")
        if columns is not None and (not columns or not all(0 <= c < dim for c in columns)):
            raise ValueError(f"columns must be non-empty feature indices in [0, {dim}), got {columns}")
        per_row = dim if columns is None else len(columns)
        super().__init__(observation_space, features_dim=frames * per_row)
        self.start = size - frames * dim
        index = None
        if columns is not None:
            rows = torch.arange(frames).unsqueeze(1) * dim
            index = (rows + torch.as_tensor(list(columns))).reshape(-1)
        # A buffer moves with the module to the policy's device; not persistent, since it follows from
        # the constructor's arguments, which SB3 saves.
        self.index: torch.Tensor | None
        self.register_buffer("index", index, persistent=False)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        recent = observations[:, self.start :]
        return recent if self.index is None else recent[:, self.index]


class EpisodeNoisePolicy(ActorCriticPolicy):
    """Actor-critic whose exploration noise is drawn once per episode instead of every step.

    Why: per-step noise makes every step trade (fees) and holds each trial position for one
    step, so an edge of a basis point per step drowns in the noise of the trials. Holding one
    draw ``ε`` per environment for a whole episode (action ``μ(s) + σ ε``) tries each offset
    long enough to see what it earns and trades only when ``μ(s)`` moves. Each step's action
    is still distributed ``N(μ(s), σ²)``, whose likelihood PPO uses unchanged; this is the
    coloured-noise end of "Pink Noise Is All You Need" (Eberhard et al., ICLR 2023).
    :class:`EpisodeNoiseCallback` redraws a row of :attr:`episode_noise` when its episode ends.
    Deterministic actions (validation, the bot) are ``μ(s)``, as with any SB3 policy.
    """

    episode_noise: torch.Tensor | None = None

    def draw_noise(self, n_envs: int, rows: torch.Tensor | None = None) -> None:
        """Fresh noise for all ``n_envs`` environments, or only for the boolean ``rows``."""
        shape = (n_envs, *self.action_space.shape)
        if self.episode_noise is None or self.episode_noise.shape != shape or rows is None:
            self.episode_noise = torch.randn(shape, device=self.device)
        else:
            self.episode_noise[rows] = torch.randn_like(self.episode_noise[rows])

    def forward(
        self, obs: torch.Tensor, deterministic: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        noise = self.episode_noise
        if deterministic or noise is None or obs.shape[0] != noise.shape[0]:
            return super().forward(obs, deterministic)
        features = self.extract_features(obs)
        if self.share_features_extractor:
            latent_pi, latent_vf = self.mlp_extractor(features)
        else:
            pi_features, vf_features = features
            latent_pi = self.mlp_extractor.forward_actor(pi_features)
            latent_vf = self.mlp_extractor.forward_critic(vf_features)
        distribution = self._get_action_dist_from_latent(latent_pi)
        gaussian = distribution.distribution
        actions = gaussian.mean + gaussian.stddev * noise.reshape(gaussian.mean.shape)
        log_prob = distribution.log_prob(actions)
        return actions.reshape((-1, *self.action_space.shape)), self.value_net(latent_vf), log_prob


class EpisodeNoiseCallback(BaseCallback):
    """Draws an :class:`EpisodeNoisePolicy`'s noise at the start of training and at each episode's end."""

    def _on_training_start(self) -> None:
        policy = self.model.policy
        if not isinstance(policy, EpisodeNoisePolicy):
            raise TypeError(f"episode noise needs an EpisodeNoisePolicy, got {type(policy).__name__}")
        policy.draw_noise(self.training_env.num_envs)

    def _on_step(self) -> bool:
        dones = torch.as_tensor(self.locals["dones"], dtype=torch.bool)
        if dones.any():
            self.model.policy.draw_noise(self.training_env.num_envs, dones)
        return True
