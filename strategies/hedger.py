"""The world-model hedger: a base book, and a short perpetual hedge when the world model sees tail risk.

The base book is constant target exposures (like ``hold``: long ``SYNTH:BTCUSDT`` by default), plus the
trend policy's targets when ``trend`` is on. The hedge sells the perpetual ``hedge_instrument`` against
``hedge_ratio`` × the book's net long exposure in ``hedged_instruments``.

The risk signal is the world model's, read by name from the ``world`` feature module
(``bot/features/world.py``, which owns the model and the latent history). By default it is the imagined
tail: the highest short-tenor ATM IV on the model's imagined path ahead (``tail_atm_iv``), which rises in
a crash and stays up while the model expects the stress to last. ``signal`` can name the latent energy
(``energy``, ``tail_energy``) instead, but energy measures how *unusual* a surface is, not in which
direction: the trained model scores a calm bull surface at the bull's own long-run variance (IV 0.14,
energy ≈ 7.5) above a fresh crash (IV 0.39, energy ≈ 6.7), so it is no trigger for a hedge on its own.

The signal drives the ratio through hysteresis (a Schmitt trigger) so that a signal hovering near one
threshold does not churn fees: the hedge goes on (``max_hedge_ratio``) when the signal reaches
``enter_level`` and comes off only when it falls to ``exit_level``; in between the ratio holds. Without a
fresh reading (before the first surface, or a stale one) the ratio also holds, starting unhedged.

The trigger's state lives in the policy: the same observations give the same targets (replays), but a
run resumed from a checkpoint starts unhedged until the signal next crosses ``enter_level``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from bot.features.world import resolve_model_file
from strategies.base import Observation, Policy, register_policy
from strategies.trend import TrendPolicy, TrendPolicyConfig


class HedgerConfig(BaseModel):
    """Base book, hedge instrument, where the signal comes from and the trigger's thresholds."""

    model_config = ConfigDict(extra="forbid")

    base_targets: dict[str, float] = Field(default_factory=lambda: {"SYNTH:BTCUSDT": 0.5})
    trend: bool = Field(
        False, description="add the trend policy's targets (its settings section) to the book"
    )
    hedge_instrument: str = "SYNTH:BTCUSDT-PERP"
    hedged_instruments: list[str] = Field(
        default_factory=lambda: ["SYNTH:BTCUSDT", "SYNTH:BTCUSDT-PERP"], min_length=1
    )
    world_module: str = "world"
    underlying: str = "BTC"
    signal: Literal["tail_atm_iv", "energy", "tail_energy"] = "tail_atm_iv"
    enter_level: float = Field(0.30, gt=0.0, description="signal at which the hedge goes on")
    exit_level: float = Field(0.25, gt=0.0, description="signal at which it comes off")
    max_hedge_ratio: float = Field(1.0, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _band(self) -> HedgerConfig:
        if self.exit_level >= self.enter_level:
            raise ValueError(f"exit_level ({self.exit_level}) must be below enter_level ({self.enter_level})")
        return self


class HedgerPolicy(Policy):
    """Base book plus a perpetual short switched on and off by the world model's tail risk."""

    name = "hedger"

    def __init__(self, config: HedgerConfig | None = None, trend: TrendPolicy | None = None) -> None:
        self.config = config if config is not None else HedgerConfig()
        self._trend = trend
        books = [*self.config.base_targets, *(trend.instruments if trend is not None else ())]
        self.instruments = tuple(dict.fromkeys([*books, self.config.hedge_instrument]))
        prefix = f"{self.config.world_module}.{self.config.underlying}."
        self._available, self._signal = prefix + "available", prefix + self.config.signal
        self.hedge_ratio = 0.0

    def targets(self, observation: Observation) -> dict[str, float]:
        self.hedge_ratio = self.update_ratio(observation.features)
        book = dict.fromkeys(self.instruments, 0.0)
        for instrument, exposure in self.config.base_targets.items():
            book[instrument] += exposure
        if self._trend is not None:
            for instrument, exposure in self._trend.act(observation).items():
                book[instrument] += exposure
        covered = max(0.0, math.fsum(book.get(i, 0.0) for i in self.config.hedged_instruments))
        book[self.config.hedge_instrument] -= self.hedge_ratio * covered
        return book

    def risk(self, features: Mapping[str, float]) -> float | None:
        """The ``signal`` of a fresh world reading; None without one."""
        if self._available not in features:
            raise ValueError(
                f"the hedger reads the {self.config.world_module!r} feature module of "
                f"{self.config.underlying}, which the feature engine does not run"
            )
        value = features[self._signal]
        return value if features[self._available] >= 0.5 and math.isfinite(value) else None

    def update_ratio(self, features: Mapping[str, float]) -> float:
        """The trigger: on at ``enter_level``, off at ``exit_level``, unchanged in between or without data."""
        risk = self.risk(features)
        if risk is None:
            return self.hedge_ratio
        if risk >= self.config.enter_level:
            return self.config.max_hedge_ratio
        if risk <= self.config.exit_level:
            return 0.0
        return self.hedge_ratio


def world_module_paths(settings: Any, module: str) -> list[str]:
    """``model_path`` of every ``module`` feature module in the settings' feature engine that names one."""
    specs = getattr(getattr(settings, "features", None), "modules", ())
    return [
        str(spec.params["model_path"])
        for spec in specs
        if spec.name == module and spec.params.get("model_path")
    ]


@register_policy("hedger")
def load_hedger_policy(path: str | None, settings: Any) -> HedgerPolicy:
    """``hedger:PATH``: PATH is the world model the feature engine's ``world`` module runs (checked).

    Its config is the ``hedger`` section of the settings, and the ``trend`` section when ``trend`` is on.
    """
    if path is None:
        raise ValueError(
            "the hedger needs its world model: hedger:PATH (python main.py --mode train --model world)"
        )
    model_file = resolve_model_file(path)
    section = getattr(settings, "hedger", None)
    config = HedgerConfig.model_validate(section) if section is not None else HedgerConfig()
    if settings is not None:
        paths = world_module_paths(settings, config.world_module)
        if not any(resolve_model_file(p).resolve() == model_file.resolve() for p in paths):
            raise ValueError(
                f"the hedger reads the {config.world_module!r} feature module, which must run the same "
                f'model: add [[features.modules]] name = "{config.world_module}", '
                f'params = {{ model_path = "{path}" }}'
            )
    trend = None
    if config.trend:
        trend_section = getattr(settings, "trend", None)
        trend = TrendPolicy(
            TrendPolicyConfig.model_validate(trend_section) if trend_section is not None else None
        )
    return HedgerPolicy(config, trend)
