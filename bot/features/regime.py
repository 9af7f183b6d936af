"""Crash-regime probability of one instrument from a trained regime detector (``models/regime.py``).

The detector reads hourly bars of 5-minute closes (log return and log realised variance, exactly
``models.regime.bar_features``); this module keeps those closes itself: the last Quote mid (or Trade
price, ``source``) of ``instrument`` in each 5-minute bucket of event time, carried forward over
buckets without a price, for the model's last ``window`` bars. At a decision the buckets that ended by
then are closed and, once per new complete bar ``i`` (hours since the epoch), the detector runs from a
zero state over the bars ``[s − context, i]`` of its online scheme (``s`` the start of i's block, see
``models/regime.py``, ``online_probabilities``): the numbers its held-out metrics were measured on.
Between bars the last probability is held.

A detector that reads implied vol (feature ``log_atm_iv``, ``RegimeConfig.features``) also gets, per bar,
the log ATM IV at its close: the ATM (ln K/F = 0) IV at the model's grid tenor (``iv_maturity``, 30 days by
default) of the latest ``IVSurface`` of ``underlying`` received before the bar ended (a surface stamped
exactly at the boundary belongs to the next bar), read with ``bot.features.surface.SurfaceSnapshot`` like
the surface features. Bars before the first surface have no IV: the runs use only the bars that have
both, so ``available`` waits for ``min_bars`` such bars.

Local names are ``{instrument}.{field}``; fields, in order: ``available`` (1.0 once ``min_bars``
complete bars are held, default the model's warm-up of 48 hours) and ``crash_prob`` (0.0 while
unavailable). Bars depend only on event times and prices, so replays give the same features bit for
bit. Off by default: a model must be trained first (``python main.py --mode train --model regime``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import structlog
from pydantic import BaseModel, ConfigDict, Field

from bot.events import Event, IVSurface, Quote, Trade, split_instrument
from bot.features.base import FeatureModule, register_feature_module
from bot.features.surface import SurfaceSnapshot

log = structlog.get_logger(__name__)


class RegimeFeaturesConfig(BaseModel):
    """Which instrument's prices feed which trained detector."""

    model_config = ConfigDict(extra="forbid")

    instrument: str = Field("SYNTH:BTCUSDT", min_length=1)
    model_path: Path | None = Field(None, description="trained detector (directory or .pt file); required")
    source: Literal["quote", "trade"] = "quote"
    underlying: str = Field("BTC", min_length=1, description="IVSurface underlying (models that read IV)")
    min_bars: int | None = Field(None, gt=0, description="bars before crash_prob counts (default: warm-up)")


@register_feature_module("regime")
class RegimeFeatures(FeatureModule):
    """Probability that ``instrument``'s market is in the crash regime."""

    name = "regime"
    config_type = RegimeFeaturesConfig
    config: RegimeFeaturesConfig

    def __init__(self, config: RegimeFeaturesConfig) -> None:
        super().__init__(config)
        split_instrument(config.instrument)
        if config.model_path is None or not Path(config.model_path).exists():
            raise ValueError(
                f"the regime feature module needs model_path, a trained detector (got {config.model_path}); "
                "train one with: python main.py --mode train --model regime"
            )
        from models.regime import CloseSampler, RegimeDetector, iv_maturity

        self._detector = RegimeDetector.load(config.model_path)
        model = self._detector.config
        if model.bar_s % model.sub_s:
            raise ValueError(f"regime detector at {config.model_path}: bar_s is not a multiple of sub_s")
        self._subs_per_bar = model.bar_s // model.sub_s
        self._context, self._block = model.window - model.block, model.block
        self._min_bars = config.min_bars or model.warmup
        if self._min_bars > model.window:
            raise ValueError(f"min_bars {self._min_bars} exceeds the model's window of {model.window} bars")
        self._sampler = CloseSampler(model.sub_s, (model.window + 1) * self._subs_per_bar + 1)
        # Latest ATM IV per bar: a sampler with one bucket per bar, carried forward between surfaces.
        self._iv_sampler = CloseSampler(model.bar_s, model.window + 2) if model.uses_iv else None
        self._maturity = iv_maturity(model.iv_tenor_days) if model.uses_iv else 0.0
        self.last_inputs: np.ndarray | None = None  # raw model inputs of the last run (bars, features)
        self._last_bar = -1  # id of the last bucket of the bar the probability was computed at
        self._n_bars = 0
        self._prob = 0.0
        self._names = (f"{config.instrument}.available", f"{config.instrument}.crash_prob")

    @property
    def event_types(self) -> tuple[type[Event], ...]:
        prices: tuple[type[Event], ...] = (Quote,) if self.config.source == "quote" else (Trade,)
        return (*prices, IVSurface) if self._iv_sampler is not None else prices

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self._names

    def on_event(self, event: Event) -> None:
        if isinstance(event, Quote) and event.instrument == self.config.instrument:
            if event.bid > 0.0 and event.ask > 0.0:
                self._sampler.add(event.ts_recv, event.mid)
        elif isinstance(event, Trade) and event.instrument == self.config.instrument:
            self._sampler.add(event.ts_recv, event.price)
        elif (isinstance(event, IVSurface) and self._iv_sampler is not None
              and event.underlying == self.config.underlying):
            try:
                iv = float(SurfaceSnapshot(event).iv_at(np.zeros(1), self._maturity)[0])
            except ValueError as error:
                log.warning("regime_surface_ignored", underlying=event.underlying, error=str(error))
                return
            self._iv_sampler.add(event.ts_recv, iv)  # a non-positive or non-finite IV is ignored

    def compute(self, now_ns: int) -> dict[str, float]:
        from models.regime import bar_features, model_inputs

        self._sampler.advance(now_ns)
        if self._iv_sampler is not None:
            self._iv_sampler.advance(now_ns)
        bar_end = self._sampler.last_id - (self._sampler.last_id + 1) % self._subs_per_bar
        if bar_end != self._last_bar:
            bar = (bar_end + 1) // self._subs_per_bar - 1
            closes = self._sampler.bar_closes(self._subs_per_bar, bar % self._block + 1 + self._context)
            self._n_bars = (closes.size - 1) // self._subs_per_bar if closes.size else 0
            iv = self._bar_iv(bar, self._n_bars)
            if iv is not None:
                self._n_bars = min(self._n_bars, iv.size)
            if self._n_bars >= 1:
                features, _ = bar_features(closes, self._subs_per_bar, self._detector.config.bar_s)
                n = self._n_bars
                inputs = model_inputs(features[-n:], None if iv is None else iv[-n:], self._detector.features)
                self.last_inputs = inputs
                self._prob = float(self._detector.predict_proba(inputs)[-1])
            self._last_bar = bar_end
        if self._n_bars < self._min_bars:
            return dict.fromkeys(self._names, 0.0)
        return dict(zip(self._names, (1.0, self._prob), strict=True))

    def _bar_iv(self, bar: int, n_bars: int) -> np.ndarray | None:
        """ATM IV at the closes of bars ``bar − n_bars + 1 … bar`` that have one (None: model without IV)."""
        sampler = self._iv_sampler
        if sampler is None:
            return None
        if sampler.last_id < bar or not sampler.closes:  # no surface before this bar ended
            return np.empty(0)
        values = list(sampler.closes)
        end = len(values) - (sampler.last_id - bar)  # closes[end − 1] is bar ``bar``
        return np.array(values[max(0, end - n_bars) : end])
