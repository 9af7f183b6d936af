"""Instrument specifications: what is traded, how it settles, and the exchange's precision rules."""

from __future__ import annotations

import math
from collections.abc import Iterator
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, model_validator

from bot.events import split_instrument


class InstrumentKind(StrEnum):
    SPOT = "spot"
    PERP = "perp"
    OPTION = "option"


class InstrumentSpec(BaseModel):
    """One tradable instrument with its precision and minimums (Binance-style filters)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    instrument: str
    kind: InstrumentKind
    base: str
    quote: str = "USDT"
    tick_size: float = Field(gt=0)
    lot_size: float = Field(gt=0)
    min_qty: float = Field(ge=0, default=0.0)
    min_notional: float = Field(ge=0, default=0.0)

    @model_validator(mode="after")
    def _check_id(self) -> InstrumentSpec:
        split_instrument(self.instrument)
        return self

    @property
    def is_perp(self) -> bool:
        return self.kind is InstrumentKind.PERP

    def round_qty_down(self, qty: float) -> float:
        """Largest multiple of the lot size not above ``|qty|``, with the sign of ``qty``."""
        steps = math.floor(abs(qty) / self.lot_size + 1e-9)
        return math.copysign(_snap(steps * self.lot_size, self.lot_size), qty) if steps else 0.0

    def round_price(self, price: float) -> float:
        """Nearest multiple of the tick size."""
        return _snap(round(price / self.tick_size) * self.tick_size, self.tick_size)

    def is_qty_valid(self, qty: float) -> bool:
        return abs(qty) >= self.min_qty and self.round_qty_down(qty) == qty

    def is_price_valid(self, price: float) -> bool:
        return price > 0 and self.round_price(price) == price


def _snap(value: float, step: float) -> float:
    """Remove binary noise so that e.g. 3 * 0.001 prints and compares as 0.003."""
    decimals = max(0, -math.floor(math.log10(step)) + 1)
    return round(value, decimals)


class InstrumentRegistry:
    """Lookup of specs by instrument id; a missing instrument is an error, never a default."""

    def __init__(self, specs: list[InstrumentSpec] | tuple[InstrumentSpec, ...] = ()) -> None:
        self._specs: dict[str, InstrumentSpec] = {}
        for spec in specs:
            self.add(spec)

    def add(self, spec: InstrumentSpec) -> None:
        self._specs[spec.instrument] = spec

    def get(self, instrument: str) -> InstrumentSpec | None:
        return self._specs.get(instrument)

    def __getitem__(self, instrument: str) -> InstrumentSpec:
        try:
            return self._specs[instrument]
        except KeyError:
            raise KeyError(f"unknown instrument {instrument!r}") from None

    def __contains__(self, instrument: object) -> bool:
        return instrument in self._specs

    def __iter__(self) -> Iterator[InstrumentSpec]:
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    @property
    def ids(self) -> list[str]:
        return list(self._specs)
