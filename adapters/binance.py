"""Binance market data, spot and USD-M: raw exchange messages in, normalised events out.

From pure to live:

- :func:`decode_message` checks one raw message (combined-stream ``{"stream", "data"}`` wrapper or
  bare) against typed payload structs; :func:`parse_message` turns the stateless ones into events:
  ``trade``/``aggTrade`` → :class:`Trade`, ``bookTicker`` → :class:`Quote`, ``kline`` → :class:`Bar`,
  ``markPriceUpdate`` → :class:`MarkPrice`. Anything malformed, truncated or unknown raises
  :class:`ParseError`.
- :class:`LocalOrderBook` keeps one symbol's book from a REST snapshot and the diff-depth stream
  with Binance's sequence checks; :class:`BinanceMarketData` routes diffs to the books (GAP and
  RECOVERED statuses, quotes on top-of-book changes) and drops what a reconnect or a connection
  handover delivers twice, by the exchange's own sequence numbers.
- :class:`BinanceFeed` runs the websocket (through :mod:`adapters.connection`) and fetches the
  depth snapshots.
- :func:`binance_exchange`, :func:`load_instruments`, :func:`fetch_funding_history` and
  :func:`fetch_klines` use ccxt's async REST client for instruments and history.

Conventions: prices and sizes are ``float(s)`` of the exchange's strings; ``ts_event`` is the
exchange's time in ns (the trade time ``T`` for trades, the event time ``E`` otherwise, and the
receive time for spot ``bookTicker``, which carries no time); ids are ``BINANCE:<symbol>`` for
spot and ``BINANCE_USDM:<symbol>`` for USD-M perpetuals.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from enum import StrEnum
from typing import Literal, TypeAlias, assert_never

import aiohttp
import ccxt.async_support as ccxt_async
import msgspec
import structlog
from ccxt.base.decimal_to_precision import TICK_SIZE
from pydantic import BaseModel, ConfigDict, Field, field_validator

from adapters.connection import Backoff, ConnectionConfig, MessageError, ResilientWebSocket
from bot.events import (
    AggressorSide,
    Bar,
    Event,
    FeedState,
    FeedStatus,
    MarkPrice,
    Quote,
    Trade,
    Venue,
    instrument_id,
    split_instrument,
)
from bot.instruments import InstrumentKind, InstrumentSpec

log = structlog.get_logger("adapters.binance")

Market: TypeAlias = Literal["spot", "usdm"]
NANOS_PER_MILLI = 1_000_000
NANOS_PER_SECOND = 1_000_000_000
_VENUES: dict[str, Venue] = {"spot": Venue.BINANCE, "usdm": Venue.BINANCE_USDM}
_INTERVAL_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3_600, "d": 86_400, "w": 604_800}
# Known event types this adapter deliberately turns into nothing: statistics and liquidation
# orders (whose fills also arrive on the trade streams, so a Trade from them would count twice).
_UNUSED_EVENT_TYPES = frozenset({"24hrTicker", "24hrMiniTicker", "forceOrder"})


class ParseError(MessageError):
    """A Binance message that is malformed, truncated or of an unknown kind."""


# --- payloads as Binance sends them ------------------------------------------------------------


class _Payload(msgspec.Struct, frozen=True, kw_only=True):
    """Only the fields used are declared; others are ignored, so additive API changes do not break us."""


class TradeMsg(_Payload, frozen=True, kw_only=True):
    symbol: str = msgspec.field(name="s")
    trade_id: int = msgspec.field(name="t")
    price: str = msgspec.field(name="p")
    quantity: str = msgspec.field(name="q")
    trade_time: int = msgspec.field(name="T")
    buyer_is_maker: bool = msgspec.field(name="m")


class AggTradeMsg(_Payload, frozen=True, kw_only=True):
    symbol: str = msgspec.field(name="s")
    agg_id: int = msgspec.field(name="a")
    price: str = msgspec.field(name="p")
    quantity: str = msgspec.field(name="q")
    trade_time: int = msgspec.field(name="T")
    buyer_is_maker: bool = msgspec.field(name="m")


class BookTickerMsg(_Payload, frozen=True, kw_only=True):
    update_id: int = msgspec.field(name="u")
    symbol: str = msgspec.field(name="s")
    bid: str = msgspec.field(name="b")
    bid_size: str = msgspec.field(name="B")
    ask: str = msgspec.field(name="a")
    ask_size: str = msgspec.field(name="A")
    event_time: int | None = msgspec.field(default=None, name="E")  # futures only


class KlineData(_Payload, frozen=True, kw_only=True):
    open_time: int = msgspec.field(name="t")
    interval: str = msgspec.field(name="i")
    open: str = msgspec.field(name="o")
    high: str = msgspec.field(name="h")
    low: str = msgspec.field(name="l")
    close: str = msgspec.field(name="c")
    volume: str = msgspec.field(name="v")
    closed: bool = msgspec.field(name="x")


class KlineMsg(_Payload, frozen=True, kw_only=True):
    event_time: int = msgspec.field(name="E")
    symbol: str = msgspec.field(name="s")
    kline: KlineData = msgspec.field(name="k")


class MarkPriceMsg(_Payload, frozen=True, kw_only=True):
    event_time: int = msgspec.field(name="E")
    symbol: str = msgspec.field(name="s")
    mark_price: str = msgspec.field(name="p")
    index_price: str = msgspec.field(name="i")
    funding_rate: str = msgspec.field(name="r")
    next_funding_time: int = msgspec.field(name="T")


Level: TypeAlias = tuple[str, str]


class DepthUpdateMsg(_Payload, frozen=True, kw_only=True):
    event_time: int = msgspec.field(name="E")
    symbol: str = msgspec.field(name="s")
    first_update_id: int = msgspec.field(name="U")
    final_update_id: int = msgspec.field(name="u")
    previous_final_update_id: int | None = msgspec.field(default=None, name="pu")  # futures only
    bids: list[Level] = msgspec.field(name="b")
    asks: list[Level] = msgspec.field(name="a")


class DepthSnapshotMsg(_Payload, frozen=True, kw_only=True):
    """REST ``/api/v3/depth`` or ``/fapi/v1/depth`` body (no symbol in it)."""

    last_update_id: int = msgspec.field(name="lastUpdateId")
    bids: list[Level]
    asks: list[Level]
    event_time: int | None = msgspec.field(default=None, name="E")  # futures only


BinanceMessage: TypeAlias = (
    TradeMsg | AggTradeMsg | BookTickerMsg | KlineMsg | MarkPriceMsg | DepthUpdateMsg | DepthSnapshotMsg
)
_PAYLOAD_BY_EVENT_TYPE: dict[str, type[BinanceMessage]] = {
    "trade": TradeMsg,
    "aggTrade": AggTradeMsg,
    "bookTicker": BookTickerMsg,
    "kline": KlineMsg,
    "markPriceUpdate": MarkPriceMsg,
    "depthUpdate": DepthUpdateMsg,
}


def decode_message(raw: str | bytes) -> BinanceMessage | None:
    """One raw message as a typed payload; None for valid messages that carry no market data.

    None covers subscription acks (``{"result": null, "id": 1}``) and the event types this
    adapter does not use (24 h tickers, liquidation orders). Raises :class:`ParseError` otherwise.
    """
    try:
        message = msgspec.json.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ParseError(f"not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ParseError(f"expected a JSON object, got {type(message).__name__}")
    data = message.get("data") if "stream" in message else message
    if not isinstance(data, dict):
        raise ParseError("combined-stream message without a data object")
    kind = data.get("e")
    if kind is not None:
        payload_type = _PAYLOAD_BY_EVENT_TYPE.get(kind)
        if payload_type is None:
            if kind in _UNUSED_EVENT_TYPES:
                return None
            raise ParseError(f"unknown event type {kind!r}")
    elif "lastUpdateId" in data:
        payload_type = DepthSnapshotMsg
    elif "u" in data and "b" in data and "a" in data:
        payload_type = BookTickerMsg  # spot bookTicker carries no "e"
    elif "id" in data and "result" in data:
        return None
    elif "error" in data or "code" in data:
        raise ParseError(f"error from Binance: {data}")
    else:
        raise ParseError("message of unknown shape")
    try:
        return msgspec.convert(data, payload_type)
    except msgspec.ValidationError as exc:
        raise ParseError(f"invalid {payload_type.__name__}: {exc}") from None


def parse_message(raw: str | bytes, ts_recv: int | None = None, market: Market = "spot") -> list[Event]:
    """The events one raw message stands for on its own.

    Depth diffs and snapshots give no event here: they only make sense against a local book
    (:class:`BinanceMarketData`). ``ts_recv`` defaults to now.
    """
    message = decode_message(raw)
    if message is None or isinstance(message, DepthUpdateMsg | DepthSnapshotMsg):
        return []
    return [to_event(message, time.time_ns() if ts_recv is None else ts_recv, _VENUES[market])]


def to_event(
    message: TradeMsg | AggTradeMsg | BookTickerMsg | KlineMsg | MarkPriceMsg, ts_recv: int, venue: Venue
) -> Event:
    """The normalised event of one stateless payload."""
    try:
        match message:
            case TradeMsg() | AggTradeMsg():
                return Trade(
                    ts_event=message.trade_time * NANOS_PER_MILLI,
                    ts_recv=ts_recv,
                    instrument=instrument_id(venue, message.symbol),
                    price=float(message.price),
                    size=float(message.quantity),
                    aggressor_side=AggressorSide.SELL if message.buyer_is_maker else AggressorSide.BUY,
                    trade_id=str(message.trade_id if isinstance(message, TradeMsg) else message.agg_id),
                )
            case BookTickerMsg():
                return Quote(
                    ts_event=ts_recv if message.event_time is None else message.event_time * NANOS_PER_MILLI,
                    ts_recv=ts_recv,
                    instrument=instrument_id(venue, message.symbol),
                    bid=float(message.bid),
                    bid_size=float(message.bid_size),
                    ask=float(message.ask),
                    ask_size=float(message.ask_size),
                )
            case KlineMsg():
                kline = message.kline
                return Bar(
                    ts_event=message.event_time * NANOS_PER_MILLI,
                    ts_recv=ts_recv,
                    instrument=instrument_id(venue, message.symbol),
                    interval_s=interval_seconds(kline.interval),
                    open=float(kline.open),
                    high=float(kline.high),
                    low=float(kline.low),
                    close=float(kline.close),
                    volume=float(kline.volume),
                    closed=kline.closed,
                )
            case MarkPriceMsg():
                return MarkPrice(
                    ts_event=message.event_time * NANOS_PER_MILLI,
                    ts_recv=ts_recv,
                    instrument=instrument_id(venue, message.symbol),
                    mark_price=float(message.mark_price),
                    index_price=float(message.index_price),
                    funding_rate=float(message.funding_rate),
                    next_funding_ts=message.next_funding_time * NANOS_PER_MILLI,
                )
            case _:
                assert_never(message)
    except ValueError as exc:  # a number that float() refuses
        raise ParseError(f"invalid number in {type(message).__name__}: {exc}") from None


def interval_seconds(interval: str) -> int:
    """Seconds of a Binance kline interval (``1s``, ``15m``, ``4h``, ``1d``, ``1w``).

    The monthly ``1M`` has no fixed length, so it is refused rather than approximated.
    """
    match = re.fullmatch(r"(\d+)([smhdw])", interval)
    if match is None:
        raise ParseError(f"unsupported kline interval {interval!r}")
    return int(match.group(1)) * _INTERVAL_UNIT_SECONDS[match.group(2)]


# --- local order book ---------------------------------------------------------------------------


class BookUpdate(StrEnum):
    BUFFERED = "BUFFERED"  # waiting for a snapshot
    DUPLICATE = "DUPLICATE"  # already contained in the book
    APPLIED = "APPLIED"
    GAP = "GAP"  # updates are missing: the book is cleared and needs a new snapshot


class LocalOrderBook:
    """One symbol's book from a REST snapshot plus the diff-depth stream, by Binance's algorithm.

    A diff covering update ids ``U..u`` is applied when it continues the book's last update
    id ``L``: spot needs ``U ≤ L+1 ≤ u`` (so ``U == L+1`` in a steady stream), futures need
    ``pu == L`` or ``U ≤ L ≤ u``. A diff with ``u ≤ L`` (futures: ``u < L``) is already in the
    book. Anything else means updates were lost: :attr:`BookUpdate.GAP`, the book is cleared and
    diffs are buffered until :meth:`apply_snapshot`, which replays them through the same checks
    (a snapshot older than the buffer is therefore itself a gap). Diffs carry absolute quantities,
    so re-applying an overlap is harmless and a quantity of 0 removes the level.
    """

    def __init__(self, symbol: str, market: Market, max_buffer: int = 10_000) -> None:
        self.symbol = symbol
        self.futures = market == "usdm"
        self.bids: dict[float, float] = {}
        self.asks: dict[float, float] = {}
        self.last_update_id: int | None = None
        self.last_gap = ""
        self._buffer: deque[DepthUpdateMsg] = deque(maxlen=max_buffer)
        self._best_bid: float | None = None
        self._best_ask: float | None = None

    @property
    def synced(self) -> bool:
        return self.last_update_id is not None

    def apply_snapshot(self, snapshot: DepthSnapshotMsg) -> BookUpdate:
        """Load a snapshot and replay the buffered diffs; GAP when they do not continue it."""
        bids, asks = _levels(snapshot.bids, "snapshot"), _levels(snapshot.asks, "snapshot")
        self._clear()
        for price, quantity in bids:
            _set_level(self.bids, price, quantity)
        for price, quantity in asks:
            _set_level(self.asks, price, quantity)
        self.last_update_id = snapshot.last_update_id
        pending, self._buffer = list(self._buffer), deque(maxlen=self._buffer.maxlen)
        result = BookUpdate.APPLIED
        for diff in pending:
            if self.apply_diff(diff) is BookUpdate.GAP:
                result = BookUpdate.GAP
        return result

    def apply_diff(self, diff: DepthUpdateMsg) -> BookUpdate:
        """Apply, buffer or reject one diff; ParseError (book untouched) if it holds a bad number."""
        bids, asks = _levels(diff.bids, "diff"), _levels(diff.asks, "diff")
        last = self.last_update_id
        if last is None:
            self._buffer.append(diff)
            return BookUpdate.BUFFERED
        first, final = diff.first_update_id, diff.final_update_id
        if self.futures:
            if final < last:
                return BookUpdate.DUPLICATE
            continues = diff.previous_final_update_id == last or first <= last <= final
        else:
            if final <= last:
                return BookUpdate.DUPLICATE
            continues = first <= last + 1 <= final
        if not continues:
            self.last_gap = f"{self.symbol}: book at update {last}, diff covers {first}..{final}" + (
                f" after {diff.previous_final_update_id}" if self.futures else ""
            )
            self._clear()
            self._buffer.append(diff)
            return BookUpdate.GAP
        for price, quantity in bids:
            self._update_bid(price, quantity)
        for price, quantity in asks:
            self._update_ask(price, quantity)
        self.last_update_id = final
        return BookUpdate.APPLIED

    def top(self) -> tuple[float, float, float, float] | None:
        """(bid, bid size, ask, ask size), None while a side is empty."""
        if not self.bids or not self.asks:
            return None
        if self._best_bid is None:
            self._best_bid = max(self.bids)
        if self._best_ask is None:
            self._best_ask = min(self.asks)
        return self._best_bid, self.bids[self._best_bid], self._best_ask, self.asks[self._best_ask]

    def _update_bid(self, price: float, quantity: float) -> None:
        _set_level(self.bids, price, quantity)
        best = self._best_bid
        if quantity == 0.0:
            if price == best:
                self._best_bid = None
        elif best is not None and price > best:
            self._best_bid = price

    def _update_ask(self, price: float, quantity: float) -> None:
        _set_level(self.asks, price, quantity)
        best = self._best_ask
        if quantity == 0.0:
            if price == best:
                self._best_ask = None
        elif best is not None and price < best:
            self._best_ask = price

    def _clear(self) -> None:
        self.bids.clear()
        self.asks.clear()
        self.last_update_id = None
        self._best_bid = self._best_ask = None


def _levels(levels: list[Level], where: str) -> list[tuple[float, float]]:
    try:
        return [(float(price), float(quantity)) for price, quantity in levels]
    except ValueError as exc:
        raise ParseError(f"invalid number in depth {where}: {exc}") from None


def _set_level(levels: dict[float, float], price: float, quantity: float) -> None:
    if quantity == 0.0:
        levels.pop(price, None)
    else:
        levels[price] = quantity


# --- stateful handling: books and sequence numbers ---------------------------------------------


class MarketDataStats(msgspec.Struct, kw_only=True):
    events: int = 0
    duplicates: int = 0  # dropped: already delivered (reconnect, handover) or older than what was
    gaps: int = 0
    snapshots: int = 0


class BinanceMarketData:
    """Raw messages of one market's connection → events, with the state parsing alone cannot have.

    - Depth diffs go to one :class:`LocalOrderBook` per symbol; a top-of-book change gives a
      :class:`Quote`, a gap a ``FeedStatus(GAP)`` under the instrument id, and the snapshot that
      resyncs the book a ``FeedStatus(RECOVERED)``.
    - Each instrument's trades, quotes, bars and marks only move forward in the exchange's own
      sequence (trade ids, book update ids shared by ``bookTicker`` and depth, event times), so a
      message delivered twice around a reconnect or a handover is dropped, and a book quote older
      than a ``bookTicker`` already sent never rolls the quote back.
    """

    def __init__(self, market: Market = "spot") -> None:
        self.market = market
        self.venue = _VENUES[market]
        self.books: dict[str, LocalOrderBook] = {}
        self.stats = MarketDataStats()
        self._last_seen: dict[tuple[str, str], int] = {}
        self._last_quote_id: dict[str, int] = {}
        self._last_top: dict[str, tuple[float, float, float, float]] = {}
        self._recovering: set[str] = set()

    def on_message(self, raw: str | bytes, ts_recv: int | None = None) -> list[Event]:
        """The events of one raw message from the stream (``ts_recv`` defaults to now)."""
        ts_recv = time.time_ns() if ts_recv is None else ts_recv
        message = decode_message(raw)
        match message:
            case None | DepthSnapshotMsg():
                return []  # a snapshot needs its symbol: on_snapshot
            case DepthUpdateMsg():
                events = self._on_diff(message, ts_recv)
            case BookTickerMsg():
                quote = to_event(message, ts_recv, self.venue)
                assert isinstance(quote, Quote)
                events = self._quote(message.symbol, message.update_id, quote)
            case TradeMsg():
                events = self._forward(("trade", message.symbol), message.trade_id, message, ts_recv)
            case AggTradeMsg():
                events = self._forward(("aggTrade", message.symbol), message.agg_id, message, ts_recv)
            case KlineMsg():
                key = (f"kline_{message.kline.interval}", message.symbol)
                events = self._forward(key, message.event_time, message, ts_recv)
            case MarkPriceMsg():
                events = self._forward(("mark", message.symbol), message.event_time, message, ts_recv)
            case _:
                assert_never(message)
        self.stats.events += len(events)
        return events

    def on_snapshot(self, symbol: str, raw: str | bytes, ts_recv: int | None = None) -> list[Event]:
        """Apply a REST depth snapshot of ``symbol`` to its book."""
        ts_recv = time.time_ns() if ts_recv is None else ts_recv
        snapshot = decode_message(raw)
        if not isinstance(snapshot, DepthSnapshotMsg):
            raise ParseError(f"expected a depth snapshot for {symbol}, got {type(snapshot).__name__}")
        self.stats.snapshots += 1
        book = self.book(symbol)
        result = book.apply_snapshot(snapshot)
        ts_event = ts_recv if snapshot.event_time is None else snapshot.event_time * NANOS_PER_MILLI
        events = self._book_quote(book, ts_event, ts_recv)
        instrument = instrument_id(self.venue, symbol)
        if result is BookUpdate.GAP:
            log.info("snapshot_behind_stream", instrument=instrument, detail=book.last_gap)
        elif symbol in self._recovering:
            self._recovering.discard(symbol)
            events.append(
                FeedStatus(
                    ts_event=ts_recv,
                    ts_recv=ts_recv,
                    feed=instrument,
                    status=FeedState.RECOVERED,
                    detail=f"book resynced at update {book.last_update_id}",
                )
            )
        self.stats.events += len(events)
        return events

    def book(self, symbol: str) -> LocalOrderBook:
        book = self.books.get(symbol)
        if book is None:
            book = self.books[symbol] = LocalOrderBook(symbol, self.market)
        return book

    def symbols_awaiting_snapshot(self) -> list[str]:
        return [symbol for symbol, book in self.books.items() if not book.synced]

    def _forward(
        self,
        key: tuple[str, str],
        sequence: int,
        message: TradeMsg | AggTradeMsg | KlineMsg | MarkPriceMsg,
        ts_recv: int,
    ) -> list[Event]:
        last = self._last_seen.get(key)
        if last is not None and sequence <= last:
            self.stats.duplicates += 1
            return []
        self._last_seen[key] = sequence
        return [to_event(message, ts_recv, self.venue)]

    def _on_diff(self, diff: DepthUpdateMsg, ts_recv: int) -> list[Event]:
        book = self.book(diff.symbol)
        result = book.apply_diff(diff)
        if result is BookUpdate.APPLIED:
            return self._book_quote(book, diff.event_time * NANOS_PER_MILLI, ts_recv)
        if result is BookUpdate.DUPLICATE:
            self.stats.duplicates += 1
        elif result is BookUpdate.GAP:
            self.stats.gaps += 1
            self._recovering.add(diff.symbol)
            instrument = instrument_id(self.venue, diff.symbol)
            log.warning("book_gap", instrument=instrument, detail=book.last_gap)
            return [
                FeedStatus(
                    ts_event=ts_recv,
                    ts_recv=ts_recv,
                    feed=instrument,
                    status=FeedState.GAP,
                    detail=book.last_gap,
                )
            ]
        return []

    def _book_quote(self, book: LocalOrderBook, ts_event: int, ts_recv: int) -> list[Event]:
        top = book.top()
        if top is None or book.last_update_id is None:
            return []
        bid, bid_size, ask, ask_size = top
        quote = Quote(
            ts_event=ts_event,
            ts_recv=ts_recv,
            instrument=instrument_id(self.venue, book.symbol),
            bid=bid,
            bid_size=bid_size,
            ask=ask,
            ask_size=ask_size,
        )
        return self._quote(book.symbol, book.last_update_id, quote)

    def _quote(self, symbol: str, update_id: int, quote: Quote) -> list[Event]:
        """Send ``quote`` (the book at ``update_id``) if it is newer than the last and changes the top."""
        last_id = self._last_quote_id.get(symbol)
        if last_id is not None and update_id <= last_id:
            self.stats.duplicates += 1
            return []
        self._last_quote_id[symbol] = update_id
        top = (quote.bid, quote.bid_size, quote.ask, quote.ask_size)
        if self._last_top.get(symbol) == top:
            return []
        self._last_top[symbol] = top
        return [quote]


# --- live feed -----------------------------------------------------------------------------------

_STREAM_NAME = re.compile(r"trade|aggTrade|bookTicker|depth(@\d+ms)?|markPrice(@1s)?|kline_\d+[smhdw]")


class BinanceMarketConfig(BaseModel):
    """One Binance market's endpoints and what to subscribe to on it."""

    model_config = ConfigDict(extra="forbid")

    ws_url: str = Field(description="websocket root; the feed connects to <ws_url>/stream")
    rest_url: str = Field(description="REST root for depth snapshots")
    symbols: list[str] = Field(default_factory=list, description="exchange symbols, e.g. BTCUSDT")
    streams: list[str] = Field(description="streams per symbol, e.g. trade, bookTicker, depth@100ms")

    @field_validator("symbols")
    @classmethod
    def _upper(cls, symbols: list[str]) -> list[str]:
        return [symbol.upper() for symbol in symbols]

    @field_validator("streams")
    @classmethod
    def _known_streams(cls, streams: list[str]) -> list[str]:
        for stream in streams:
            if not _STREAM_NAME.fullmatch(stream):
                raise ValueError(
                    f"unsupported stream {stream!r} (partial depth and 1M klines are not parsed)"
                )
        return streams


class BinanceFeedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    spot: BinanceMarketConfig = Field(
        default_factory=lambda: BinanceMarketConfig(
            ws_url="wss://stream.binance.com:9443",
            rest_url="https://api.binance.com",
            symbols=["BTCUSDT"],
            streams=["trade", "bookTicker", "depth@100ms"],
        )
    )
    usdm: BinanceMarketConfig = Field(
        default_factory=lambda: BinanceMarketConfig(
            ws_url="wss://fstream.binance.com",
            rest_url="https://fapi.binance.com",
            symbols=["BTCUSDT"],
            streams=["aggTrade", "bookTicker", "depth@100ms", "markPrice@1s"],
        )
    )
    snapshot_limit: int = Field(1000, gt=0, le=5000, description="levels per REST depth snapshot")
    snapshot_timeout_s: float = Field(10.0, gt=0)
    connection: ConnectionConfig = Field(default_factory=ConnectionConfig)


EventSink = Callable[[Event], None]


class BinanceFeed:
    """Live Binance market data into ``sink`` (an ``InboundQueue.put_nowait``): one connection per market.

    Each market with symbols gets a :class:`ResilientWebSocket` on ``<ws_url>/stream`` that sends
    one ``SUBSCRIBE`` for every stream on each (re)connection, so the combined-stream wrapper
    tells messages apart. Depth snapshots are plain aiohttp GETs: one request that keeps
    ``lastUpdateId`` and the price strings exact, without ccxt's market loading. A book waiting
    for a snapshot (at start, after a gap) gets one fetch at a time, retried with backoff until
    its buffered diffs continue it. Run :meth:`run` as a task; cancel it to stop.
    """

    def __init__(self, config: BinanceFeedConfig, sink: EventSink) -> None:
        self.config = config
        self.sink = sink
        self.markets = {
            market: BinanceMarketFeed(market, market_config, config, sink)
            for market, market_config in (("spot", config.spot), ("usdm", config.usdm))
            if market_config.symbols
        }

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.config.snapshot_timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as http, asyncio.TaskGroup() as group:
            for feed in self.markets.values():
                group.create_task(feed.run(http), name=f"binance-{feed.market}")


class BinanceMarketFeed:
    """One market's websocket, books and snapshot fetches."""

    def __init__(self, market: Market, config: BinanceMarketConfig, feed: BinanceFeedConfig, sink: EventSink):
        self.market = market
        self.config = config
        self.snapshot_limit = feed.snapshot_limit
        self.sink = sink
        self.data = BinanceMarketData(market)
        self.websocket = ResilientWebSocket(
            _VENUES[market].value,
            f"{config.ws_url.rstrip('/')}/stream",
            on_message=self._on_message,
            emit_status=sink,
            subscribe=self._subscribe,
            config=feed.connection,
        )
        self._backoff = Backoff(feed.connection.backoff)
        self._depth_path = "/api/v3/depth" if market == "spot" else "/fapi/v1/depth"
        self._request_id = 0
        self._http: aiohttp.ClientSession | None = None
        self._snapshot_tasks: dict[str, asyncio.Task[None]] = {}
        self.snapshot_failures = 0

    @property
    def streams(self) -> list[str]:
        return [
            f"{symbol.lower()}@{stream}" for symbol in self.config.symbols for stream in self.config.streams
        ]

    async def run(self, http: aiohttp.ClientSession) -> None:
        self._http = http
        try:
            await self.websocket.run()
        finally:
            for task in self._snapshot_tasks.values():
                task.cancel()
            await asyncio.gather(*self._snapshot_tasks.values(), return_exceptions=True)

    def _subscribe(self) -> Iterator[str]:
        self._request_id += 1
        payload = {"method": "SUBSCRIBE", "params": self.streams, "id": self._request_id}
        yield msgspec.json.encode(payload).decode()

    def _on_message(self, raw: str | bytes, ts_recv: int) -> None:
        for event in self.data.on_message(raw, ts_recv):
            self.sink(event)
        for symbol in self.data.symbols_awaiting_snapshot():
            if symbol not in self._snapshot_tasks:
                task = asyncio.get_running_loop().create_task(self._resync(symbol), name=f"snapshot-{symbol}")
                self._snapshot_tasks[symbol] = task

    async def _resync(self, symbol: str) -> None:
        """Fetch snapshots of ``symbol`` until its book is live again."""
        attempt = 0
        try:
            while not self.data.book(symbol).synced:
                if attempt:
                    await asyncio.sleep(self._backoff.delay(attempt - 1))
                attempt += 1
                try:
                    body = await self._fetch_snapshot(symbol)
                    events = self.data.on_snapshot(symbol, body, time.time_ns())
                except (aiohttp.ClientError, TimeoutError, ParseError) as exc:
                    self.snapshot_failures += 1
                    log.warning(
                        "snapshot_failed",
                        feed=self.websocket.name,
                        symbol=symbol,
                        attempt=attempt,
                        error=repr(exc),
                    )
                    continue
                for event in events:
                    self.sink(event)
        finally:
            self._snapshot_tasks.pop(symbol, None)

    async def _fetch_snapshot(self, symbol: str) -> bytes:
        assert self._http is not None, "run() sets the HTTP session"
        url = f"{self.config.rest_url.rstrip('/')}{self._depth_path}"
        params = {"symbol": symbol, "limit": str(self.snapshot_limit)}
        async with self._http.get(url, params=params) as response:
            response.raise_for_status()
            return await response.read()


# --- REST through ccxt: instruments and history ------------------------------------------------

_USDM_API_PATHS = {"fapiPublic": "/fapi/v1", "fapiPublicV2": "/fapi/v2", "fapiPublicV3": "/fapi/v3"}


def binance_exchange(
    spot_rest_url: str | None = None, usdm_rest_url: str | None = None
) -> ccxt_async.binance:
    """A ccxt async client for Binance public data (spot and USD-M), its REST roots overridable.

    Only spot and linear markets are loaded: coin-margined and option exchangeInfo calls would
    cost requests for instruments this bot never trades. The caller closes it (``await .close()``).
    """
    exchange = ccxt_async.binance(
        {"enableRateLimit": True, "options": {"fetchMarkets": {"types": ["spot", "linear"]}}}
    )
    if spot_rest_url is not None:
        exchange.urls["api"]["public"] = f"{spot_rest_url.rstrip('/')}/api/v3"
    if usdm_rest_url is not None:
        for api, path in _USDM_API_PATHS.items():
            exchange.urls["api"][api] = f"{usdm_rest_url.rstrip('/')}{path}"
    return exchange


async def load_instruments(exchange: ccxt_async.binance) -> list[InstrumentSpec]:
    """Active spot and USD-M perpetual instruments with their exchangeInfo precision, sorted by id.

    Tick and lot sizes are ccxt's reading of the PRICE_FILTER and LOT_SIZE filters, which needs
    ccxt's tick-size precision mode; minimum notional comes from (MIN_)NOTIONAL. Delivery
    futures and halted markets are left out: nothing here can trade them.
    """
    if exchange.precisionMode != TICK_SIZE:
        raise RuntimeError("ccxt's Binance precision is no longer tick sizes: precision would be misread")
    markets = await exchange.load_markets()
    specs = []
    for market in markets.values():
        if not market["active"]:
            continue
        if market["spot"]:
            venue, kind = Venue.BINANCE, InstrumentKind.SPOT
        elif market["swap"] and market["linear"]:
            venue, kind = Venue.BINANCE_USDM, InstrumentKind.PERP
        else:
            continue
        precision, limits = market["precision"], market["limits"]
        specs.append(
            InstrumentSpec(
                instrument=instrument_id(venue, market["id"]),
                kind=kind,
                base=market["base"],
                quote=market["quote"],
                tick_size=precision["price"],
                lot_size=precision["amount"],
                min_qty=limits["amount"]["min"] or 0.0,
                min_notional=limits["cost"]["min"] or 0.0,
            )
        )
    return sorted(specs, key=lambda spec: spec.instrument)


class FundingRateRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One settled funding of a perpetual: the rate per interval (decimal) at ``funding_ts`` (ns)."""

    instrument: str
    funding_ts: int
    funding_rate: float
    mark_price: float | None = None  # only in rows recorded since 2023


async def fetch_funding_history(
    exchange: ccxt_async.binance, instrument: str, since_ns: int | None = None, limit: int | None = None
) -> list[FundingRateRecord]:
    """Settled funding rates of a USD-M perpetual (``BINANCE_USDM:BTCUSDT``), oldest first."""
    symbol = await _ccxt_symbol(exchange, instrument)
    since_ms = None if since_ns is None else since_ns // NANOS_PER_MILLI
    rows = await exchange.fetch_funding_rate_history(symbol, since_ms, limit)
    records = []
    for row in rows:
        mark = row["info"].get("markPrice")
        records.append(
            FundingRateRecord(
                instrument=instrument,
                funding_ts=row["timestamp"] * NANOS_PER_MILLI,
                funding_rate=row["fundingRate"],
                mark_price=float(mark) if mark else None,
            )
        )
    return records


async def fetch_klines(
    exchange: ccxt_async.binance,
    instrument: str,
    interval: str = "1h",
    since_ns: int | None = None,
    limit: int | None = None,
) -> list[Bar]:
    """Historical bars, oldest first, stamped at their close (open + interval), when a live feed has them.

    A bar whose close is still in the future is the one in progress: ``closed=False``.
    """
    symbol = await _ccxt_symbol(exchange, instrument)
    interval_ns = interval_seconds(interval) * NANOS_PER_SECOND
    since_ms = None if since_ns is None else since_ns // NANOS_PER_MILLI
    rows = await exchange.fetch_ohlcv(symbol, interval, since_ms, limit)
    now = time.time_ns()
    bars = []
    for open_ms, open_, high, low, close, volume in rows:
        close_ns = open_ms * NANOS_PER_MILLI + interval_ns
        bars.append(
            Bar(
                ts_event=close_ns,
                ts_recv=close_ns,
                instrument=instrument,
                interval_s=interval_ns // NANOS_PER_SECOND,
                open=open_,
                high=high,
                low=low,
                close=close,
                volume=volume,
                closed=close_ns <= now,
            )
        )
    return bars


async def _ccxt_symbol(exchange: ccxt_async.binance, instrument: str) -> str:
    """ccxt's unified symbol of a ``BINANCE:``/``BINANCE_USDM:`` instrument id (spot and perp share ids)."""
    venue, symbol_id = split_instrument(instrument)
    if venue not in (Venue.BINANCE, Venue.BINANCE_USDM):
        raise ValueError(f"{instrument} is not a Binance instrument")
    await exchange.load_markets()
    for market in exchange.markets_by_id.get(symbol_id, []):
        if market["spot"] if venue is Venue.BINANCE else market["swap"] and market["linear"]:
            return market["symbol"]
    raise KeyError(f"unknown instrument {instrument!r}")
