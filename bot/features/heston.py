"""Heston parameters of an underlying's implied-volatility surface, and how they moved.

The option market's own stochastic-volatility reading: each new :class:`~bot.events.IVSurface`
of ``underlying`` is calibrated at the next decision (not on the event: calibration is far from
O(1)), warm-started from the previous fit, by one of two methods:

- ``engine``: :func:`models.calibration.calibrate`, the semi-analytic pricer (exact; ~0.2 s warm);
- ``surrogate``: :func:`models.surrogate.calibrate_with_surrogate` through a trained surrogate
  (``surrogate_path``; a few ms; the surface must be on the project grid the surrogate knows).

Local names are ``{underlying}.{field}``; fields, in order: ``available`` (1.0 while a fit newer
than ``max_age_s`` is held), ``kappa``, ``theta``, ``sigma``, ``rho``, ``v0``, ``feller`` (1.0 when
2κθ > σ²), ``fit_rmse`` (IV RMSE of the fit), then ``d_{parameter}`` for each parameter: its change
since the previous fit. Without a fit every field is 0.0. Calibration is deterministic for the same
surfaces, so replays give the same features bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import structlog
from pydantic import BaseModel, ConfigDict, Field

from bot.events import Event, IVSurface
from bot.features.base import NANOS_PER_SECOND, FeatureModule, register_feature_module
from models.heston import PARAM_NAMES, HestonParams

log = structlog.get_logger(__name__)


class HestonFeaturesConfig(BaseModel):
    """Which surfaces to calibrate, how, and when a fit is too old to use."""

    model_config = ConfigDict(extra="forbid")

    underlying: str = Field("BTC", min_length=1)
    method: Literal["engine", "surrogate"] = "engine"
    surrogate_path: Path | None = Field(None, description="trained surrogate for method = surrogate")
    max_age_s: float = Field(900.0, gt=0, description="an older fit counts as unavailable")


@register_feature_module("heston")
class HestonFeatures(FeatureModule):
    """Heston parameters calibrated to the latest surface, with their deltas."""

    name = "heston"
    config_type = HestonFeaturesConfig
    config: HestonFeaturesConfig

    def __init__(self, config: HestonFeaturesConfig) -> None:
        super().__init__(config)
        if config.method == "surrogate":
            if config.surrogate_path is None:
                raise ValueError(
                    "method surrogate needs surrogate_path (a model from --mode train --model surrogate)"
                )
            from models.surrogate import SurrogateModel

            self._surrogate = SurrogateModel.load(config.surrogate_path)
        self._pending: IVSurface | None = None
        self._params: np.ndarray | None = None
        self._previous: np.ndarray | None = None
        self._rmse = 0.0
        self._fitted_ns = 0
        prefix = config.underlying
        fields = ["available", *PARAM_NAMES, "feller", "fit_rmse", *(f"d_{p}" for p in PARAM_NAMES)]
        self._names = tuple(f"{prefix}.{field}" for field in fields)

    @property
    def event_types(self) -> tuple[type[Event], ...]:
        return (IVSurface,)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self._names

    def on_event(self, event: Event) -> None:
        if isinstance(event, IVSurface) and event.underlying == self.config.underlying:
            self._pending = event  # calibrated at the next decision: only the newest matters

    def compute(self, now_ns: int) -> dict[str, float]:
        if self._pending is not None:
            self._calibrate(self._pending)
            self._pending = None
        max_age_ns = self.config.max_age_s * NANOS_PER_SECOND
        if self._params is None or now_ns - self._fitted_ns > max_age_ns:
            return dict.fromkeys(self._names, 0.0)
        params = HestonParams.from_array(self._params)
        deltas = self._params - self._previous if self._previous is not None else np.zeros(len(PARAM_NAMES))
        values = [1.0, *self._params, float(params.feller()), self._rmse, *deltas]
        return dict(zip(self._names, (float(v) for v in values), strict=True))

    def _calibrate(self, surface: IVSurface) -> None:
        iv = np.array(surface.iv, dtype=np.float64)
        iv[~(iv > 0.0)] = np.nan  # a node the source could not invert carries 0.0 or NaN
        if np.isnan(iv).all():
            return
        try:
            if self.config.method == "engine":
                from models.calibration import calibrate

                strikes = np.exp(np.array(surface.log_moneyness))  # spot 1, r = q = 0: ln(K/F) = ln K
                result = calibrate(iv, 1.0, strikes, np.array(surface.maturities), x0=self._params)
                params, rmse = result.params.to_array(), result.rmse_iv
            else:
                from models.surrogate import calibrate_with_surrogate

                params, rmse, _ = calibrate_with_surrogate(iv, self._surrogate, x0=self._params)
        except ValueError as exc:  # a surface no Heston parameters can be fitted to: keep the last fit
            log.warning("heston_fit_failed", underlying=surface.underlying, error=str(exc))
            return
        self._previous = self._params
        self._params = np.asarray(params, dtype=np.float64)
        self._rmse = float(rmse)
        self._fitted_ns = surface.ts_recv
