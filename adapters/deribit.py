"""Deribit options: raw JSON-RPC messages in, option marks, DVOL and a fitted SVI surface out.

From pure to live:

- :func:`parse_message` turns one raw websocket message into events. ``ticker.<option>.<interval>``
  → :class:`OptionMark` (IVs from Deribit's percent to decimals, ``bid_iv``/``ask_iv`` None when
  Deribit sends 0 or nothing); futures tickers → :class:`Quote` when both sides are quoted, plus
  :class:`MarkPrice` for perpetuals; ``quote.*`` → :class:`Quote`; ``trades.*`` → :class:`Trade`;
  ``chart.trades.*`` → :class:`Bar` (the candle in progress, ``closed=False``);
  ``deribit_volatility_index.<index>`` → :class:`VolatilityIndex` (DVOL, decimal). ``book.*``,
  heartbeats and JSON-RPC responses give no event: a raw book needs local state to yield a top of
  book, and the ticker already carries it. Anything malformed, truncated or unknown raises
  :class:`ParseError`.
- :class:`SurfaceBuilder` keeps the latest mark per option and, every ``surface_interval_s`` of
  event time, fits :func:`models.svi.fit_surface` to the out-of-the-money marks and emits an
  :class:`IVSurface` on the project grid.
- :class:`DeribitFeed` runs the websocket (through :mod:`adapters.connection`): heartbeats,
  instrument discovery, subscriptions, duplicate suppression and the surface builder.

Conventions: ids are ``DERIBIT:<instrument_name>``; ``ts_event`` is Deribit's ``timestamp`` (ms)
in ns; an option expires at 08:00 UTC of the date in its name, when Deribit settles; option
prices are in the underlying coin (BTC for BTC options), as sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec
import numpy as np
import structlog
from pydantic import BaseModel, ConfigDict, Field, model_validator
from websockets.exceptions import ConnectionClosed

from adapters.connection import ConnectionConfig, MessageError, ResilientWebSocket, _Link
from bot.events import (
    AggressorSide,
    Bar,
    Event,
    IVSurface,
    MarkPrice,
    OptionMark,
    Quote,
    Trade,
    Venue,
    VolatilityIndex,
    instrument_id,
)
from models import grid
from models.svi import SurfaceFit, fit_surface

log = structlog.get_logger("adapters.deribit")

NANOS_PER_MILLI = 1_000_000
NANOS_PER_SECOND = 1_000_000_000
NANOS_PER_DAY = 86_400 * NANOS_PER_SECOND
# The project grid counts a year as 365 days (models.grid.MATURITIES = days / 365).
NANOS_PER_YEAR = 365 * NANOS_PER_DAY
SETTLEMENT_HOUR_UTC = 8
# Deribit accrues perpetual funding continuously and reports ``funding_8h``, the rate over the
# trailing 8 h; settling that rate on the 8-hour grid charges the same total at a coarser step.
FUNDING_INTERVAL_NS = 8 * 3_600 * NANOS_PER_SECOND
DEFAULT_URL = "wss://www.deribit.com/ws/api/v2"
_MONTHS = {
    month: number
    for number, month in enumerate(
        ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"), 1
    )
}
_OPTION_NAME = re.compile(
    r"(?P<underlying>[A-Z0-9_]+)-(?P<day>\d{1,2})(?P<month>[A-Z]{3})(?P<year>\d{2})"
    r"-(?P<strike>\d+(?:d\d+)?)-(?P<right>[CP])"
)
_FUTURE_NAME = re.compile(r"[A-Z0-9_]+-(?:PERPETUAL|\d{1,2}[A-Z]{3}\d{2})")


class ParseError(MessageError):
    """A Deribit message that is malformed, truncated or of an unknown kind."""


# --- instrument names ---------------------------------------------------------------------------


@dataclass(frozen=True)
class OptionName:
    """What a Deribit option's name says: ``BTC-25JUN21-40000-C`` (``d`` marks a decimal strike)."""

    underlying: str
    expiry_ts: int
    strike: float
    is_call: bool


def parse_option_name(name: str) -> OptionName | None:
    """The option a Deribit instrument name denotes; None when it is not an option's name."""
    match = _OPTION_NAME.fullmatch(name)
    if match is None:
        return None
    month = _MONTHS.get(match["month"])
    if month is None:
        return None
    try:
        year, day = 2000 + int(match["year"]), int(match["day"])
        expiry = datetime(year, month, day, SETTLEMENT_HOUR_UTC, tzinfo=UTC)
    except ValueError:  # a day the month does not have
        return None
    return OptionName(
        underlying=match["underlying"],
        expiry_ts=int(expiry.timestamp()) * NANOS_PER_SECOND,
        strike=float(match["strike"].replace("d", ".")),
        is_call=match["right"] == "C",
    )


# --- payloads as Deribit sends them -------------------------------------------------------------


class _Payload(msgspec.Struct, frozen=True, kw_only=True):
    """Only the fields used are declared; others are ignored, so additive API changes do not break us."""


class _Params(_Payload, frozen=True, kw_only=True):
    channel: str | None = None
    data: msgspec.Raw = msgspec.Raw()
    type: str | None = None  # heartbeat notifications: "heartbeat" or "test_request"


class RpcError(_Payload, frozen=True, kw_only=True):
    code: int
    message: str


class Envelope(_Payload, frozen=True, kw_only=True):
    """One JSON-RPC 2.0 frame: a notification (``method``) or a response (``id`` with result or error)."""

    jsonrpc: Literal["2.0"]
    id: int | str | None = None
    method: str | None = None
    params: _Params | None = None
    result: msgspec.Raw = msgspec.Raw()
    error: RpcError | None = None

    @property
    def is_response(self) -> bool:
        return self.method is None

    @property
    def is_test_request(self) -> bool:
        """Deribit's heartbeat probe, which closes the connection unless answered with ``public/test``."""
        return self.method == "heartbeat" and self.params is not None and self.params.type == "test_request"


class _OptionTicker(_Payload, frozen=True, kw_only=True):
    timestamp: int
    instrument_name: str
    mark_price: float
    mark_iv: float
    underlying_price: float
    index_price: float | None = None
    bid_iv: float | None = None
    ask_iv: float | None = None


class _FutureTicker(_Payload, frozen=True, kw_only=True):
    timestamp: int
    instrument_name: str
    mark_price: float
    index_price: float
    best_bid_price: float | None = None
    best_bid_amount: float | None = None
    best_ask_price: float | None = None
    best_ask_amount: float | None = None
    funding_8h: float | None = None


class _BestQuote(_Payload, frozen=True, kw_only=True):
    timestamp: int
    instrument_name: str
    best_bid_price: float | None = None
    best_bid_amount: float | None = None
    best_ask_price: float | None = None
    best_ask_amount: float | None = None


class _TradeRow(_Payload, frozen=True, kw_only=True):
    timestamp: int
    instrument_name: str
    price: float
    amount: float
    direction: Literal["buy", "sell"]
    trade_id: str


class _Candle(_Payload, frozen=True, kw_only=True):
    tick: int
    open: float
    high: float
    low: float
    close: float
    volume: float


class _VolatilityIndex(_Payload, frozen=True, kw_only=True):
    timestamp: int
    volatility: float
    index_name: str


_ENVELOPE = msgspec.json.Decoder(Envelope)
_OPTION_TICKER = msgspec.json.Decoder(_OptionTicker)
_FUTURE_TICKER = msgspec.json.Decoder(_FutureTicker)
_BEST_QUOTE = msgspec.json.Decoder(_BestQuote)
_TRADES = msgspec.json.Decoder(list[_TradeRow])
_CANDLE = msgspec.json.Decoder(_Candle)
_VOLATILITY_INDEX = msgspec.json.Decoder(_VolatilityIndex)


# --- parsing ------------------------------------------------------------------------------------


def decode_envelope(raw: str | bytes) -> Envelope:
    """Check one frame's JSON-RPC shape; the channel payload stays raw until :func:`to_events`."""
    try:
        return _ENVELOPE.decode(raw)
    except msgspec.DecodeError as exc:
        raise ParseError(f"not a JSON-RPC 2.0 frame: {exc}") from None


def parse_message(raw: str | bytes, ts_recv: int | None = None) -> list[Event]:
    """The events one raw message stands for; ``ts_recv`` defaults to now."""
    return to_events(decode_envelope(raw), time.time_ns() if ts_recv is None else ts_recv)


def to_events(envelope: Envelope, ts_recv: int) -> list[Event]:
    """The events of one decoded frame: responses and heartbeats give none."""
    if envelope.is_response:
        if envelope.id is None and envelope.error is None:
            raise ParseError("frame is neither a notification nor a response")
        return []
    if envelope.method == "heartbeat":
        return []
    if envelope.method != "subscription":
        raise ParseError(f"unknown method {envelope.method!r}")
    params = envelope.params
    if params is None or params.channel is None or not params.data:
        raise ParseError("subscription notification without channel or data")
    kind, _, rest = params.channel.partition(".")
    parser = _CHANNEL_PARSERS.get(kind)
    if parser is None:
        raise ParseError(f"unknown channel {params.channel!r}")
    try:
        return parser(rest, params.data, ts_recv)
    except msgspec.DecodeError as exc:
        raise ParseError(f"invalid {params.channel} data: {exc}") from None


def _ticker(rest: str, data: msgspec.Raw, ts_recv: int) -> list[Event]:
    """``ticker.<instrument>.<interval>``: an option's mark, or a future's quote (and funding)."""
    name = rest.rpartition(".")[0]
    option = parse_option_name(name)
    if option is not None:
        ticker = _OPTION_TICKER.decode(data)
        _check_instrument(name, ticker.instrument_name)
        return [
            OptionMark(
                ts_event=ticker.timestamp * NANOS_PER_MILLI,
                ts_recv=ts_recv,
                instrument=instrument_id(Venue.DERIBIT, name),
                underlying=option.underlying,
                strike=option.strike,
                expiry_ts=option.expiry_ts,
                is_call=option.is_call,
                mark_price=ticker.mark_price,
                mark_iv=ticker.mark_iv / 100.0,
                bid_iv=_quoted_iv(ticker.bid_iv),
                ask_iv=_quoted_iv(ticker.ask_iv),
                underlying_price=ticker.underlying_price,
                index_price=ticker.index_price,
            )
        ]
    if _FUTURE_NAME.fullmatch(name) is None:
        raise ParseError(f"ticker of unsupported instrument {name!r}")
    future = _FUTURE_TICKER.decode(data)
    _check_instrument(name, future.instrument_name)
    ts_event = future.timestamp * NANOS_PER_MILLI
    events: list[Event] = _two_sided_quote(future, ts_event, ts_recv)
    if name.endswith("-PERPETUAL"):
        if future.funding_8h is None:
            raise ParseError(f"perpetual ticker of {name} without funding_8h")
        events.append(
            MarkPrice(
                ts_event=ts_event,
                ts_recv=ts_recv,
                instrument=instrument_id(Venue.DERIBIT, name),
                mark_price=future.mark_price,
                index_price=future.index_price,
                funding_rate=future.funding_8h,
                next_funding_ts=(ts_event // FUNDING_INTERVAL_NS + 1) * FUNDING_INTERVAL_NS,
            )
        )
    return events


def _quote(rest: str, data: msgspec.Raw, ts_recv: int) -> list[Event]:
    """``quote.<instrument>``: best bid and ask."""
    quote = _BEST_QUOTE.decode(data)
    _check_instrument(rest, quote.instrument_name)
    return _two_sided_quote(quote, quote.timestamp * NANOS_PER_MILLI, ts_recv)


def _trades(rest: str, data: msgspec.Raw, ts_recv: int) -> list[Event]:
    """``trades.<instrument>.<interval>`` (or ``trades.<kind>.<currency>.<interval>``): a batch of trades."""
    return [
        Trade(
            ts_event=row.timestamp * NANOS_PER_MILLI,
            ts_recv=ts_recv,
            instrument=instrument_id(Venue.DERIBIT, row.instrument_name),
            price=row.price,
            size=row.amount,
            aggressor_side=AggressorSide.BUY if row.direction == "buy" else AggressorSide.SELL,
            trade_id=row.trade_id,
        )
        for row in _TRADES.decode(data)
    ]


def _chart(rest: str, data: msgspec.Raw, ts_recv: int) -> list[Event]:
    """``chart.trades.<instrument>.<resolution>``: the candle in progress, stamped with its start."""
    source, _, name_and_resolution = rest.partition(".")
    name, _, resolution = name_and_resolution.rpartition(".")
    if source != "trades" or not name:
        raise ParseError(f"unknown chart channel chart.{rest}")
    if resolution == "1D":
        interval_s = 86_400
    elif resolution.isdigit():
        interval_s = int(resolution) * 60
    else:
        raise ParseError(f"unknown chart resolution {resolution!r}")
    candle = _CANDLE.decode(data)
    ts_event = candle.tick * NANOS_PER_MILLI
    return [
        Bar(
            ts_event=ts_event,
            ts_recv=ts_recv,
            instrument=instrument_id(Venue.DERIBIT, name),
            interval_s=interval_s,
            open=candle.open,
            high=candle.high,
            low=candle.low,
            close=candle.close,
            volume=candle.volume,
            closed=False,
        )
    ]


def _volatility_index(rest: str, data: msgspec.Raw, ts_recv: int) -> list[Event]:
    """``deribit_volatility_index.<index>`` (DVOL, percent): ``btc_usd`` → ``DERIBIT:BTC-DVOL``."""
    index = _VOLATILITY_INDEX.decode(data)
    if index.index_name != rest:
        raise ParseError(f"DVOL of {index.index_name!r} on channel of {rest!r}")
    currency = index.index_name.partition("_")[0].upper()
    return [
        VolatilityIndex(
            ts_event=index.timestamp * NANOS_PER_MILLI,
            ts_recv=ts_recv,
            instrument=instrument_id(Venue.DERIBIT, f"{currency}-DVOL"),
            value=index.volatility / 100.0,
        )
    ]


def _book(rest: str, data: msgspec.Raw, ts_recv: int) -> list[Event]:
    """``book.*``: no event; a raw book's top needs local state, and the ticker already carries it."""
    return []


_CHANNEL_PARSERS: dict[str, Callable[[str, msgspec.Raw, int], list[Event]]] = {
    "ticker": _ticker,
    "quote": _quote,
    "trades": _trades,
    "chart": _chart,
    "deribit_volatility_index": _volatility_index,
    "book": _book,
}


def _check_instrument(channel_name: str, data_name: str) -> None:
    if channel_name != data_name:
        raise ParseError(f"data of {data_name!r} on the channel of {channel_name!r}")


def _quoted_iv(percent: float | None) -> float | None:
    """Deribit sends 0 (or nothing) for the IV of an empty side."""
    return None if percent is None or percent == 0.0 else percent / 100.0


def _two_sided_quote(book: _BestQuote | _FutureTicker, ts_event: int, ts_recv: int) -> list[Event]:
    """A Quote when both sides are quoted; an empty side (0 or null) makes no top of book."""
    bid, ask = book.best_bid_price, book.best_ask_price
    if not bid or not ask:
        return []
    return [
        Quote(
            ts_event=ts_event,
            ts_recv=ts_recv,
            instrument=instrument_id(Venue.DERIBIT, book.instrument_name),
            bid=bid,
            bid_size=book.best_bid_amount or 0.0,
            ask=ask,
            ask_size=book.best_ask_amount or 0.0,
        )
    ]


# --- IV surface ---------------------------------------------------------------------------------


class SurfaceConfig(BaseModel):
    """Which marks make a surface and how often one is fitted."""

    model_config = ConfigDict(extra="forbid")

    underlying: str = "BTC"
    surface_interval_s: float = Field(60.0, gt=0, description="event time between two fitted surfaces")
    min_expiry_days: float = Field(
        7.0,
        ge=0,
        description="nearer expiries are left out: sub-week smiles are not SVI-shaped and the grid starts "
        "at 30 days",
    )
    max_mark_age_s: float = Field(300.0, gt=0, description="older marks are stale and left out")
    min_quotes_per_expiry: int = Field(5, ge=1, description="an expiry with fewer usable marks is left out")
    min_spread_iv: float = Field(
        0.005, gt=0, description="floor of the bid/ask IV width in the weights (0.005 = half a vol point)"
    )


@dataclass(frozen=True)
class SmileQuotes:
    """The marks a surface is fitted to, as flat arrays: one entry per out-of-the-money option."""

    maturities: np.ndarray
    log_moneyness: np.ndarray
    ivs: np.ndarray
    weights: np.ndarray
    expiries: int
    spot: float


class SurfaceBuilder:
    """The latest mark per option in, an SVI-fitted :class:`IVSurface` per ``surface_interval_s`` out.

    Selection at surface time ``now``: marks of ``config.underlying``, not older than
    ``max_mark_age_s``, with at least ``min_expiry_days`` to expiry, out of the money (puts below
    the forward, calls at or above it; the forward is the mark's ``underlying_price``, Deribit's
    forward of that expiry, which is also what its IV was computed against, so k = ln(K/F) and
    the IV agree) and quoted on both sides (``bid_iv`` and ``ask_iv``). Expiries with fewer than
    ``min_quotes_per_expiry`` such marks are left out. T = (expiry − now) in 365-day years.

    Weights: 1 / max(ask_iv − bid_iv, ``min_spread_iv``), so a tight market pins the fit and a
    wide one, where the mark is Deribit's model rather than a market, gives way. Inverse
    variance (1/width²) lets the few tightest at-the-money quotes dictate the wings: on the
    2020-05-14 chain it fits the marks to 0.91 vol points RMS against 0.74 for 1/width.

    The cadence follows event time (the marks' ``ts_event``): a surface is fitted at the first
    mark at or past each multiple of ``surface_interval_s`` since the epoch, so a replay of the
    same messages gives the same surfaces. A fit takes ~50 ms for a full BTC chain. ``spot`` is
    the index price of the latest mark held (its forward when a venue sends no index).
    """

    def __init__(self, config: SurfaceConfig | None = None) -> None:
        self.config = config if config is not None else SurfaceConfig()
        self._marks: dict[str, OptionMark] = {}
        self._interval_ns = round(self.config.surface_interval_s * NANOS_PER_SECOND)
        self._next_due_ns: int | None = None
        self.last_fit: SurfaceFit | None = None

    def on_mark(self, mark: OptionMark) -> IVSurface | None:
        """Keep ``mark`` (unless an older one) and return a surface when one is due."""
        if mark.underlying != self.config.underlying:
            return None
        previous = self._marks.get(mark.instrument)
        if previous is None or mark.ts_event >= previous.ts_event:
            self._marks[mark.instrument] = mark
        now = mark.ts_event
        if self._next_due_ns is None:
            self._next_due_ns = -(-now // self._interval_ns) * self._interval_ns
        if now < self._next_due_ns:
            return None
        self._next_due_ns = (now // self._interval_ns + 1) * self._interval_ns
        return self.build(now, mark.ts_recv)

    def quotes(self, now_ns: int) -> SmileQuotes | None:
        """The usable marks at ``now_ns``; None when no expiry has enough. Forgets expired options."""
        config = self.config
        for name in [name for name, mark in self._marks.items() if mark.expiry_ts <= now_ns]:
            del self._marks[name]
        oldest_ns = now_ns - round(config.max_mark_age_s * NANOS_PER_SECOND)
        nearest_expiry_ns = now_ns + round(config.min_expiry_days * NANOS_PER_DAY)
        by_expiry: dict[int, list[tuple[float, float, float]]] = {}
        for mark in self._marks.values():
            if mark.ts_event < oldest_ns or mark.expiry_ts < nearest_expiry_ns:
                continue
            if mark.bid_iv is None or mark.ask_iv is None or mark.mark_iv <= 0.0:
                continue
            k = math.log(mark.strike / mark.underlying_price)
            if mark.is_call != (k >= 0.0):
                continue
            weight = 1.0 / max(mark.ask_iv - mark.bid_iv, config.min_spread_iv)
            by_expiry.setdefault(mark.expiry_ts, []).append((k, mark.mark_iv, weight))
        usable = {
            expiry_ts: members
            for expiry_ts, members in by_expiry.items()
            if len(members) >= config.min_quotes_per_expiry
        }
        if not usable:
            return None
        rows = [
            ((expiry_ts - now_ns) / NANOS_PER_YEAR, k, iv, weight)
            for expiry_ts, members in usable.items()
            for k, iv, weight in members
        ]
        latest = max(self._marks.values(), key=lambda mark: mark.ts_event)
        t, k, iv, weight = (np.array(column) for column in zip(*rows, strict=True))
        return SmileQuotes(
            maturities=t,
            log_moneyness=k,
            ivs=iv,
            weights=weight,
            expiries=len(usable),
            spot=latest.index_price if latest.index_price is not None else latest.underlying_price,
        )

    def build(self, now_ns: int, ts_recv: int | None = None) -> IVSurface | None:
        """Fit the surface of the marks held at ``now_ns``; None when too few are usable."""
        quotes = self.quotes(now_ns)
        if quotes is None:
            log.info("surface_skipped", underlying=self.config.underlying, options=len(self._marks))
            return None
        fit = fit_surface(quotes.maturities, quotes.log_moneyness, quotes.ivs, quotes.weights)
        self.last_fit = fit
        # The quotes' own arbitrage shows in the flags rather than being fitted away (models.svi).
        report = log.info if fit.butterfly_free and fit.calendar_free else log.warning
        report(
            "surface_fitted",
            underlying=self.config.underlying,
            expiries=quotes.expiries,
            quotes=quotes.ivs.size,
            rmse_iv=round(fit.rmse_iv, 5),
            butterfly_free=fit.butterfly_free,
            calendar_free=fit.calendar_free,
        )
        return IVSurface(
            ts_event=now_ns,
            ts_recv=now_ns if ts_recv is None else ts_recv,
            underlying=self.config.underlying,
            spot=quotes.spot,
            log_moneyness=tuple(grid.LOG_MONEYNESS.tolist()),
            maturities=tuple(grid.MATURITIES.tolist()),
            iv=tuple(tuple(row) for row in fit.iv_grid.tolist()),
            fit_rmse=fit.rmse_iv,
            source="deribit-svi",
        )


# --- live feed ----------------------------------------------------------------------------------


class DeribitFeedConfig(BaseModel):
    """Where to connect and what to subscribe to; the surface's underlying must be the currency."""

    model_config = ConfigDict(extra="forbid")

    url: str = DEFAULT_URL
    currency: str = "BTC"
    ticker_interval: Literal["raw", "100ms", "agg2"] = Field(
        "100ms", description="option ticker channel interval; raw needs an authorised connection"
    )
    heartbeat_interval_s: int = Field(
        30, ge=10, description="Deribit's test_request period (public/set_heartbeat; at least 10 s)"
    )
    instruments_refresh_s: float = Field(
        3_600.0, gt=0, description="how often the option list is fetched again, to subscribe new listings"
    )
    connection: ConnectionConfig = Field(default_factory=ConnectionConfig)
    surface: SurfaceConfig = Field(default_factory=SurfaceConfig)

    @model_validator(mode="after")
    def _surface_of_the_currency(self) -> DeribitFeedConfig:
        if self.surface.underlying != self.currency:
            raise ValueError(
                f"surface.underlying {self.surface.underlying!r} is not the feed's currency {self.currency!r}"
            )
        return self


@dataclass
class DeribitFeedStats:
    """Counters for status lines and tests; connection-level ones live in ``ResilientWebSocket.stats``."""

    events: int = 0
    duplicates: int = 0
    surfaces: int = 0
    test_requests: int = 0
    rpc_errors: int = 0
    subscribed_options: int = 0


class _Instrument(_Payload, frozen=True, kw_only=True):
    instrument_name: str
    kind: str
    is_active: bool = True


_INSTRUMENTS = msgspec.json.Decoder(list[_Instrument])
_ENCODER = msgspec.json.Encoder()
# Requests whose response died with its connection would otherwise be remembered forever.
_MAX_PENDING_REQUESTS = 1_024
# Events that supersede the previous one of their instrument: one that is not newer is a duplicate.
_SNAPSHOT_TYPES = (OptionMark, Quote, MarkPrice, VolatilityIndex)

EventSink = Callable[[Event], None]


class _RepliableWebSocket(ResilientWebSocket):
    """A :class:`ResilientWebSocket` that can also send while connected.

    Deribit needs it: a ``test_request`` must be answered on the connection, and the option list
    arrives as a response after which the subscription is sent. ``adapters.connection`` has no
    public send yet, so this keeps the links it opens and sends on the newest one still open
    (during a planned handover that is the successor, which takes over within the overlap).
    """

    def __init__(self, name: str, url: str, **kwargs: Any) -> None:
        super().__init__(name, url, **kwargs)
        self._open_links: list[_Link] = []
        self._sending: set[asyncio.Task[None]] = set()

    async def _open(self) -> _Link:
        link = await super()._open()
        self._open_links = [*self._live_links(), link]
        return link

    def _live_links(self) -> list[_Link]:
        return [link for link in self._open_links if not link.reader.done()]

    def send(self, message: str) -> bool:
        """Queue ``message`` on the newest open connection; False when none is open (the next
        connection's subscribe messages then stand in for it)."""
        self._open_links = self._live_links()
        if not self._open_links:
            return False
        task = asyncio.get_running_loop().create_task(self._send(self._open_links[-1], message))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)
        return True

    @staticmethod
    async def _send(link: _Link, message: str) -> None:
        with contextlib.suppress(ConnectionClosed):
            await link.ws.send(message)


class DeribitFeed:
    """Live Deribit option marks, DVOL and SVI surfaces into ``sink`` (an ``InboundQueue.put_nowait``).

    On every (re)connection it sends ``public/set_heartbeat``, one ``public/subscribe`` for DVOL and
    the option tickers already known, and ``public/get_instruments`` (options of ``currency``, not
    expired); the response subscribes the options not yet subscribed, again every
    ``instruments_refresh_s`` so new listings join. Each heartbeat ``test_request`` is answered
    with ``public/test``. A mark, quote or index value not newer than the last one of its
    instrument (a frame delivered twice around a reconnect or handover) is dropped. Every
    OptionMark also feeds the :class:`SurfaceBuilder`, whose surfaces follow their mark into
    ``sink``; the fit (~50 ms a minute) runs inline, well inside the heartbeat period.
    Reconnects, the stale timer and FeedStatus come from :class:`ResilientWebSocket`. Run
    :meth:`run` as a task; cancel it to stop.
    """

    def __init__(self, config: DeribitFeedConfig, sink: EventSink) -> None:
        self.config = config
        self.sink = sink
        self.surfaces = SurfaceBuilder(config.surface)
        self.stats = DeribitFeedStats()
        self.websocket = _RepliableWebSocket(
            "deribit",
            config.url,
            on_message=self.on_message,
            emit_status=sink,
            subscribe=self._session_messages,
            config=config.connection,
        )
        self._volatility_channel = f"deribit_volatility_index.{config.currency.lower()}_usd"
        self._option_channels: set[str] = set()
        self._latest_ts: dict[tuple[type[Event], str], int] = {}
        self._requests: OrderedDict[int, str] = OrderedDict()
        self._request_id = 0
        self._refresh_ns = round(config.instruments_refresh_s * NANOS_PER_SECOND)
        self._next_refresh_ns = 0
        self._log = log.bind(feed=self.websocket.name)

    async def run(self) -> None:
        await self.websocket.run()

    def _request(self, method: str, params: dict[str, object]) -> str:
        """A JSON-RPC request, remembered by id so its response can be routed."""
        self._request_id += 1
        self._requests[self._request_id] = method
        while len(self._requests) > _MAX_PENDING_REQUESTS:
            self._requests.popitem(last=False)
        message = {"jsonrpc": "2.0", "id": self._request_id, "method": method, "params": params}
        return _ENCODER.encode(message).decode()

    def _instruments_request(self) -> str:
        self._next_refresh_ns = time.time_ns() + self._refresh_ns
        params = {"currency": self.config.currency, "kind": "option", "expired": False}
        return self._request("public/get_instruments", params)

    def _session_messages(self) -> list[str]:
        channels = [self._volatility_channel, *sorted(self._option_channels)]
        return [
            self._request("public/set_heartbeat", {"interval": self.config.heartbeat_interval_s}),
            self._request("public/subscribe", {"channels": channels}),
            self._instruments_request(),
        ]

    def on_message(self, raw: str | bytes, ts_recv: int) -> None:
        """Handle one frame: answer probes, route responses, publish events."""
        envelope = decode_envelope(raw)
        if envelope.is_test_request:
            self.stats.test_requests += 1
            self.websocket.send(self._request("public/test", {}))
        if envelope.is_response:
            self._on_response(envelope)
        else:
            for event in to_events(envelope, ts_recv):
                self._publish(event)
        if ts_recv >= self._next_refresh_ns:
            self.websocket.send(self._instruments_request())

    def _publish(self, event: Event) -> None:
        if isinstance(event, _SNAPSHOT_TYPES):
            key = (type(event), event.instrument)
            if event.ts_event <= self._latest_ts.get(key, -1):
                self.stats.duplicates += 1
                return
            self._latest_ts[key] = event.ts_event
        self.stats.events += 1
        self.sink(event)
        if isinstance(event, OptionMark):
            surface = self.surfaces.on_mark(event)
            if surface is not None:
                self.stats.surfaces += 1
                self.sink(surface)

    def _on_response(self, envelope: Envelope) -> None:
        method = self._requests.pop(envelope.id, None) if isinstance(envelope.id, int) else None
        if envelope.error is not None:
            self.stats.rpc_errors += 1
            self._log.warning(
                "rpc_error", method=method, code=envelope.error.code, message=envelope.error.message
            )
        elif method == "public/get_instruments":
            self._on_instruments(envelope.result)

    def _on_instruments(self, result: msgspec.Raw) -> None:
        """Subscribe the listed options not subscribed yet; forget delisted ones for the next session."""
        try:
            listed = _INSTRUMENTS.decode(result)
        except msgspec.DecodeError as exc:
            raise ParseError(f"invalid get_instruments result: {exc}") from None
        channels = {
            f"ticker.{row.instrument_name}.{self.config.ticker_interval}"
            for row in listed
            if row.kind == "option" and row.is_active
        }
        new = sorted(channels - self._option_channels)
        self._option_channels = channels
        self.stats.subscribed_options = len(channels)
        if new:
            self._log.info("subscribing_options", new=len(new), listed=len(channels))
            self.websocket.send(self._request("public/subscribe", {"channels": new}))
