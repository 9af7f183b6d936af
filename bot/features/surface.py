"""Implied-volatility surface features of one underlying (level, skew, term structure, change, age).

Interpolation, the same for every source (synthetic grid, SVI fits of Deribit marks):
along log-moneyness ``ln(K/F)`` linearly in IV with flat extrapolation; along maturity
linearly in total variance ``σ²T`` (no calendar arbitrage is introduced between
tenors) with flat IV outside the quoted maturities.

Local names are ``{underlying}.{field}``; fields, in order:

- ``available``: 1.0 when a surface newer than ``max_age_s`` is held, else 0.0 and every
  other field except ``age_s`` is 0.0;
- ``age_s``: seconds since the last surface was received (capped at ``max_age_s``; 0.0 before any);
- ``atm_iv_{T}`` for each ATM tenor: IV at ``ln(K/F) = 0``;
- ``skew_{T}`` at the short and long tenor: IV at ``K/F = low`` minus IV at ``K/F = high``
  (positive when puts are dearer, as in crypto sell-offs);
- ``term_slope``: ATM IV at the long tenor minus the short tenor (negative = inverted, the
  crash signature);
- ``atm_iv_vs_level``: short-tenor ATM IV relative to its exponentially weighted running
  level (half-life ``level_halflife_s`` of event time), minus one;
- ``change_rms``: RMS change of IV on the project grid since the previous surface;
- ``atm_change``: change of the short-tenor ATM IV since the previous surface.
"""

from __future__ import annotations

import math

import numpy as np
import structlog
from pydantic import BaseModel, ConfigDict, Field, model_validator

from bot.events import Event, IVSurface
from bot.features.base import (
    NANOS_PER_SECOND,
    FeatureModule,
    duration_label,
    fresh_reading,
    register_feature_module,
)
from models.grid import LOG_MONEYNESS, MATURITIES

DAY_S = 86_400
log = structlog.get_logger(__name__)


class SurfaceFeaturesConfig(BaseModel):
    """Underlying, tenors (days) and moneyness points of the surface summary."""

    model_config = ConfigDict(extra="forbid")

    underlying: str = Field("BTC", min_length=1)
    atm_tenors_days: list[int] = Field(default_factory=lambda: [30, 90, 180, 360], min_length=1)
    short_tenor_days: int = Field(30, gt=0)
    long_tenor_days: int = Field(180, gt=0)
    skew_moneyness: tuple[float, float] = (0.9, 1.1)
    level_halflife_s: float = Field(6 * 3600.0, gt=0)
    max_age_s: float = Field(900.0, gt=0, description="an older surface counts as unavailable")

    @model_validator(mode="after")
    def _consistent(self) -> SurfaceFeaturesConfig:
        if self.short_tenor_days >= self.long_tenor_days:
            raise ValueError("short_tenor_days must be below long_tenor_days")
        if any(t <= 0 for t in self.atm_tenors_days) or len(set(self.atm_tenors_days)) != len(
            self.atm_tenors_days
        ):
            raise ValueError(f"ATM tenors must be positive and unique, got {self.atm_tenors_days}")
        low, high = self.skew_moneyness
        if not 0.0 < low < high:
            raise ValueError(f"skew_moneyness must be (low, high) with 0 < low < high, got {low, high}")
        return self


class SurfaceSnapshot:
    """One surface with sorted axes, evaluated anywhere by the module's interpolation rule.

    Nodes that are not a positive finite IV (sources mark a node they could not invert
    with 0.0 or NaN, typically deep out of the money at short maturities) are skipped:
    each maturity's smile interpolates its valid nodes, and a maturity with fewer than
    two valid nodes is dropped.
    """

    def __init__(self, surface: IVSurface) -> None:
        k = np.asarray(surface.log_moneyness, dtype=np.float64)
        t = np.asarray(surface.maturities, dtype=np.float64)
        iv = np.asarray(surface.iv, dtype=np.float64)
        if iv.shape != (k.size, t.size):
            raise ValueError(f"iv shape {iv.shape} does not match axes ({k.size}, {t.size})")
        if not (np.all(np.isfinite(k)) and np.all(np.isfinite(t))):
            raise ValueError("surface axes have non-finite values")
        k_order, t_order = np.argsort(k, kind="stable"), np.argsort(t, kind="stable")
        k, t, iv = k[k_order], t[t_order], iv[np.ix_(k_order, t_order)]
        valid = np.isfinite(iv) & (iv > 0.0)
        smiles = [
            (maturity, k[valid[:, j]], iv[valid[:, j], j])
            for j, maturity in enumerate(t)
            if maturity > 0.0 and np.count_nonzero(valid[:, j]) >= 2
        ]
        if not smiles:
            raise ValueError("surface has no maturity with two valid IV nodes")
        self.maturities = np.array([maturity for maturity, _, _ in smiles])
        self._smiles = [(nodes, ivs) for _, nodes, ivs in smiles]

    def iv_at(self, log_moneyness: np.ndarray, maturity: float) -> np.ndarray:
        """IV at each log-moneyness for one maturity (years)."""
        smiles = np.stack([np.interp(log_moneyness, nodes, ivs) for nodes, ivs in self._smiles], axis=-1)
        t = self.maturities
        if maturity <= t[0]:
            return smiles[..., 0]
        if maturity >= t[-1]:
            return smiles[..., -1]
        upper = int(np.searchsorted(t, maturity))
        lower = upper - 1
        weight = (maturity - t[lower]) / (t[upper] - t[lower])
        total_variance = (1.0 - weight) * smiles[..., lower] ** 2 * t[lower] + weight * smiles[
            ..., upper
        ] ** 2 * t[upper]
        return np.sqrt(total_variance / maturity)

    def on_grid(self) -> np.ndarray:
        """The surface on the project grid ``[LOG_MONEYNESS, MATURITIES]``."""
        return np.stack([self.iv_at(LOG_MONEYNESS, float(m)) for m in MATURITIES], axis=-1)


@register_feature_module("surface")
class SurfaceFeatures(FeatureModule):
    """Summary of an underlying's IV surface for the policy: level, skew, term structure, dynamics."""

    config_type = SurfaceFeaturesConfig
    config: SurfaceFeaturesConfig

    def __init__(self, config: SurfaceFeaturesConfig) -> None:
        super().__init__(config)
        short, long = config.short_tenor_days, config.long_tenor_days
        self._short_label = duration_label(short * DAY_S)
        self._long_label = duration_label(long * DAY_S)
        self._fields = (
            "available",
            "age_s",
            *(f"atm_iv_{duration_label(days * DAY_S)}" for days in config.atm_tenors_days),
            f"skew_{self._short_label}",
            f"skew_{self._long_label}",
            "term_slope",
            "atm_iv_vs_level",
            "change_rms",
            "atm_change",
        )
        self._names = tuple(f"{config.underlying}.{name}" for name in self._fields)
        self._summary: dict[str, float] = {}
        self._received_ns: int | None = None
        self._grid: np.ndarray | None = None
        self._atm_short = math.nan
        self._level = math.nan

    @property
    def event_types(self) -> tuple[type[Event], ...]:
        return (IVSurface,)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self._names

    def on_event(self, event: Event) -> None:
        if not isinstance(event, IVSurface) or event.underlying != self.config.underlying:
            return
        try:
            snapshot = SurfaceSnapshot(event)
        except ValueError as error:
            log.warning("surface_ignored", underlying=event.underlying, source=event.source, error=str(error))
            return
        self._summarise(snapshot, event.ts_recv)

    def _summarise(self, snapshot: SurfaceSnapshot, ts_ns: int) -> None:
        config = self.config

        def atm(days: int) -> float:
            return float(snapshot.iv_at(np.zeros(1), days / 365.0)[0])

        def skew(days: int) -> float:
            low, high = snapshot.iv_at(np.log(np.asarray(config.skew_moneyness)), days / 365.0)
            return float(low - high)

        summary = {f"atm_iv_{duration_label(days * DAY_S)}": atm(days) for days in config.atm_tenors_days}
        summary[f"skew_{self._short_label}"] = skew(config.short_tenor_days)
        summary[f"skew_{self._long_label}"] = skew(config.long_tenor_days)
        atm_short = atm(config.short_tenor_days)
        summary["term_slope"] = atm(config.long_tenor_days) - atm_short

        grid = snapshot.on_grid()
        if self._grid is None or self._received_ns is None:
            summary["change_rms"], summary["atm_change"] = 0.0, 0.0
            self._level = atm_short
        else:
            summary["change_rms"] = float(np.sqrt(np.mean(np.square(grid - self._grid))))
            summary["atm_change"] = atm_short - self._atm_short
            elapsed_s = max(0, ts_ns - self._received_ns) / NANOS_PER_SECOND
            weight = 1.0 - math.exp(-elapsed_s * math.log(2.0) / config.level_halflife_s)
            self._level += weight * (atm_short - self._level)
        summary["atm_iv_vs_level"] = atm_short / self._level - 1.0
        self._summary, self._grid, self._atm_short, self._received_ns = summary, grid, atm_short, ts_ns

    def compute(self, now_ns: int) -> dict[str, float]:
        config = self.config
        return fresh_reading(
            self._names, f"{config.underlying}.", self._summary, self._received_ns, now_ns, config.max_age_s
        )
