"""BinanceFeed end to end against local servers speaking Binance's protocols, and ccxt REST on recorded JSON.

The websocket server replays a recorded hftbacktest session (spot BTCUSDT, the MIT subset in
``tests/fixtures/binance``; USD-M ETHUSDT from ``../shared/data``), answers SUBSCRIBE like
Binance, drops connections and sends garbage where told; an aiohttp server plays the REST
depth snapshot as the exchange would answer it at that moment.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ccxt.async_support as ccxt_async
import pytest
from aiohttp import web
from wsreplay import Frame, HttpReplayServer, ReplayServer, Session

from adapters.binance import (
    BinanceFeed,
    BinanceFeedConfig,
    BinanceMarketConfig,
    binance_exchange,
    fetch_funding_history,
    fetch_klines,
    load_instruments,
)
from adapters.connection import BackoffConfig, ConnectionConfig
from bot.bus import InboundQueue
from bot.events import Event, FeedState, FeedStatus, Quote, Trade
from bot.instruments import InstrumentKind

FIXTURE = Path(__file__).parent / "fixtures" / "binance" / "hftbacktest_spot_btcusdt_20240808_first3000.gz"
MS = 1_000_000


# --- the recorded session and what the exchange would answer -----------------------------------


class Recording:
    """A hftbacktest capture split into the websocket stream and the REST snapshot it contained."""

    def __init__(self, path: Path, lines: int | None = None) -> None:
        with gzip.open(path, "rt") as file:
            raw_lines = [line.rstrip("\n").partition(" ")[2] for line in itertools.islice(file, lines)]
        self.snapshot = next(raw for raw in raw_lines if raw.startswith('{"lastUpdateId"'))
        self.stream: list[str] = [raw for raw in raw_lines if raw != self.snapshot]
        self.data = [json.loads(raw)["data"] for raw in self.stream]

    def kinds(self, index: int) -> str:
        return self.data[index].get("e", "bookTicker")

    def trade_ids(self, indices: range | None = None) -> list[str]:
        indices = indices if indices is not None else range(len(self.stream))
        return [str(self.data[i]["t"]) for i in indices if self.kinds(i) == "trade"]

    def book_as_of(self, sent: int) -> ReferenceBook:
        """The exchange's book once the first ``sent`` stream messages are out (diffs on the snapshot)."""
        book = ReferenceBook(json.loads(self.snapshot))
        for data in self.data[:sent]:
            if data.get("e") == "depthUpdate":
                book.apply(data)
        return book


class ReferenceBook:
    """Plain replay of recorded diffs, independent of the adapter's book: the exchange's side of the test."""

    def __init__(self, snapshot: dict[str, Any]) -> None:
        self.last = snapshot["lastUpdateId"]
        self.extra = {key: snapshot[key] for key in ("E", "T") if key in snapshot}
        self.sides = {side: {float(p): (p, q) for p, q in snapshot[side]} for side in ("bids", "asks")}

    def apply(self, diff: dict[str, Any]) -> None:
        if diff["u"] <= self.last:
            return
        for side, key in (("bids", "b"), ("asks", "a")):
            for price, quantity in diff[key]:
                if float(quantity) == 0:
                    self.sides[side].pop(float(price), None)
                else:
                    self.sides[side][float(price)] = (price, quantity)
        self.last = diff["u"]

    def top(self) -> tuple[float, float, float, float]:
        bid, ask = max(self.sides["bids"]), min(self.sides["asks"])
        return bid, float(self.sides["bids"][bid][1]), ask, float(self.sides["asks"][ask][1])

    def rest_body(self) -> bytes:
        levels = {side: list(levels.values()) for side, levels in self.sides.items()}
        return json.dumps({"lastUpdateId": self.last, **self.extra, **levels}).encode()


def binance_acks(frame: Frame) -> list[Frame]:
    """What Binance answers to a SUBSCRIBE: ``{"result": null, "id": <id>}``."""
    request = json.loads(frame)
    return [json.dumps({"result": None, "id": request["id"]})] if request.get("method") == "SUBSCRIBE" else []


def depth_now(recording: Recording, server: ReplayServer) -> Callable[[web.Request], bytes]:
    """REST depth handler answering the book as of what the websocket server has streamed so far."""
    offsets = []

    def handler(request: web.Request) -> bytes:
        start = 0
        for session, connection in zip(server.sessions, server.connections, strict=False):
            first = recording.stream.index(session.messages[0]) if session.messages else start
            start = first + connection.sent
        offsets.append(start)
        return recording.book_as_of(start).rest_body()

    return handler


def feed_config(ws_url: str, rest_url: str, market: str = "spot", **connection: object) -> BinanceFeedConfig:
    settings: dict[str, object] = {
        "stale_after_s": 5.0,
        "max_connection_age_s": None,
        "ping_interval_s": None,
        "backoff": BackoffConfig(initial_s=0.05, max_s=0.5, seed=11),
    }
    settings.update(connection)
    streams = ["trade", "bookTicker", "depth@100ms"]
    symbols = ["BTCUSDT"] if market == "spot" else ["ETHUSDT"]
    market_config = BinanceMarketConfig(ws_url=ws_url, rest_url=rest_url, symbols=symbols, streams=streams)
    return BinanceFeedConfig.model_validate(
        {market: market_config, "connection": ConnectionConfig.model_validate(settings)}
    )


class Received:
    """An InboundQueue drained as the engine's pump would, keeping what came out."""

    def __init__(self) -> None:
        self.queue = InboundQueue(capacity=100_000)
        self.events: list[Event] = []

    def drain(self) -> None:
        while (event := self.queue.get_nowait()) is not None:
            self.events.append(event)

    def of(self, kind: type) -> list[Any]:
        return [event for event in self.events if isinstance(event, kind)]

    def statuses(self, feed: str) -> list[FeedState]:
        return [status.status for status in self.of(FeedStatus) if status.feed == feed]


async def run_feed(
    feed: BinanceFeed, received: Received, done: Callable[[], bool], timeout: float = 10.0
) -> None:
    task = asyncio.create_task(feed.run())
    try:
        async with asyncio.timeout(timeout):
            while True:
                received.drain()
                if done():
                    break
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        received.drain()


def subscribe_frame(request_id: int, streams: list[str]) -> str:
    return json.dumps({"method": "SUBSCRIBE", "params": streams, "id": request_id}, separators=(",", ":"))


SPOT_STREAMS = ["btcusdt@trade", "btcusdt@bookTicker", "btcusdt@depth@100ms"]


# --- end to end ------------------------------------------------------------------------------------


async def test_feed_survives_drop_garbage_and_silence_without_losing_or_repeating() -> None:
    recording = Recording(FIXTURE)
    stream = recording.stream
    cut = 1200
    truncated = stream[cut + 10][:57]
    sessions = [
        Session(
            messages=stream[:cut],
            await_client_messages=1,
            drop_after=cut,
            garbage={300: ["<html>502 Bad Gateway</html>", truncated]},
        ),
        Session(
            messages=stream[cut:],
            await_client_messages=1,
            garbage={500: [b"\x00\x01binary", '{"e":"brandNewEvent","E":1}']},
            pauses={800: 1.5},  # the exchange goes quiet for a while
        ),
    ]
    received = Received()
    async with ReplayServer(sessions, respond=binance_acks) as ws, HttpReplayServer({}) as http:
        http.routes["/api/v3/depth"] = depth_now(recording, ws)
        feed = BinanceFeed(feed_config(ws.url, http.url, stale_after_s=0.6), received.queue.put_nowait)
        spot = feed.markets["spot"]
        expected_trades = recording.trade_ids()
        await run_feed(feed, received, lambda: len(received.of(Trade)) >= len(expected_trades))

    # every trade exactly once, in order, across the drop and the reconnect
    assert [trade.trade_id for trade in received.of(Trade)] == expected_trades
    assert len(expected_trades) == 518
    # the connection story, under the venue's feed name the risk engine watches
    assert received.statuses("BINANCE") == [
        FeedState.CONNECTED,
        FeedState.DISCONNECTED,
        FeedState.CONNECTED,
        FeedState.STALE,
        FeedState.RECOVERED,
    ]
    assert received.statuses("BINANCE:BTCUSDT") == []  # the depth stream continued: no gap, no resnapshot
    # resubscribed on the new connection, through the combined-stream endpoint
    assert [c.path for c in ws.connections] == ["/stream", "/stream"]
    assert [c.received for c in ws.connections] == [
        [subscribe_frame(1, SPOT_STREAMS)],
        [subscribe_frame(2, SPOT_STREAMS)],
    ]
    stats = spot.websocket.stats
    assert stats.parse_errors == 4 and stats.handler_errors == 0
    assert stats.reconnects == 1 and stats.connects == 2 and stats.stale == 1
    assert stats.messages == len(stream) + 4 + 2  # recorded messages, garbage, two acks
    assert list(http.requested("/api/v3/depth")) == ["/api/v3/depth?symbol=BTCUSDT&limit=1000"]
    # the local book followed the whole stream and agrees with the exchange's
    book = spot.data.book("BTCUSDT")
    reference = recording.book_as_of(len(stream))
    assert book.last_update_id == reference.last and book.top() == reference.top()
    # quotes: only top-of-book changes, and the last is the last recorded bookTicker
    quotes = [(q.bid, q.bid_size, q.ask, q.ask_size) for q in received.of(Quote)]
    assert all(a != b for a, b in itertools.pairwise(quotes))
    tickers = [d for d in recording.data if "e" not in d]
    assert quotes[-1] == tuple(float(tickers[-1][k]) for k in ("b", "B", "a", "A"))
    assert len(quotes) >= 0.99 * len(tickers)
    assert received.queue.dropped == 0 and received.queue.conflated == 0


async def test_feed_resnapshots_when_diffs_are_lost_during_a_reconnect() -> None:
    recording = Recording(FIXTURE)
    stream = recording.stream
    cut, lost = 1000, 60  # the exchange streams on while the client is away: 60 messages never arrive
    lost_range = range(cut, cut + lost)
    assert any(recording.kinds(i) == "depthUpdate" for i in lost_range)
    sessions = [
        Session(messages=stream[:cut], await_client_messages=1, drop_after=cut),
        Session(messages=stream[cut + lost :], await_client_messages=1),
    ]
    received = Received()
    async with ReplayServer(sessions, respond=binance_acks) as ws, HttpReplayServer({}) as http:
        http.routes["/api/v3/depth"] = depth_now(recording, ws)
        feed = BinanceFeed(feed_config(ws.url, http.url), received.queue.put_nowait)
        spot = feed.markets["spot"]
        expected_trades = [t for t in recording.trade_ids() if t not in set(recording.trade_ids(lost_range))]
        await run_feed(
            feed,
            received,
            lambda: (
                len(received.of(Trade)) >= len(expected_trades)
                and FeedState.RECOVERED in received.statuses("BINANCE:BTCUSDT")
            ),
        )
    assert [trade.trade_id for trade in received.of(Trade)] == expected_trades
    assert received.statuses("BINANCE:BTCUSDT") == [FeedState.GAP, FeedState.RECOVERED]
    assert spot.data.stats.gaps == 1
    assert len(list(http.requested("/api/v3/depth"))) == 2  # the start, then the resync
    # after the resync the book is the exchange's book again
    book = spot.data.book("BTCUSDT")
    reference = recording.book_as_of(len(stream))
    assert book.last_update_id == reference.last and book.top() == reference.top()


async def test_planned_handover_before_the_age_limit_loses_and_repeats_nothing() -> None:
    recording = Recording(FIXTURE)
    stream = recording.stream
    # The aged connection and its successor carry the same live stream: they overlap by 300 messages.
    sessions = [
        Session(messages=stream[:1500], await_client_messages=1),
        Session(messages=stream[1200:], await_client_messages=1),
    ]
    received = Received()
    async with ReplayServer(sessions, respond=binance_acks) as ws, HttpReplayServer({}) as http:
        http.routes["/api/v3/depth"] = depth_now(recording, ws)
        config = feed_config(ws.url, http.url, max_connection_age_s=0.4, handover_overlap_s=0.05)
        feed = BinanceFeed(config, received.queue.put_nowait)
        spot = feed.markets["spot"]
        expected_trades = recording.trade_ids()
        await run_feed(
            feed,
            received,
            lambda: (
                len(received.of(Trade)) >= len(expected_trades)
                and spot.websocket.stats.planned_handovers == 1
            ),
        )
        await ws.wait_for(lambda server: server.connections[0].closed.is_set())
    assert [trade.trade_id for trade in received.of(Trade)] == expected_trades
    assert received.statuses("BINANCE") == [FeedState.CONNECTED]  # never down
    assert received.statuses("BINANCE:BTCUSDT") == []  # the repeated diffs were recognised, not a gap
    overlap = range(1200, 1500)
    repeated = sum(1 for i in overlap if recording.kinds(i) in ("trade", "bookTicker", "depthUpdate"))
    assert spot.data.stats.duplicates >= repeated
    book = spot.data.book("BTCUSDT")
    assert book.last_update_id == recording.book_as_of(len(stream)).last


async def test_usdm_feed_uses_futures_endpoints_and_rules(shared_data: Path) -> None:
    recording = Recording(shared_data / "hftbacktest" / "usdm" / "ethusdt_20240808.gz", lines=3000)
    received = Received()
    sessions = [Session(messages=recording.stream, await_client_messages=1)]
    async with ReplayServer(sessions, respond=binance_acks) as ws, HttpReplayServer({}) as http:
        http.routes["/fapi/v1/depth"] = depth_now(recording, ws)
        feed = BinanceFeed(feed_config(ws.url, http.url, market="usdm"), received.queue.put_nowait)
        usdm = feed.markets["usdm"]
        expected_trades = recording.trade_ids()
        await run_feed(
            feed,
            received,
            lambda: (
                len(received.of(Trade)) >= len(expected_trades)
                and usdm.data.book("ETHUSDT").last_update_id
                == recording.book_as_of(len(recording.stream)).last
            ),
        )
    assert [t.trade_id for t in received.of(Trade)] == expected_trades
    assert all(t.instrument == "BINANCE_USDM:ETHUSDT" for t in received.of(Trade))
    assert received.statuses("BINANCE_USDM") == [FeedState.CONNECTED]
    assert received.statuses("BINANCE_USDM:ETHUSDT") == []
    assert list(http.requested("/fapi/v1/depth")) == ["/fapi/v1/depth?symbol=ETHUSDT&limit=1000"]
    assert usdm.data.book("ETHUSDT").top() == recording.book_as_of(len(recording.stream)).top()


async def test_failed_snapshot_is_retried_with_backoff() -> None:
    recording = Recording(FIXTURE)
    answers = iter([b"<html>rate limited</html>", None])
    received = Received()
    sessions = [Session(messages=recording.stream[:600], await_client_messages=1)]
    async with ReplayServer(sessions, respond=binance_acks) as ws, HttpReplayServer({}) as http:
        current = depth_now(recording, ws)

        def flaky(request: web.Request) -> bytes:
            return next(answers) or current(request)

        http.routes["/api/v3/depth"] = flaky
        feed = BinanceFeed(feed_config(ws.url, http.url), received.queue.put_nowait)
        spot = feed.markets["spot"]
        await run_feed(feed, received, lambda: spot.data.book("BTCUSDT").synced)
    assert spot.snapshot_failures == 1
    assert len(list(http.requested("/api/v3/depth"))) == 2


def test_config_refuses_streams_it_cannot_parse() -> None:
    with pytest.raises(ValueError, match="depth20"):
        BinanceMarketConfig(ws_url="ws://x", rest_url="http://x", streams=["depth20"])
    config = BinanceMarketConfig(
        ws_url="ws://x", rest_url="http://x", symbols=["btcusdt"], streams=["kline_1m"]
    )
    assert config.symbols == ["BTCUSDT"]


# --- REST through ccxt against the recorded responses ------------------------------------------------


def rest_routes(shared_data: Path) -> dict[str, bytes]:
    folder = shared_data / "binance_rest"
    files = {
        "/api/v3/exchangeInfo": "api_v3_exchangeInfo.json",
        "/fapi/v1/exchangeInfo": "fapi_v1_exchangeInfo.json",
        "/fapi/v1/fundingRate": "fapi_v1_fundingRate__symbol=BTCUSDT.json",
        "/api/v3/klines": "api_v3_klines__BTCUSDT_1h_2020-05-01.json",
        "/fapi/v1/klines": "fapi_v1_klines__BTCUSDT_1d_2019.json",
    }
    return {route: (folder / name).read_bytes() for route, name in files.items()}


@dataclass
class RecordedRest:
    exchange: ccxt_async.binance
    http: HttpReplayServer


@pytest.fixture
async def rest(shared_data: Path) -> AsyncIterator[RecordedRest]:
    """ccxt's real Binance client, its REST roots pointed at a local server of recorded responses."""
    async with HttpReplayServer(rest_routes(shared_data)) as http:
        exchange = binance_exchange(spot_rest_url=http.url, usdm_rest_url=http.url)
        try:
            yield RecordedRest(exchange, http)
        finally:
            await exchange.close()


def filters(symbol: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {f["filterType"]: f for f in symbol["filters"]}


async def test_instruments_carry_exchange_info_precision(rest: RecordedRest, shared_data: Path) -> None:
    specs = {spec.instrument: spec for spec in await load_instruments(rest.exchange)}
    expected = 0
    for name, venue in (
        ("api_v3_exchangeInfo.json", "BINANCE"),
        ("fapi_v1_exchangeInfo.json", "BINANCE_USDM"),
    ):
        for symbol in json.loads((shared_data / "binance_rest" / name).read_text())["symbols"]:
            instrument = f"{venue}:{symbol['symbol']}"
            tradable = (
                symbol["status"] == "TRADING" and symbol.get("contractType", "PERPETUAL") == "PERPETUAL"
            )
            assert (instrument in specs) is tradable, instrument
            if not tradable:
                continue
            expected += 1
            spec, f = specs[instrument], filters(symbol)
            assert spec.kind is (InstrumentKind.SPOT if venue == "BINANCE" else InstrumentKind.PERP)
            assert (spec.base, spec.quote) == (symbol["baseAsset"], symbol["quoteAsset"])
            assert spec.tick_size == float(f["PRICE_FILTER"]["tickSize"])
            assert spec.lot_size == float(f["LOT_SIZE"]["stepSize"])
            assert spec.min_qty == float(f["LOT_SIZE"]["minQty"])
            notional = f["NOTIONAL"]["minNotional"] if "NOTIONAL" in f else f["MIN_NOTIONAL"]["notional"]
            assert spec.min_notional == float(notional)
    assert len(specs) == expected and expected > 30
    btc = specs["BINANCE:BTCUSDT"]
    assert (btc.tick_size, btc.lot_size, btc.min_notional) == (0.01, 0.00001, 5.0)
    assert btc.round_price(61837.634) == 61837.63
    assert specs["BINANCE_USDM:BTCUSDT"].min_notional == 100.0
    # only exchangeInfo was asked for: no other market type, no credentials
    assert sorted({r.split("?")[0] for r in rest.http.requests}) == [
        "/api/v3/exchangeInfo",
        "/fapi/v1/exchangeInfo",
    ]


async def test_funding_history_equals_recorded_rows(rest: RecordedRest, shared_data: Path) -> None:
    rows = json.loads((shared_data / "binance_rest" / "fapi_v1_fundingRate__symbol=BTCUSDT.json").read_text())
    records = await fetch_funding_history(rest.exchange, "BINANCE_USDM:BTCUSDT")
    assert len(records) == len(rows) == 100
    for record, row in zip(records, rows, strict=True):
        assert record.instrument == "BINANCE_USDM:BTCUSDT"
        assert record.funding_rate == float(row["fundingRate"])
        assert record.funding_ts == row["fundingTime"] * MS  # millisecond jitter kept
        assert record.mark_price is None  # pre-2023 rows have no markPrice
    assert records[1].funding_ts == 1600156800010 * MS
    asked = list(rest.http.requested("/fapi/v1/fundingRate"))
    assert asked == ["/fapi/v1/fundingRate?symbol=BTCUSDT"]


@pytest.mark.parametrize(
    ("instrument", "interval", "file", "route"),
    [
        ("BINANCE:BTCUSDT", "1h", "api_v3_klines__BTCUSDT_1h_2020-05-01.json", "/api/v3/klines"),
        ("BINANCE_USDM:BTCUSDT", "1d", "fapi_v1_klines__BTCUSDT_1d_2019.json", "/fapi/v1/klines"),
    ],
)
async def test_klines_history_equals_recorded_rows(
    rest: RecordedRest, shared_data: Path, instrument: str, interval: str, file: str, route: str
) -> None:
    rows = json.loads((shared_data / "binance_rest" / file).read_text())
    bars = await fetch_klines(rest.exchange, instrument, interval, limit=len(rows))
    seconds = {"1h": 3600, "1d": 86400}[interval]
    assert len(bars) == len(rows)
    for bar, row in zip(bars, rows, strict=True):
        assert bar.instrument == instrument and bar.interval_s == seconds and bar.closed
        assert (bar.open, bar.high, bar.low, bar.close, bar.volume) == tuple(float(x) for x in row[1:6])
        assert bar.ts_event == bar.ts_recv == (row[0] + seconds * 1000) * MS == (row[6] + 1) * MS
    asked = list(rest.http.requested(route))
    assert asked == [f"{route}?interval={interval}&limit={len(rows)}&symbol=BTCUSDT"]
