"""Typed, immutable events: the only thing components exchange.

Every event carries ``ts_event`` (when it happened at its source) and ``ts_recv``
(when this process received or created it), both integer nanoseconds since the
epoch. Instrument ids have the form ``VENUE:SYMBOL``.

Events are ``msgspec`` structs: frozen, slotted and tagged by class name, so one
encoder writes any of them to the journal and one decoder reads them back exactly
(floats round-trip bit for bit through msgspec's JSON). See ``docs/EVENTS.md``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TypeAlias

import msgspec


class Venue(StrEnum):
    """Venues an instrument id may name."""

    BINANCE = "BINANCE"
    BINANCE_USDM = "BINANCE_USDM"
    DERIBIT = "DERIBIT"
    SYNTH = "SYNTH"


def instrument_id(venue: Venue | str, symbol: str) -> str:
    """Build a ``VENUE:SYMBOL`` id."""
    return f"{Venue(venue).value}:{symbol}"


def split_instrument(instrument: str) -> tuple[Venue, str]:
    """Split ``VENUE:SYMBOL`` into its venue and symbol; ValueError when malformed."""
    venue, sep, symbol = instrument.partition(":")
    if not sep or not symbol:
        raise ValueError(f"instrument id must look like VENUE:SYMBOL, got {instrument!r}")
    return Venue(venue), symbol


class Side(StrEnum):
    BUY = "BUY"
    SELL = "SELL"


class AggressorSide(StrEnum):
    BUY = "BUY"
    SELL = "SELL"
    NONE = "NONE"


class OrderType(StrEnum):
    MARKET = "MARKET"
    LIMIT = "LIMIT"


class OrderStatus(StrEnum):
    NEW = "NEW"
    ACCEPTED = "ACCEPTED"
    PARTIALLY_FILLED = "PARTIALLY_FILLED"
    FILLED = "FILLED"
    CANCELLED = "CANCELLED"
    REJECTED = "REJECTED"

    @property
    def is_open(self) -> bool:
        return self in (OrderStatus.NEW, OrderStatus.ACCEPTED, OrderStatus.PARTIALLY_FILLED)


class Liquidity(StrEnum):
    MAKER = "MAKER"
    TAKER = "TAKER"


class FeedState(StrEnum):
    CONNECTED = "CONNECTED"
    STALE = "STALE"
    GAP = "GAP"
    RECOVERED = "RECOVERED"
    DISCONNECTED = "DISCONNECTED"


class RiskState(StrEnum):
    """Trading state of the risk engine: ACTIVE → REDUCING → HALTED, never backwards on its own."""

    ACTIVE = "ACTIVE"
    REDUCING = "REDUCING"
    HALTED = "HALTED"


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag=True):
    """Base of every event."""

    ts_event: int
    ts_recv: int


# --- market data (inbound from adapters; journalled) -------------------------------------------


class MarketData(Event, frozen=True, kw_only=True):
    """Base of market-data events; these are the ones the live bus may conflate."""

    instrument: str


class Trade(MarketData, frozen=True, kw_only=True):
    price: float
    size: float
    aggressor_side: AggressorSide
    trade_id: str


class Quote(MarketData, frozen=True, kw_only=True):
    """Top of book."""

    bid: float
    bid_size: float
    ask: float
    ask_size: float

    @property
    def mid(self) -> float:
        return 0.5 * (self.bid + self.ask)


class MarkPrice(MarketData, frozen=True, kw_only=True):
    """Perpetual mark and index price with the current funding rate (per 8 h interval, decimal)."""

    mark_price: float
    index_price: float
    funding_rate: float
    next_funding_ts: int


class Bar(MarketData, frozen=True, kw_only=True):
    interval_s: int
    open: float
    high: float
    low: float
    close: float
    volume: float
    closed: bool = True


class OptionMark(MarketData, frozen=True, kw_only=True):
    """One option's mark; IVs are decimals (0.65 means 65 %)."""

    underlying: str
    strike: float
    expiry_ts: int
    is_call: bool
    mark_price: float
    mark_iv: float
    bid_iv: float | None = None
    ask_iv: float | None = None
    underlying_price: float
    index_price: float | None = None


class VolatilityIndex(MarketData, frozen=True, kw_only=True):
    """A volatility index such as Deribit's DVOL (decimal)."""

    value: float


class IVSurface(Event, frozen=True, kw_only=True):
    """IV surface: ``iv[i][j]`` at ``log_moneyness[i]`` (ln K/F) and ``maturities[j]`` (years)."""

    underlying: str
    spot: float
    log_moneyness: tuple[float, ...]
    maturities: tuple[float, ...]
    iv: tuple[tuple[float, ...], ...]
    fit_rmse: float | None = None
    source: str = ""


class RegimeLabel(Event, frozen=True, kw_only=True):
    """True regime of a synthetic market: for evaluation only, never a feature input."""

    underlying: str
    regime: int
    name: str


class FeedStatus(Event, frozen=True, kw_only=True):
    feed: str
    status: FeedState
    detail: str = ""


class Heartbeat(Event, frozen=True, kw_only=True):
    """Keeps event time moving when no market data arrives (journalled like any input)."""

    source: str = "clock"


# --- decisions, orders and account (created inside the engine) ---------------------------------


class TargetExposure(Event, frozen=True, kw_only=True):
    """A policy's wish: signed exposure as a fraction of equity, in [-1, 1]."""

    instrument: str
    target: float
    policy: str


class OrderIntent(Event, frozen=True, kw_only=True):
    """An order the order manager wants to send; it reaches a venue only if the risk engine approves."""

    client_order_id: str
    instrument: str
    side: Side
    quantity: float
    order_type: OrderType = OrderType.MARKET
    limit_price: float | None = None
    reduce_only: bool = False
    reason: str = ""


class RiskDecision(Event, frozen=True, kw_only=True):
    """The risk engine's verdict on one intent; ``reason`` is a RiskReason code when rejected."""

    client_order_id: str
    instrument: str
    approved: bool
    reason: str
    detail: str = ""
    risk_state: RiskState = RiskState.ACTIVE


class RiskStateChanged(Event, frozen=True, kw_only=True):
    previous: RiskState
    current: RiskState
    reason: str
    drawdown: float


class SubmitOrder(Event, frozen=True, kw_only=True):
    """Command to a venue: send this approved order."""

    intent: OrderIntent


class CancelOrder(Event, frozen=True, kw_only=True):
    client_order_id: str
    instrument: str


class OrderUpdate(Event, frozen=True, kw_only=True):
    client_order_id: str
    instrument: str
    status: OrderStatus
    venue_order_id: str = ""
    filled_qty: float = 0.0
    avg_price: float = 0.0
    reason: str = ""


class Fill(Event, frozen=True, kw_only=True):
    client_order_id: str
    instrument: str
    side: Side
    quantity: float
    price: float
    fee: float
    fee_currency: str = "USDT"
    liquidity: Liquidity = Liquidity.TAKER
    trade_id: str = ""

    @property
    def signed_quantity(self) -> float:
        return self.quantity if self.side is Side.BUY else -self.quantity


class FundingPayment(Event, frozen=True, kw_only=True):
    """Funding settled on a perpetual position: ``amount`` > 0 is received, < 0 is paid."""

    instrument: str
    funding_rate: float
    mark_price: float
    position_qty: float
    amount: float


class PositionUpdate(Event, frozen=True, kw_only=True):
    instrument: str
    quantity: float
    avg_price: float
    realized_pnl: float
    unrealized_pnl: float


class PortfolioSnapshot(Event, frozen=True, kw_only=True):
    """Equity marked to market; the store's ``equity`` table is made of these."""

    equity: float
    cash: float
    unrealized_pnl: float
    realized_pnl: float
    fees: float
    funding: float
    gross_exposure: float


# Events that enter the engine from outside (adapters, clock): journalled and replayed.
InboundEvent: TypeAlias = (
    Trade
    | Quote
    | MarkPrice
    | Bar
    | OptionMark
    | VolatilityIndex
    | IVSurface
    | RegimeLabel
    | FeedStatus
    | Heartbeat
)
INBOUND_TYPES: tuple[type[Event], ...] = (
    Trade,
    Quote,
    MarkPrice,
    Bar,
    OptionMark,
    VolatilityIndex,
    IVSurface,
    RegimeLabel,
    FeedStatus,
    Heartbeat,
)
# Events the engine must never drop under load.
CONTROL_TYPES: tuple[type[Event], ...] = (
    OrderIntent,
    RiskDecision,
    SubmitOrder,
    CancelOrder,
    OrderUpdate,
    Fill,
    FundingPayment,
    FeedStatus,
    Heartbeat,
)

AnyEvent: TypeAlias = (
    InboundEvent
    | TargetExposure
    | OrderIntent
    | RiskDecision
    | RiskStateChanged
    | SubmitOrder
    | CancelOrder
    | OrderUpdate
    | Fill
    | FundingPayment
    | PositionUpdate
    | PortfolioSnapshot
)

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AnyEvent)


def encode(event: Event) -> bytes:
    """One event as a JSON object tagged with its class name under ``type``."""
    return _encoder.encode(event)


def decode(data: bytes | str) -> Event:
    """Inverse of :func:`encode`."""
    return _decoder.decode(data)
