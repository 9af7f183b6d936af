"""A transparent trend-following policy with an implied-volatility regime filter.

For each traded instrument, from the market features of that instrument:

1. each return horizon ``h`` the price history covers gives a z-score
   ``ret_h / (rv · sqrt(h / year))`` (the move in units of its expected size), capped at
   ``±signal_cap`` and divided by it; the signal is their mean, in [-1, 1];
2. a signal weaker than ``entry_threshold`` means flat;
3. volatility targeting: exposure = signal × min(1, vol_target / rv) × max_exposure,
   and long-only instruments (spot) never go below 0.

Then the IV regime filter, from the surface features of ``surface_underlying``:
when ATM IV stands ``high_iv_threshold`` above its running level, or the term
structure is inverted by more than ``inversion_threshold`` (short-dated fear above
long-dated: the crash signature), every exposure is scaled by ``risk_off_scale``.

Missing data means no trade: an instrument whose features are absent or whose
history is shorter than the shortest horizon stays flat, and without a fresh
surface every instrument stays flat (unless ``require_surface`` is off).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from bot.features.base import SECONDS_PER_YEAR, duration_label
from strategies.base import Observation, Policy, register_policy


class TrendInstrument(BaseModel):
    """One traded instrument and its limits."""

    model_config = ConfigDict(extra="forbid")

    instrument: str
    max_exposure: float = Field(0.5, gt=0.0, le=1.0)
    long_only: bool = False


class TrendPolicyConfig(BaseModel):
    """Instruments, horizons (seconds) and thresholds of the trend policy."""

    model_config = ConfigDict(extra="forbid")

    instruments: list[TrendInstrument] = Field(
        default_factory=lambda: [
            TrendInstrument(instrument="SYNTH:BTCUSDT-PERP", max_exposure=0.5),
            TrendInstrument(instrument="SYNTH:DOGEUSDT-PERP", max_exposure=0.25),
            TrendInstrument(instrument="SYNTH:BTCUSDT", max_exposure=0.5, long_only=True),
        ],
        min_length=1,
    )
    horizons_s: list[int] = Field(default_factory=lambda: [300, 900, 3600], min_length=1)
    vol_window_s: int = Field(3600, gt=0, description="realised-vol feature used to scale signals")
    vol_target: float = Field(0.5, gt=0.0, description="annualised volatility of a full-size position")
    signal_cap: float = Field(2.0, gt=0.0)
    entry_threshold: float = Field(0.2, ge=0.0, lt=1.0)
    market_module: str = "market"
    surface_module: str = "surface"
    surface_underlying: str = "BTC"
    require_surface: bool = True
    high_iv_threshold: float = Field(0.25, gt=0.0, description="ATM IV over its running level, minus one")
    inversion_threshold: float = Field(0.02, ge=0.0, description="IV points of short over long ATM IV")
    risk_off_scale: float = Field(0.0, ge=0.0, le=1.0)

    @field_validator("instruments")
    @classmethod
    def _unique(cls, instruments: list[TrendInstrument]) -> list[TrendInstrument]:
        ids = [i.instrument for i in instruments]
        if len(set(ids)) != len(ids):
            raise ValueError(f"traded instruments must be unique, got {ids}")
        return instruments

    @field_validator("horizons_s")
    @classmethod
    def _sorted_horizons(cls, horizons: list[int]) -> list[int]:
        if any(h <= 0 for h in horizons) or len(set(horizons)) != len(horizons):
            raise ValueError(f"horizons must be positive and unique, got {horizons}")
        return sorted(horizons)


class TrendPolicy(Policy):
    """Volatility-scaled multi-horizon trend following, cut when the IV surface signals stress."""

    name = "trend"

    def __init__(self, config: TrendPolicyConfig | None = None) -> None:
        self.config = config if config is not None else TrendPolicyConfig()
        self.instruments = tuple(spec.instrument for spec in self.config.instruments)

    def targets(self, observation: Observation) -> dict[str, float]:
        features = observation.features
        scale = self.regime_scale(features)
        targets: dict[str, float] = {}
        for spec in self.config.instruments:
            exposure = self.trend_exposure(features, spec.instrument) * scale * spec.max_exposure
            targets[spec.instrument] = max(0.0, exposure) if spec.long_only else exposure
        return targets

    def trend_exposure(self, features: Mapping[str, float], instrument: str) -> float:
        """Volatility-targeted trend signal of one instrument in [-1, 1]; 0.0 when data is missing."""
        config = self.config
        prefix = f"{config.market_module}.{instrument}."
        history_s = _finite(features, prefix + "history_s")
        rv = _finite(features, prefix + f"rv_{duration_label(config.vol_window_s)}")
        if history_s is None or rv is None or rv <= 0.0:
            return 0.0
        scores: list[float] = []
        for horizon in config.horizons_s:
            move = _finite(features, prefix + f"ret_{duration_label(horizon)}")
            if move is None or horizon > history_s:
                continue
            z = move / (rv * math.sqrt(horizon / SECONDS_PER_YEAR))
            scores.append(max(-config.signal_cap, min(config.signal_cap, z)) / config.signal_cap)
        if not scores:
            return 0.0
        signal = math.fsum(scores) / len(scores)
        if abs(signal) < config.entry_threshold:
            return 0.0
        return signal * min(1.0, config.vol_target / rv)

    def regime_scale(self, features: Mapping[str, float]) -> float:
        """1.0 in a calm IV regime, ``risk_off_scale`` under stress, 0.0 without a surface if required."""
        config = self.config
        prefix = f"{config.surface_module}.{config.surface_underlying}."
        available = _finite(features, prefix + "available")
        vs_level = _finite(features, prefix + "atm_iv_vs_level")
        term_slope = _finite(features, prefix + "term_slope")
        if available is None or available < 0.5 or vs_level is None or term_slope is None:
            return 0.0 if config.require_surface else 1.0
        stressed = vs_level > config.high_iv_threshold or term_slope < -config.inversion_threshold
        return config.risk_off_scale if stressed else 1.0


def _finite(features: Mapping[str, float], name: str) -> float | None:
    """The feature's value, or None when it is absent or not a finite number."""
    value = features.get(name)
    return float(value) if value is not None and math.isfinite(value) else None


@register_policy("trend")
def load_trend_policy(path: str | None, settings: Any) -> TrendPolicy:
    """``trend`` takes no path; its config is the ``trend`` section of the settings, if any."""
    if path is not None:
        raise ValueError(f"the trend policy takes no path, got {path!r}")
    section = getattr(settings, "trend", None)
    return TrendPolicy(TrendPolicyConfig.model_validate(section) if section is not None else None)
