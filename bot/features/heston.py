"""Heston parameters of an implied-volatility surface, or of an altcoin's pseudo surface, and how they moved.

**Sources** (``source``):

- ``surface``: each new :class:`~bot.events.IVSurface` of ``underlying`` (the option market's own
  stochastic-volatility reading) is fitted at the next decision (not on the event: a fit is far from
  O(1)); only the newest surface since the last decision matters.
- ``pseudo_surface``: an altcoin has no options, so this module keeps its own
  :class:`~bot.features.pseudo_surface.PseudoSurfaceFeatures` (``pseudo_surface`` config: instrument,
  windows, sampling) and, at the first decision of each new return step, turns its
  [window × moment] matrix into an IV grid on the project grid (:func:`pseudo_iv_grid`) and fits it.

  *What that grid is, honestly:* a convention, not a price. The windows, shortest first, are laid
  over the grid's tenors shortest first (linear interpolation in window rank); at each tenor the
  ATM vol is the square root of that window's annualised variance of step returns, and the smile is
  the Gram–Charlier expansion of Backus, Foresi & Wu, ``σ·(1 − γ₁·d/6 − γ₂·(1 − d²)/24)`` with
  ``d = −k/(σ√T) + σ√T/2``, using that window's skewness γ₁ and excess kurtosis γ₂ of *step* returns
  unscaled (scaling them to 30–360 day horizons by the i.i.d. rule would flatten every smile and
  leave σ and ρ unidentified), the factor clipped to [0.5, 2]. Heston fitted to it is an embedding
  of the recent return distribution under the physical measure: v0 tracks the shortest window's
  variance, θ the longest's, κ how fast the levels converge across windows, ρ the skewness and σ
  the kurtosis. These are *not* risk-neutral dynamics and must not be compared with the BTC
  surface's parameters; a grid is fitted only when every window has a positive variance.

**Methods** (``method``), all deterministic for the same inputs, so replays give the same features
bit for bit:

- ``engine``: :func:`models.calibration.calibrate`, the semi-analytic pricer (exact; ~0.2 s),
  warm-started from the previous fit;
- ``surrogate``: :func:`models.surrogate.calibrate_with_surrogate` through a trained surrogate
  (``surrogate_path``; a few ms), warm-started from the previous fit;
- ``inverse``: the parameters a trained inverse model (``inverse_path``) reads off the surface in
  well under a millisecond; its ``fit_rmse`` is the IV RMSE of the engine's surface at them;
- ``inverse+engine``: the engine calibration warm-started from the inverse model's reading of each
  surface (not from the previous fit, so a fit depends on its own surface only).

The model methods need the surface on the project grid (``models.grid``); a surface of another
layout is skipped with a warning (the engine takes any layout). For the inverse model, nodes the
source could not invert are filled along strike (then from the nearest tenor); the engine and
surrogate fits leave them out.

Local names are ``{underlying}.{field}`` for a surface and ``{instrument}.{field}`` for a pseudo
surface (so a BTC surface module and an altcoin module coexist; two modules on the same source are
refused by the feature engine as duplicate names). Fields, in order: ``available`` (1.0 while a fit
newer than ``max_age_s`` is held), ``kappa``, ``theta``, ``sigma``, ``rho``, ``v0``, ``feller`` (1.0
when 2κθ > σ²), ``fit_rmse`` (IV RMSE of the fit), then ``d_{parameter}`` for each parameter: its
change since the previous fit. Without a fit every field is 0.0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import structlog
from pydantic import BaseModel, ConfigDict, Field, model_validator

from bot.events import Event, IVSurface, Quote
from bot.features.base import NANOS_PER_SECOND, FeatureModule, register_feature_module
from bot.features.pseudo_surface import PseudoSurfaceConfig, PseudoSurfaceFeatures
from models import grid
from models.heston import PARAM_NAMES, HestonParams, iv_surface

log = structlog.get_logger(__name__)

T = TypeVar("T")
# Range of the Gram–Charlier smile factor: the expansion is only an approximation near the money.
_SMILE_FACTOR = (0.5, 2.0)


class HestonFeaturesConfig(BaseModel):
    """Which surface to fit (an option surface or an altcoin's pseudo surface), how, and for how long."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["surface", "pseudo_surface"] = "surface"
    underlying: str = Field("BTC", min_length=1, description="underlying of the IV surfaces (source surface)")
    pseudo_surface: PseudoSurfaceConfig = Field(
        default_factory=PseudoSurfaceConfig,
        description="the altcoin's pseudo surface (source pseudo_surface)",
    )
    method: Literal["engine", "surrogate", "inverse", "inverse+engine"] = "engine"
    surrogate_path: Path | None = Field(None, description="trained surrogate for method = surrogate")
    inverse_path: Path | None = Field(None, description="trained inverse model for the inverse methods")
    max_age_s: float = Field(900.0, gt=0, description="an older fit counts as unavailable")

    @model_validator(mode="after")
    def _model_given(self) -> HestonFeaturesConfig:
        if self.method == "surrogate" and self.surrogate_path is None:
            raise ValueError(
                "method surrogate needs surrogate_path (a model from --mode train --model surrogate)"
            )
        if self.method.startswith("inverse") and self.inverse_path is None:
            raise ValueError(
                f"method {self.method} needs inverse_path (a model from --mode train --model inverse)"
            )
        return self


def _load_model(loader: Callable[[Path], T], path: Path, field: str) -> T:
    """A trained model, or one ValueError naming the config field when the file is missing or unusable."""
    if not path.is_file():
        raise ValueError(f"{field} {path} is not a file")
    try:
        return loader(path)
    except Exception as exc:  # torch/pickle raise many types for a wrong or damaged file
        raise ValueError(f"{field} {path} is not a usable model: {exc}") from exc


def pseudo_iv_grid(moments: np.ndarray, windows_s: list[int]) -> np.ndarray | None:
    """The convention of the module docstring: a (10, 6) IV grid from (window, moment) rows, or None.

    None while any window has no positive variance (too few returns yet, or a frozen price).
    """
    order = np.argsort(windows_s, kind="stable")
    rows = np.asarray(moments, dtype=np.float64)[order]
    if not (rows[:, 1] > 0.0).all():
        return None
    rank = np.arange(rows.shape[0], dtype=np.float64)
    position = np.linspace(0.0, rank[-1], grid.N_MATURITIES)
    variance, skew, kurt = (np.interp(position, rank, rows[:, i]) for i in (1, 2, 3))
    vol = np.sqrt(variance)[None, :]
    root_t = np.sqrt(grid.MATURITIES)[None, :]
    d = -grid.LOG_MONEYNESS[:, None] / (vol * root_t) + 0.5 * vol * root_t
    factor = 1.0 - skew[None, :] * d / 6.0 - kurt[None, :] * (1.0 - d**2) / 24.0
    return vol * np.clip(factor, *_SMILE_FACTOR)


def fill_missing(iv: np.ndarray, log_moneyness: np.ndarray) -> np.ndarray:
    """NaN nodes filled along strike within their tenor (flat beyond the quotes), then from the nearest
    quoted tenor: the inverse model needs a complete surface. At least one node must be quoted."""
    out = iv.copy()
    quoted = [j for j in range(iv.shape[1]) if np.isfinite(iv[:, j]).any()]
    for j in quoted:
        ok = np.isfinite(iv[:, j])
        out[:, j] = np.interp(log_moneyness, log_moneyness[ok], iv[ok, j])
    for j in range(iv.shape[1]):
        if j not in quoted:
            out[:, j] = out[:, min(quoted, key=lambda c: (abs(c - j), c))]
    return out


@register_feature_module("heston")
class HestonFeatures(FeatureModule):
    """Heston parameters fitted to the latest (pseudo) surface, with their deltas."""

    name = "heston"
    config_type = HestonFeaturesConfig
    config: HestonFeaturesConfig

    def __init__(self, config: HestonFeaturesConfig) -> None:
        super().__init__(config)
        if config.method == "surrogate":
            from models.surrogate import SurrogateModel

            assert config.surrogate_path is not None  # checked by the config
            self._surrogate = _load_model(SurrogateModel.load, config.surrogate_path, "surrogate_path")
        if config.method.startswith("inverse"):
            from models.inverse import InverseModel

            assert config.inverse_path is not None  # checked by the config
            self._inverse = _load_model(InverseModel.load, config.inverse_path, "inverse_path")
        self._pseudo: PseudoSurfaceFeatures | None = None
        prefix = config.underlying
        if config.source == "pseudo_surface":
            self._pseudo = PseudoSurfaceFeatures(config.pseudo_surface)
            prefix = config.pseudo_surface.instrument
        self._pseudo_step = -1
        self._pending: IVSurface | None = None
        self._params: np.ndarray | None = None
        self._previous: np.ndarray | None = None
        self._rmse = 0.0
        self._fitted_ns = 0
        fields = ["available", *PARAM_NAMES, "feller", "fit_rmse", *(f"d_{p}" for p in PARAM_NAMES)]
        self._prefix = prefix
        self._names = tuple(f"{prefix}.{field}" for field in fields)

    @property
    def event_types(self) -> tuple[type[Event], ...]:
        return (Quote,) if self._pseudo is not None else (IVSurface,)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self._names

    def on_event(self, event: Event) -> None:
        if self._pseudo is not None:
            self._pseudo.on_event(event)
        elif isinstance(event, IVSurface) and event.underlying == self.config.underlying:
            self._pending = event  # fitted at the next decision: only the newest matters

    def compute(self, now_ns: int) -> dict[str, float]:
        if self._pseudo is not None:
            self._fit_pseudo_surface(now_ns)
        elif self._pending is not None:
            surface, self._pending = self._pending, None
            self._fit(np.array(surface.iv, dtype=np.float64), np.array(surface.log_moneyness),
                      np.array(surface.maturities), surface.ts_recv)
        max_age_ns = self.config.max_age_s * NANOS_PER_SECOND
        if self._params is None or now_ns - self._fitted_ns > max_age_ns:
            return dict.fromkeys(self._names, 0.0)
        params = HestonParams.from_array(self._params)
        deltas = self._params - self._previous if self._previous is not None else np.zeros(len(PARAM_NAMES))
        values = [1.0, *self._params, float(params.feller()), self._rmse, *deltas]
        return dict(zip(self._names, (float(v) for v in values), strict=True))

    def _fit_pseudo_surface(self, now_ns: int) -> None:
        """Fit once per return step (the pseudo surface cannot change within one)."""
        assert self._pseudo is not None
        pseudo = self.config.pseudo_surface
        step = now_ns // (pseudo.return_step_s * NANOS_PER_SECOND)
        if step == self._pseudo_step:
            return
        self._pseudo_step = step
        iv = pseudo_iv_grid(self._pseudo.moments(now_ns), pseudo.windows_s)
        if iv is not None:
            self._fit(iv, grid.LOG_MONEYNESS, grid.MATURITIES, now_ns)

    def _fit(self, iv: np.ndarray, log_moneyness: np.ndarray, maturities: np.ndarray, ts_ns: int) -> None:
        """Fit one surface and make it the current fit; a surface that cannot be fitted keeps the last."""
        iv[~(iv > 0.0)] = np.nan  # a node the source could not invert carries 0.0 or NaN
        if np.isnan(iv).all():
            return
        on_grid = (
            iv.shape == grid.SHAPE
            and np.allclose(log_moneyness, grid.LOG_MONEYNESS)
            and np.allclose(maturities, grid.MATURITIES)
        )
        if self.config.method != "engine" and not on_grid:
            log.warning("heston_surface_off_grid", source=self._prefix, method=self.config.method)
            return
        try:
            params, rmse = self._solve(iv, log_moneyness, maturities)
        except ValueError as exc:  # a surface no Heston parameters can be fitted to
            log.warning("heston_fit_failed", source=self._prefix, error=str(exc))
            return
        self._previous = self._params
        self._params = np.asarray(params, dtype=np.float64)
        self._rmse = float(rmse)
        self._fitted_ns = ts_ns

    def _solve(self, iv: np.ndarray, log_moneyness: np.ndarray,
               maturities: np.ndarray) -> tuple[np.ndarray, float]:
        """Parameters and IV RMSE of the configured method (spot 1, r = q = 0: ln(K/F) = ln K)."""
        method = self.config.method
        if method == "surrogate":
            from models.surrogate import calibrate_with_surrogate

            params, rmse, _ = calibrate_with_surrogate(iv, self._surrogate, x0=self._params)
            return params, rmse
        x0 = self._params
        if method.startswith("inverse"):
            x0, _ = self._inverse.predict(fill_missing(iv, log_moneyness))
            if method == "inverse":
                return x0, _engine_rmse(x0, iv)
        from models.calibration import calibrate

        result = calibrate(iv, 1.0, np.exp(log_moneyness), maturities, x0=x0)
        return result.params.to_array(), result.rmse_iv


def _engine_rmse(params: np.ndarray, iv: np.ndarray) -> float:
    """IV RMSE of the engine's surface at ``params`` over the quoted nodes it can price."""
    error = iv_surface(params) - iv
    usable = np.isfinite(error)
    if not usable.any():
        raise ValueError("the engine cannot price any quoted node at the inverse model's parameters")
    return math.sqrt(float(np.mean(error[usable] ** 2)))
