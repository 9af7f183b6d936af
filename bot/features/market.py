"""Market features per instrument: returns, realised volatility, basis, funding, order flow, book.

Local names are ``{instrument}.{field}``; fields, in order:

- ``ret_{h}`` for each return horizon: ``ln(P(now) / P(now - h))`` from quote mids
  sampled on time buckets (0.0 until the history reaches back ``h``);
- ``rv_{w}`` for each volatility window: annualised realised volatility
  ``sqrt(Σ r² · year / covered time)`` of bucket-to-bucket log returns over the window
  (over the covered part while the history is shorter; 0.0 with fewer than two prices);
- ``ofi_{f}``: signed aggressor volume share ``(buy − sell) / (buy + sell)`` over the
  flow window, in [-1, 1] (0.0 without trades; trades without aggressor are ignored);
- ``book_imbalance``: ``(bid_size − ask_size) / (bid_size + ask_size)`` of the last quote;
- perpetuals only: ``basis`` ``(mid − index) / index`` with the index of the last
  ``MarkPrice``, and ``funding`` the last funding rate per interval (0.0 until known);
- ``history_s``: a lookback ``h <= history_s`` has a known price as of ``now - h`` (capped at
  the longest horizon or window), so a consumer can tell a real zero return from "not known yet".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bot.events import AggressorSide, Event, MarketData, MarkPrice, Quote, Trade
from bot.features.base import (
    NANOS_PER_SECOND,
    SECONDS_PER_YEAR,
    SYNTHETIC_INSTRUMENTS,
    FeatureModule,
    duration_label,
    register_feature_module,
    unique_instrument_ids,
)
from bot.features.history import PriceHistory, VolumeHistory


class MarketFeaturesConfig(BaseModel):
    """Which instruments, and the horizons and windows of their features (seconds)."""

    model_config = ConfigDict(extra="forbid")

    instruments: list[str] = Field(default_factory=lambda: list(SYNTHETIC_INSTRUMENTS), min_length=1)
    perpetuals: list[str] = Field(default_factory=lambda: ["SYNTH:BTCUSDT-PERP", "SYNTH:DOGEUSDT-PERP"])
    return_horizons_s: list[int] = Field(default_factory=lambda: [60, 300, 900, 3600], min_length=1)
    vol_windows_s: list[int] = Field(default_factory=lambda: [300, 3600], min_length=1)
    flow_window_s: int = Field(300, gt=0)
    bucket_s: int = Field(5, gt=0, description="price sampling resolution and realised-vol return step")

    @field_validator("instruments", "perpetuals")
    @classmethod
    def _valid_ids(cls, ids: list[str]) -> list[str]:
        return unique_instrument_ids(ids)

    @field_validator("return_horizons_s", "vol_windows_s")
    @classmethod
    def _positive_unique(cls, values: list[int]) -> list[int]:
        if any(v <= 0 for v in values) or len(set(values)) != len(values):
            raise ValueError(f"horizons and windows must be positive and unique, got {values}")
        return values

    @model_validator(mode="after")
    def _consistent(self) -> MarketFeaturesConfig:
        unknown = [p for p in self.perpetuals if p not in self.instruments]
        if unknown:
            raise ValueError(f"perpetuals {unknown} are not in instruments")
        uneven = [w for w in self.vol_windows_s if w % self.bucket_s]
        if uneven:
            raise ValueError(f"vol windows {uneven} must be multiples of bucket_s={self.bucket_s}")
        return self

    @property
    def lookback_s(self) -> int:
        return max(*self.return_horizons_s, *self.vol_windows_s)


@dataclass
class _InstrumentContext:
    prices: PriceHistory
    flow: VolumeHistory
    mid: float = math.nan
    bid_size: float = 0.0
    ask_size: float = 0.0
    index_price: float = math.nan
    funding_rate: float = 0.0
    perpetual: bool = False


@register_feature_module("market")
class MarketFeatures(FeatureModule):
    """Per-instrument price, volatility, carry and flow features."""

    config_type = MarketFeaturesConfig
    config: MarketFeaturesConfig

    def __init__(self, config: MarketFeaturesConfig) -> None:
        super().__init__(config)
        bucket_ns = config.bucket_s * NANOS_PER_SECOND
        self._contexts: dict[str, _InstrumentContext] = {}
        names: list[str] = []
        for instrument in config.instruments:
            perpetual = instrument in config.perpetuals
            self._contexts[instrument] = _InstrumentContext(
                prices=PriceHistory(bucket_ns, config.lookback_s * NANOS_PER_SECOND),
                flow=VolumeHistory(bucket_ns, config.flow_window_s * NANOS_PER_SECOND),
                perpetual=perpetual,
            )
            names.extend(f"{instrument}.{name}" for name in self._fields(perpetual))
        self._names = tuple(names)

    def _fields(self, perpetual: bool) -> tuple[str, ...]:
        config = self.config
        fields = [f"ret_{duration_label(h)}" for h in config.return_horizons_s]
        fields += [f"rv_{duration_label(w)}" for w in config.vol_windows_s]
        fields += [f"ofi_{duration_label(config.flow_window_s)}", "book_imbalance"]
        if perpetual:
            fields += ["basis", "funding"]
        fields.append("history_s")
        return tuple(fields)

    @property
    def event_types(self) -> tuple[type[Event], ...]:
        return (Quote, Trade, MarkPrice)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self._names

    def on_event(self, event: Event) -> None:
        if not isinstance(event, MarketData):
            return
        context = self._contexts.get(event.instrument)
        if context is None:
            return
        if isinstance(event, Quote):
            if event.bid > 0.0 and event.ask > 0.0:
                context.mid = event.mid
                context.prices.add(event.ts_recv, context.mid)
            context.bid_size, context.ask_size = event.bid_size, event.ask_size
        elif isinstance(event, Trade):
            if event.aggressor_side is AggressorSide.BUY:
                context.flow.add(event.ts_recv, event.size, 0.0)
            elif event.aggressor_side is AggressorSide.SELL:
                context.flow.add(event.ts_recv, 0.0, event.size)
        elif isinstance(event, MarkPrice):
            context.index_price = event.index_price
            context.funding_rate = event.funding_rate

    def compute(self, now_ns: int) -> dict[str, float]:
        values: dict[str, float] = {}
        for instrument, context in self._contexts.items():
            for name, value in self._instrument_values(context, now_ns).items():
                values[f"{instrument}.{name}"] = value
        return values

    def _instrument_values(self, context: _InstrumentContext, now_ns: int) -> dict[str, float]:
        config = self.config
        values: dict[str, float] = {}
        horizons = config.return_horizons_s
        instants = now_ns - NANOS_PER_SECOND * np.array([0, *horizons], dtype=np.int64)
        log_prices = np.log(context.prices.asof(instants))
        for horizon, past in zip(horizons, log_prices[1:], strict=True):
            change = log_prices[0] - past
            values[f"ret_{duration_label(horizon)}"] = float(change) if math.isfinite(change) else 0.0
        bucket_ns = config.bucket_s * NANOS_PER_SECOND
        for window in config.vol_windows_s:
            returns = context.prices.log_returns(now_ns, window * NANOS_PER_SECOND, bucket_ns)
            covered_s = returns.size * config.bucket_s
            variance = float(np.sum(np.square(returns))) * SECONDS_PER_YEAR / covered_s if covered_s else 0.0
            values[f"rv_{duration_label(window)}"] = math.sqrt(variance)
        buy, sell = context.flow.totals(now_ns, config.flow_window_s * NANOS_PER_SECOND)
        total = buy + sell
        values[f"ofi_{duration_label(config.flow_window_s)}"] = (buy - sell) / total if total > 0.0 else 0.0
        depth = context.bid_size + context.ask_size
        values["book_imbalance"] = (context.bid_size - context.ask_size) / depth if depth > 0.0 else 0.0
        if context.perpetual:
            index = context.index_price
            known = index > 0.0 and math.isfinite(context.mid)
            values["basis"] = (context.mid - index) / index if known else 0.0
            values["funding"] = context.funding_rate
        values["history_s"] = min(context.prices.known_span_s(now_ns), float(config.lookback_s))
        return values
