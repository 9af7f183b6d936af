"""A trained PPO agent as a policy: ``ppo:PATH`` in paper, backtest and live runs alike.

A model is two files: ``NAME.zip`` (stable-baselines3's PPO) and ``NAME.json`` beside it,
its metadata — traded instruments and action scale, the observation schema it was trained
on with its hash, the redacted training settings and the sha256 of the model file.

An agent only makes sense on the observations it was trained on. The observation schema
is everything that gives a state's numbers their meaning: the feature engine's schema
(names, order, module configs: :meth:`FeatureEngine.schema_hash
<bot.features.engine.FeatureEngine.schema_hash>`), the state builder's window, clip and fixed scales,
and the decision interval (the time one row of the window spans). The loader rebuilds
it from the running settings and refuses a model whose schema differs, with a one-line
error naming what changed.

Acting is deterministic (the mean of the Gaussian policy), so replays reproduce runs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bot.bus import EventBus
from bot.features.engine import build_feature_engine
from strategies.base import Observation, Policy, clip_exposure, register_policy

METADATA_FORMAT = "volbot-ppo"
METADATA_VERSION = 1


class ModelSchemaError(ValueError):
    """The model does not fit the running engine; ``str(error)`` is one line."""


def observation_schema(settings: Any) -> dict[str, Any]:
    """The observation schema the engine of ``settings`` builds (a throwaway bus, nothing runs)."""
    features = build_feature_engine(EventBus(), settings.features)
    return {
        "feature_schema_hash": features.schema_hash(),
        "feature_names": list(features.feature_names),
        "window": settings.state.window,
        "clip": settings.state.clip,
        "fixed_scales": settings.state.scales_for(features.feature_names),
        "decision_interval_s": settings.run.decision_interval_s,
    }


def schema_hash(schema: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of an observation schema."""
    canonical = json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def metadata_path(model_path: Path | str) -> Path:
    """Where the metadata of ``model_path`` lives: the same name with ``.json``."""
    return Path(model_path).with_suffix(".json")


def file_sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def action_targets(action: Any, instruments: Sequence[str], max_exposure: float) -> dict[str, float]:
    """Target exposures of an agent's action: each component clipped to [-1, 1], times ``max_exposure``.

    The training environment and :class:`PPOPolicy` both map actions with this function, so
    a deployed agent asks for exactly what it asked for in training.
    """
    values = np.asarray(action, dtype=np.float64).reshape(-1)
    if values.shape != (len(instruments),):
        raise ValueError(f"expected one action per instrument {tuple(instruments)}, got shape {values.shape}")
    return {
        instrument: clip_exposure(clip_exposure(value) * max_exposure)
        for instrument, value in zip(instruments, values.tolist(), strict=True)
    }


def _differences(trained: Mapping[str, Any], running: Mapping[str, Any]) -> str:
    parts = []
    for key in sorted(set(trained) | set(running)):
        if key == "feature_names" or trained.get(key) == running.get(key):
            continue
        old, new = trained.get(key), running.get(key)
        if isinstance(old, str) and isinstance(new, str):
            old, new = old[:12], new[:12]
        parts.append(f"{key} {old} → {new}")
    return ", ".join(parts) or "feature names differ"


class PPOPolicy(Policy):
    """A stable-baselines3 PPO model answering each observation with its deterministic action."""

    name = "ppo"

    def __init__(
        self,
        model: Any,
        instruments: Sequence[str],
        max_exposure: float = 1.0,
        flatten: bool = True,
    ) -> None:
        self.model = model
        self.instruments = tuple(instruments)
        self.max_exposure = max_exposure
        self.flatten = flatten

    def targets(self, observation: Observation) -> dict[str, float]:
        state = observation.state.astype(np.float32)
        action, _ = self.model.predict(state.reshape(-1) if self.flatten else state, deterministic=True)
        return action_targets(action, self.instruments, self.max_exposure)

    @classmethod
    def load(cls, model_path: Path | str, settings: Any) -> PPOPolicy:
        """Load a model and its metadata; ModelSchemaError when it does not fit ``settings``' engine."""
        from stable_baselines3 import PPO

        model_path = Path(model_path)
        meta_path = metadata_path(model_path)
        if not model_path.is_file():
            raise ModelSchemaError(f"ppo model not found: {model_path}")
        if not meta_path.is_file():
            raise ModelSchemaError(f"ppo model {model_path} has no metadata file {meta_path}")
        metadata = json.loads(meta_path.read_text())
        if metadata.get("format") != METADATA_FORMAT or metadata.get("version") != METADATA_VERSION:
            raise ModelSchemaError(
                f"{meta_path} is not {METADATA_FORMAT} metadata version {METADATA_VERSION}"
            )
        if file_sha256(model_path) != metadata["model_sha256"]:
            raise ModelSchemaError(f"{model_path} does not match the sha256 in {meta_path} (file replaced?)")
        trained = metadata["observation_schema"]
        running = observation_schema(settings)
        if metadata["observation_schema_hash"] != schema_hash(running):
            raise ModelSchemaError(
                f"ppo model {model_path} was trained on observation schema "
                f"{metadata['observation_schema_hash'][:12]}, this engine builds {schema_hash(running)[:12]} "
                f"({_differences(trained, running)}): retrain it or run with the settings it was trained on"
            )
        model = PPO.load(model_path, device="cpu")
        return cls(
            model,
            metadata["instruments"],
            max_exposure=float(metadata["max_exposure"]),
            flatten=bool(metadata["flatten"]),
        )


@register_policy("ppo")
def load_ppo_policy(path: str | None, settings: Any) -> PPOPolicy:
    """``ppo:PATH`` — the model at PATH, checked against the running settings' observation schema."""
    if path is None:
        raise ValueError("the ppo policy needs a model: ppo:PATH")
    if settings is None:
        raise ValueError("the ppo policy needs the running settings to check the model's observation schema")
    return PPOPolicy.load(path, settings)
