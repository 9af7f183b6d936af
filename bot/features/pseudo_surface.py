"""A "pseudo surface" of return moments by window, for assets without listed options.

An altcoin has no IV surface, so its volatility regime is described instead by the
first four moments of its recent returns over several windows: a small
[window × moment] matrix that plays the part of the surface (seed 002, "shitcoin"
module) and that a learned model can later map to Heston-like parameters.

Returns are log returns between as-of mid prices on a regular event-time grid of
``return_step_s``, so they do not depend on how often the venue quotes. Local
names are ``{instrument}.{field}``; for each window ``w``, in order:

- ``mean_{w}``: mean return, annualised (× year / step);
- ``var_{w}``: variance of returns (population), annualised (× year / step);
- ``skew_{w}``: skewness ``m3 / m2^1.5`` (population moments);
- ``kurt_{w}``: excess kurtosis ``m4 / m2² − 3``;

then ``history_s`` as in the market module. A window with fewer than
``min_returns`` returns so far, or without variance, gives 0.0 for its moments.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bot.events import Event, Quote, split_instrument
from bot.features.base import (
    NANOS_PER_SECOND,
    SECONDS_PER_YEAR,
    FeatureModule,
    duration_label,
    register_feature_module,
)
from bot.features.history import PriceHistory


class PseudoSurfaceConfig(BaseModel):
    """Instrument, moment windows and sampling of the pseudo surface (seconds)."""

    model_config = ConfigDict(extra="forbid")

    instrument: str = "SYNTH:DOGEUSDT"
    windows_s: list[int] = Field(default_factory=lambda: [900, 3600, 14400], min_length=1)
    return_step_s: int = Field(60, gt=0)
    bucket_s: int = Field(5, gt=0)
    min_returns: int = Field(4, ge=2)

    @field_validator("instrument")
    @classmethod
    def _valid_id(cls, instrument: str) -> str:
        split_instrument(instrument)
        return instrument

    @model_validator(mode="after")
    def _consistent(self) -> PseudoSurfaceConfig:
        if len(set(self.windows_s)) != len(self.windows_s):
            raise ValueError(f"windows must be unique, got {self.windows_s}")
        uneven = [w for w in self.windows_s if w <= 0 or w % self.return_step_s]
        if uneven:
            raise ValueError(f"windows {uneven} must be positive multiples of return_step_s")
        if self.return_step_s % self.bucket_s:
            raise ValueError("return_step_s must be a multiple of bucket_s")
        return self


def return_moments(returns: np.ndarray, step_s: float, min_returns: int) -> tuple[float, float, float, float]:
    """Annualised mean and variance, skewness and excess kurtosis of ``returns`` (zeros if too few)."""
    if returns.size < min_returns:
        return 0.0, 0.0, 0.0, 0.0
    per_year = SECONDS_PER_YEAR / step_s
    mean = float(np.mean(returns))
    deviations = returns - mean
    m2 = float(np.mean(np.square(deviations)))
    if m2 <= 0.0:
        return mean * per_year, 0.0, 0.0, 0.0
    m3 = float(np.mean(deviations**3))
    m4 = float(np.mean(deviations**4))
    return mean * per_year, m2 * per_year, m3 / m2**1.5, m4 / m2**2 - 3.0


@register_feature_module("pseudo_surface")
class PseudoSurfaceFeatures(FeatureModule):
    """Rolling return moments of one instrument over several windows."""

    config_type = PseudoSurfaceConfig
    config: PseudoSurfaceConfig

    def __init__(self, config: PseudoSurfaceConfig) -> None:
        super().__init__(config)
        lookback_ns = max(config.windows_s) * NANOS_PER_SECOND
        self._prices = PriceHistory(config.bucket_s * NANOS_PER_SECOND, lookback_ns)
        fields = [
            f"{moment}_{duration_label(window)}"
            for window in config.windows_s
            for moment in ("mean", "var", "skew", "kurt")
        ]
        fields.append("history_s")
        self._names = tuple(f"{config.instrument}.{name}" for name in fields)

    @property
    def event_types(self) -> tuple[type[Event], ...]:
        return (Quote,)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self._names

    def on_event(self, event: Event) -> None:
        mine = isinstance(event, Quote) and event.instrument == self.config.instrument
        if mine and event.bid > 0.0 and event.ask > 0.0:
            self._prices.add(event.ts_recv, event.mid)

    def moments(self, now_ns: int) -> np.ndarray:
        """The pseudo surface itself: (window, moment) in config window order, moments as in the names.

        Public so that a model reading the surface (the ``heston`` module) owns no second copy of it.
        """
        config = self.config
        step_ns = config.return_step_s * NANOS_PER_SECOND
        rows = [
            return_moments(
                self._prices.log_returns(now_ns, window * NANOS_PER_SECOND, step_ns),
                config.return_step_s,
                config.min_returns,
            )
            for window in config.windows_s
        ]
        return np.array(rows, dtype=np.float64)

    def compute(self, now_ns: int) -> dict[str, float]:
        values = [float(v) for v in self.moments(now_ns).reshape(-1)]
        values.append(min(self._prices.known_span_s(now_ns), float(max(self.config.windows_s))))
        return dict(zip(self._names, values, strict=True))
