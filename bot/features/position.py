"""The account's own exposure per instrument: what a cost-aware policy must know to hold still.

A policy that pays fees to trade needs to see where it stands: without its position it
cannot tell "keep this" from "go there", and every small change of its market view turns
into an order. This module reads the portfolio's own events from the bus — the
quantity of each :class:`~bot.events.PositionUpdate` and the equity of each
:class:`~bot.events.PortfolioSnapshot` — and the mid price of each
:class:`~bot.events.Quote`, so a replay recomputes them exactly as the run did.

Local names are ``{instrument}.exposure``: signed quantity × latest mid / latest snapshot
equity, 0.0 while the instrument has no position, no quote or no snapshot yet.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, field_validator

from bot.events import Event, PortfolioSnapshot, PositionUpdate, Quote
from bot.features.base import (
    SYNTHETIC_INSTRUMENTS,
    FeatureModule,
    register_feature_module,
    unique_instrument_ids,
)


class PositionFeaturesConfig(BaseModel):
    """The instruments whose exposure the policy sees."""

    model_config = ConfigDict(extra="forbid")

    instruments: list[str] = Field(default_factory=lambda: list(SYNTHETIC_INSTRUMENTS), min_length=1)

    @field_validator("instruments")
    @classmethod
    def _valid_ids(cls, ids: list[str]) -> list[str]:
        return unique_instrument_ids(ids)


@register_feature_module("position")
class PositionFeatures(FeatureModule):
    """Signed exposure (fraction of equity) of each configured instrument."""

    config_type = PositionFeaturesConfig
    config: PositionFeaturesConfig

    def __init__(self, config: PositionFeaturesConfig) -> None:
        super().__init__(config)
        self._quantity = dict.fromkeys(config.instruments, 0.0)
        self._mid = dict.fromkeys(config.instruments, math.nan)
        self._equity = math.nan
        self._names = tuple(f"{instrument}.exposure" for instrument in config.instruments)

    @property
    def event_types(self) -> tuple[type[Event], ...]:
        return (Quote, PositionUpdate, PortfolioSnapshot)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self._names

    def on_event(self, event: Event) -> None:
        if isinstance(event, Quote):
            if event.instrument in self._mid:
                self._mid[event.instrument] = event.mid
        elif isinstance(event, PositionUpdate):
            if event.instrument in self._quantity:
                self._quantity[event.instrument] = event.quantity
        elif isinstance(event, PortfolioSnapshot):
            self._equity = event.equity

    def compute(self, now_ns: int) -> dict[str, float]:
        equity = self._equity
        values: dict[str, float] = {}
        for instrument, name in zip(self.config.instruments, self._names, strict=True):
            notional = self._quantity[instrument] * self._mid[instrument]
            known = math.isfinite(notional) and math.isfinite(equity) and equity > 0
            values[name] = notional / equity if known else 0.0
        return values
