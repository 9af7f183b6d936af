"""The policy contract: an observation in, a target exposure per traded instrument out.

Every policy — rule-based or learned — sees the same :class:`Observation` built by the
decision loop and answers with signed target exposures (fractions of equity) in
[-1, 1]. :meth:`Policy.act` is the only entry point: it validates and clips what the
policy's :meth:`Policy.targets` proposes, so no policy can send NaN or 3× leverage
downstream.

Policies are loaded from a spec ``NAME[:PATH]`` (``trend``, later ``ppo:var/models/x.zip``):
a loader registered under ``NAME`` with :func:`register_policy` receives the path
(or None) and the app's settings. Policy modules in this package are imported on
the first lookup, so a new policy is one new file.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from bot.features.base import import_submodules

PolicyLoader = Callable[[str | None, Any], "Policy"]

_LOADERS: dict[str, PolicyLoader] = {}


@dataclass(frozen=True)
class Observation:
    """What a policy sees at one decision.

    ``state`` is the normalised ``[window, dim]`` history from the state builder;
    ``features`` the raw latest values by name (rules read these by name, so they
    survive changes of feature order); ``instruments`` the instruments to decide on.
    """

    ts_ns: int
    state: np.ndarray
    features: Mapping[str, float]
    feature_names: tuple[str, ...]
    instruments: tuple[str, ...]


class Policy(ABC):
    """Maps observations to target exposures for a fixed tuple of instruments."""

    name: str
    instruments: tuple[str, ...]

    @abstractmethod
    def targets(self, observation: Observation) -> Mapping[str, float]:
        """Proposed exposure per instrument (any subset of ``instruments``; others mean 0)."""

    def act(self, observation: Observation) -> dict[str, float]:
        """Validated targets: every traded instrument, in order, finite and within [-1, 1]."""
        proposed = self.targets(observation)
        unknown = sorted(set(proposed) - set(self.instruments))
        if unknown:
            raise ValueError(f"policy {self.name!r} targets instruments it does not trade: {unknown}")
        return {instrument: clip_exposure(proposed.get(instrument, 0.0)) for instrument in self.instruments}


def clip_exposure(value: float) -> float:
    """``value`` clipped to [-1, 1]; NaN (no opinion) becomes 0, ±inf the nearest bound, -0.0 is 0.0."""
    value = float(value)
    if math.isnan(value):
        return 0.0
    return min(1.0, max(-1.0, value)) + 0.0


def register_policy(name: str) -> Callable[[PolicyLoader], PolicyLoader]:
    """Decorator: make ``loader(path, settings) -> Policy`` loadable as ``name[:path]``."""

    def decorate(loader: PolicyLoader) -> PolicyLoader:
        existing = _LOADERS.get(name)
        if existing is not None and existing is not loader:
            raise ValueError(f"policy name {name!r} is already registered")
        _LOADERS[name] = loader
        return loader

    return decorate


def load_policy(spec: str, *, settings: Any = None) -> Policy:
    """The policy of ``NAME[:PATH]``; ``settings`` is passed to the loader for its config section."""
    name, _, path = spec.partition(":")
    if not name:
        raise ValueError(f"policy spec must look like NAME or NAME:PATH, got {spec!r}")
    if name not in _LOADERS:
        import_submodules(__package__ or "strategies")
    loader = _LOADERS.get(name)
    if loader is None:
        known = ", ".join(sorted(_LOADERS)) or "none"
        raise ValueError(f"unknown policy {name!r} (known: {known})")
    return loader(path or None, settings)
