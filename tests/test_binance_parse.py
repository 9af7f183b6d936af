"""Binance parsing and local order book against every recorded Binance message we have.

Recorded data: ``../shared/data`` (hftbacktest and cryptofeed captures, MIT; the exchange's
documentation examples from nautilus_trader, LGPL, used in place) and the MIT subset in
``tests/fixtures/binance``. Every value is compared with ``float`` of the source string, every
timestamp with the source milliseconds × 10⁶.
"""

from __future__ import annotations

import gzip
import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.binance import (
    BinanceMarketData,
    BookTickerMsg,
    BookUpdate,
    DepthSnapshotMsg,
    DepthUpdateMsg,
    LocalOrderBook,
    Market,
    ParseError,
    decode_message,
    interval_seconds,
    parse_message,
    to_event,
)
from bot.events import AggressorSide, Bar, FeedState, FeedStatus, MarkPrice, Quote, Trade, Venue

FIXTURE = Path(__file__).parent / "fixtures" / "binance" / "hftbacktest_spot_btcusdt_20240808_first3000.gz"
HFT_FILES: list[tuple[str, Market, str, dict[str, int]]] = [
    # file, market, symbol, message counts from PROVENANCE.md
    ("spot/btcusdt_20240808.gz", "spot", "BTCUSDT", {"bookTicker": 28040, "trade": 9757, "depth": 3451}),
    ("spot/ethusdt_20240808.gz", "spot", "ETHUSDT", {"bookTicker": 24077, "trade": 6106, "depth": 3434}),
    ("usdm/ethusdt_20240808.gz", "usdm", "ETHUSDT", {"bookTicker": 53992, "trade": 14076, "depth": 6586}),
]
CRYPTOFEED_FILES: list[tuple[str, Market]] = [("BINANCE", "spot"), ("BINANCE_FUTURES", "usdm")]
MS = 1_000_000
VENUES = {"spot": Venue.BINANCE, "usdm": Venue.BINANCE_USDM}


# --- readers of the recorded formats -----------------------------------------------------------


def hft_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """hftbacktest: ``<local ns> <raw message>`` per line."""
    with gzip.open(path, "rb") as lines:
        for line in lines:
            ts, _, raw = line.rstrip(b"\n").partition(b" ")
            yield int(ts), raw


def is_snapshot(raw: bytes) -> bool:
    return raw.startswith(b'{"lastUpdateId"')


def stream_kind(raw: bytes) -> str:
    """``trade``, ``bookTicker``, ``depth``… from the combined-stream name."""
    stream = json.loads(raw)["stream"]
    return stream.split("@")[1]


def cryptofeed_messages(path: Path) -> Iterator[tuple[int, str]]:
    """cryptofeed ws recording: ``<epoch seconds>: <raw message>``; header lines name the URL."""
    for line in path.read_text().splitlines():
        if not line or line.startswith("wss://"):
            continue
        ts, _, raw = line.partition(": ")
        yield round(float(ts) * 1e9), raw


def cryptofeed_snapshots(path: Path) -> Iterator[tuple[int, str, str]]:
    """cryptofeed http recording: ``<url> -> <epoch seconds>: <body>``; yields (ns, symbol, body)."""
    for line in path.read_text().splitlines():
        url, arrow, rest = line.partition(" -> ")
        if not arrow:
            continue
        ts, _, body = rest.partition(": ")
        match = re.search(r"symbol=(\w+)", url)
        assert match is not None
        yield round(float(ts) * 1e9), match.group(1), body


def data_of(raw: str | bytes) -> dict[str, Any]:
    message = json.loads(raw)
    return message["data"] if "stream" in message else message


def only(events: list[Any], kind: type) -> Any:
    assert len(events) == 1 and isinstance(events[0], kind), events
    return events[0]


def recorded_ws_messages(shared_data: Path) -> Iterator[tuple[Market, int, str | bytes]]:
    """(market, ts_recv, raw) of every recorded Binance websocket message except depth snapshots."""
    for name, market, _, _ in HFT_FILES:
        for ts, raw in hft_lines(shared_data / "hftbacktest" / name):
            if not is_snapshot(raw):
                yield market, ts, raw
    for name, market in CRYPTOFEED_FILES:
        for ts, raw in cryptofeed_messages(shared_data / "cryptofeed" / f"{name}.ws.1.0.txt"):
            yield market, ts, raw


def docs_fixtures(shared_data: Path) -> dict[str, str]:
    folder = shared_data / "reference_fixtures" / "binance_ws_docs"
    return {path.stem: path.read_text() for path in sorted(folder.glob("*.json"))}


# --- one test per message kind -----------------------------------------------------------------


def check_trade(trade: Trade, data: dict[str, Any], ts: int, venue: str, id_field: str) -> None:
    assert trade.instrument == f"{venue}:{data['s']}"
    assert trade.price == float(data["p"]) and trade.size == float(data["q"])
    assert trade.ts_event == data["T"] * MS and trade.ts_recv == ts
    assert trade.trade_id == str(data[id_field])
    assert trade.aggressor_side is (AggressorSide.SELL if data["m"] else AggressorSide.BUY)


@pytest.mark.parametrize(("name", "market", "symbol", "counts"), HFT_FILES)
def test_trades_equal_recorded_values(
    shared_data: Path, name: str, market: Market, symbol: str, counts: dict[str, int]
) -> None:
    venue = "BINANCE" if market == "spot" else "BINANCE_USDM"
    sides: Counter[AggressorSide] = Counter()
    for ts, raw in hft_lines(shared_data / "hftbacktest" / name):
        if b"@trade" in raw[:40]:
            trade = only(parse_message(raw, ts, market), Trade)
            check_trade(trade, data_of(raw), ts, venue, "t")
            sides[trade.aggressor_side] += 1
    assert sum(sides.values()) == counts["trade"]
    assert sides[AggressorSide.BUY] > 0 and sides[AggressorSide.SELL] > 0


def test_agg_trades_equal_recorded_values(shared_data: Path) -> None:
    checked = Counter[str]()
    for name, market in CRYPTOFEED_FILES:
        venue = "BINANCE" if market == "spot" else "BINANCE_USDM"
        for ts, raw in cryptofeed_messages(shared_data / "cryptofeed" / f"{name}.ws.1.0.txt"):
            if '"e":"aggTrade"' in raw:
                check_trade(only(parse_message(raw, ts, market), Trade), data_of(raw), ts, venue, "a")
                checked[name] += 1
    docs = docs_fixtures(shared_data)
    for stem, market in (("py_ws_spot_agg_trade", "spot"), ("futures_agg_trade_stream", "usdm")):
        venue = "BINANCE" if market == "spot" else "BINANCE_USDM"
        check_trade(only(parse_message(docs[stem], 7, market), Trade), data_of(docs[stem]), 7, venue, "a")
    assert checked == {"BINANCE": 2, "BINANCE_FUTURES": 91}


def check_quote(quote: Quote, data: dict[str, Any], ts: int, venue: str) -> None:
    assert quote.instrument == f"{venue}:{data['s']}"
    assert (quote.bid, quote.bid_size, quote.ask, quote.ask_size) == (
        float(data["b"]),
        float(data["B"]),
        float(data["a"]),
        float(data["A"]),
    )
    # spot bookTicker has no exchange time: the receive time stands in
    assert quote.ts_event == (data["E"] * MS if "E" in data else ts) and quote.ts_recv == ts


def test_book_tickers_equal_recorded_values_spot_and_futures(shared_data: Path) -> None:
    checked = Counter[str]()
    for name, market, _, counts in HFT_FILES:
        venue = "BINANCE" if market == "spot" else "BINANCE_USDM"
        for ts, raw in hft_lines(shared_data / "hftbacktest" / name):
            if b"@bookTicker" in raw[:40]:
                check_quote(only(parse_message(raw, ts, market), Quote), data_of(raw), ts, venue)
                checked[name] += 1
        assert checked[name] == counts["bookTicker"]
    for name, market in CRYPTOFEED_FILES:
        venue = "BINANCE" if market == "spot" else "BINANCE_USDM"
        for ts, raw in cryptofeed_messages(shared_data / "cryptofeed" / f"{name}.ws.1.0.txt"):
            if "@bookTicker" in raw[:40]:
                check_quote(only(parse_message(raw, ts, market), Quote), data_of(raw), ts, venue)
                checked[name] += 1
    docs = docs_fixtures(shared_data)
    for stem, market in (("py_ws_spot_ticker_book", "spot"), ("futures_book_ticker_stream", "usdm")):
        venue = "BINANCE" if market == "spot" else "BINANCE_USDM"
        check_quote(only(parse_message(docs[stem], 5, market), Quote), data_of(docs[stem]), 5, venue)
    assert checked["BINANCE"] == 84 and checked["BINANCE_FUTURES"] == 613


def check_bar(bar: Bar, data: dict[str, Any], ts: int, venue: str) -> None:
    kline = data["k"]
    assert bar.instrument == f"{venue}:{data['s']}" and bar.interval_s == 60
    assert (bar.open, bar.high, bar.low, bar.close, bar.volume) == tuple(
        float(kline[key]) for key in ("o", "h", "l", "c", "v")
    )
    assert bar.closed is kline["x"] and bar.ts_event == data["E"] * MS and bar.ts_recv == ts


def test_klines_equal_recorded_values(shared_data: Path) -> None:
    closed = Counter[bool]()
    checked = Counter[str]()
    for name, market in CRYPTOFEED_FILES:
        venue = "BINANCE" if market == "spot" else "BINANCE_USDM"
        for ts, raw in cryptofeed_messages(shared_data / "cryptofeed" / f"{name}.ws.1.0.txt"):
            if '"e":"kline"' in raw:
                bar = only(parse_message(raw, ts, market), Bar)
                check_bar(bar, data_of(raw), ts, venue)
                closed[bar.closed] += 1
                checked[name] += 1
    docs = docs_fixtures(shared_data)
    for stem in ("futures_kline_stream_closed", "futures_kline_stream_open"):
        bar = only(parse_message(docs[stem], 3, "usdm"), Bar)
        check_bar(bar, data_of(docs[stem]), 3, "BINANCE_USDM")
        closed[bar.closed] += 1
    assert checked == {"BINANCE": 2, "BINANCE_FUTURES": 67}
    assert closed[True] >= 2 and closed[False] >= 2  # both states of the x flag are exercised


def test_mark_price_carries_funding_rate_and_next_funding_time(shared_data: Path) -> None:
    raw = docs_fixtures(shared_data)["futures_mark_price_stream"]
    mark = only(parse_message(raw, 11, "usdm"), MarkPrice)
    assert mark.instrument == "BINANCE_USDM:BTCUSDT"
    assert mark.mark_price == float("11794.15000000") and mark.index_price == float("11784.62659091")
    assert mark.funding_rate == float("0.00038167")
    assert mark.next_funding_ts == 1562306400000 * MS and mark.ts_event == 1562305380000 * MS
    # the same message wrapped as a combined stream, as the feed receives it
    wrapped = json.dumps({"stream": "btcusdt@markPrice@1s", "data": json.loads(raw)})
    assert parse_message(wrapped, 11, "usdm") == [mark]


def test_every_recorded_message_parses_without_error(shared_data: Path) -> None:
    kinds = Counter[str]()
    for market, ts, raw in recorded_ws_messages(shared_data):
        payload = decode_message(raw)  # raises on any error
        kinds[type(payload).__name__] += 1
        # depth diffs give events only through a book; every other message gives one event
        if not isinstance(payload, DepthUpdateMsg):
            assert payload is not None and to_event(payload, ts, VENUES[market]).ts_recv == ts
    assert kinds == {
        "BookTickerMsg": 28040 + 24077 + 53992 + 84 + 613,
        "TradeMsg": 9757 + 6106 + 14076,
        "DepthUpdateMsg": 3451 + 3434 + 6586 + 177 + 764,
        "AggTradeMsg": 2 + 91,
        "KlineMsg": 2 + 67,
    }
    docs = docs_fixtures(shared_data)
    assert len(docs) == 17
    for stem, raw in docs.items():
        events = parse_message(raw, 1, "usdm" if "futures" in stem else "spot")
        if "ticker_24hr" in stem or stem in ("futures_ticker_stream", "futures_liquidation_stream"):
            assert events == [], stem  # statistics and liquidation orders: deliberately not events
        elif "depth" in stem:
            assert events == [] and isinstance(decode_message(raw), DepthUpdateMsg)
        else:
            assert len(events) == 1, stem


# --- local order book ----------------------------------------------------------------------------


def book_tops_vs_book_tickers(
    lines: Iterator[tuple[int, str | bytes]], symbol: str, market: Market
) -> tuple[LocalOrderBook, Counter[BookUpdate], int]:
    """Run a book over a recording: the outcomes of its diffs, and how many tops had a bookTicker to match.

    Asserts that every top with a bookTicker of the same update id equals it.
    """
    book = LocalOrderBook(symbol, market)
    tops: dict[int, tuple[float, float, float, float] | None] = {}
    tickers: dict[int, tuple[float, float, float, float]] = {}
    outcomes: Counter[BookUpdate] = Counter()
    for _, raw in lines:
        message = decode_message(raw)
        if isinstance(message, DepthSnapshotMsg):
            assert book.apply_snapshot(message) is BookUpdate.APPLIED  # the buffered diffs continue it
        elif isinstance(message, DepthUpdateMsg) and message.symbol == symbol:
            outcome = book.apply_diff(message)
            outcomes[outcome] += 1
            if outcome is BookUpdate.APPLIED:
                assert book.last_update_id is not None
                tops[book.last_update_id] = book.top()
        elif isinstance(message, BookTickerMsg) and message.symbol == symbol:
            tickers[message.update_id] = (
                float(message.bid),
                float(message.bid_size),
                float(message.ask),
                float(message.ask_size),
            )
    common = tops.keys() & tickers.keys()
    assert all(tops[u] == tickers[u] for u in common), [u for u in common if tops[u] != tickers[u]][:5]
    return book, outcomes, len(common)


@pytest.mark.parametrize(("name", "market", "symbol", "counts"), HFT_FILES)
def test_book_follows_whole_recording_and_matches_book_ticker(
    shared_data: Path, name: str, market: Market, symbol: str, counts: dict[str, int]
) -> None:
    path = shared_data / "hftbacktest" / name
    book, outcomes, compared = book_tops_vs_book_tickers(hft_lines(path), symbol, market)
    # every diff passes the sequence checks: those before the snapshot are buffered (and replayed
    # by it), those it already contains are dropped, every later one continues the book
    assert outcomes[BookUpdate.GAP] == 0
    assert sum(outcomes.values()) == counts["depth"]
    assert outcomes[BookUpdate.APPLIED] > 0.99 * counts["depth"]
    last_diff = next(data_of(raw) for _, raw in reversed(list(hft_lines(path))) if b"@depth" in raw[:40])
    assert book.last_update_id == last_diff["u"]  # followed to the end of the recording
    assert compared > 500  # and its top equals the recorded bookTicker at every shared update id


@pytest.mark.parametrize(("name", "market"), CRYPTOFEED_FILES)
def test_cryptofeed_books_sync_from_recorded_snapshots(shared_data: Path, name: str, market: Market) -> None:
    folder = shared_data / "cryptofeed"
    messages = list(cryptofeed_messages(folder / f"{name}.ws.1.0.txt"))
    snapshots = list(cryptofeed_snapshots(folder / f"{name}.http.0.0.txt"))
    compared = 0
    for _, symbol, _ in snapshots:
        # the snapshot was taken while the stream ran: merge both by local receive time
        merged = sorted(
            [(ts, raw) for ts, raw in messages] + [(ts, body) for ts, s, body in snapshots if s == symbol],
            key=lambda item: item[0],
        )
        _, outcomes, common = book_tops_vs_book_tickers(iter(merged), symbol, market)
        assert outcomes[BookUpdate.GAP] == 0 and outcomes[BookUpdate.APPLIED] >= 1, (symbol, outcomes)
        compared += common
    assert compared >= 20


class ReferenceBook:
    """Independent plain replay of a recording, to play the exchange's REST snapshot at any update."""

    def __init__(self, snapshot: dict[str, Any]) -> None:
        self.last = snapshot["lastUpdateId"]
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

    def snapshot(self) -> bytes:
        return json.dumps(
            {
                "lastUpdateId": self.last,
                **{side: list(levels.values()) for side, levels in self.sides.items()},
            }
        ).encode()


def test_missing_diff_gives_gap_then_resnapshot_then_recovered() -> None:
    lines = list(hft_lines(FIXTURE))
    snapshot_raw = next(raw for _, raw in lines if is_snapshot(raw))
    depth_at = [i for i, (_, raw) in enumerate(lines) if b"@depth" in raw[:40]]
    removed = depth_at[100]  # one diff lost in the network
    market_data = BinanceMarketData("spot")
    reference = ReferenceBook(json.loads(snapshot_raw))
    statuses: list[FeedStatus] = []
    quotes_after_recovery: list[Quote] = []
    tickers: dict[int, bytes] = {}
    resnapshot_at = depth_at[120]
    for index, (ts, raw) in enumerate(lines):
        if is_snapshot(raw):
            events = market_data.on_snapshot("BTCUSDT", raw, ts)
        elif index == removed:
            events = []
        else:
            events = market_data.on_message(raw, ts)
        if b"@depth" in raw[:40]:
            reference.apply(data_of(raw))  # the exchange's book has the diff this client lost
        if index == resnapshot_at:
            book = market_data.book("BTCUSDT")
            assert not book.synced and market_data.symbols_awaiting_snapshot() == ["BTCUSDT"]
            # the snapshot from before the gap is behind the buffered diffs: still no book
            assert market_data.on_snapshot("BTCUSDT", snapshot_raw, ts) == []
            assert not book.synced
            # the exchange's book as of now resyncs it
            events += market_data.on_snapshot("BTCUSDT", reference.snapshot(), ts)
            assert book.synced and book.last_update_id == reference.last
        statuses += [e for e in events if isinstance(e, FeedStatus)]
        if statuses and statuses[-1].status is FeedState.RECOVERED:
            quotes_after_recovery += [e for e in events if isinstance(e, Quote)]
        if b"@bookTicker" in raw[:40]:
            tickers[data_of(raw)["u"]] = raw
    assert [(s.feed, s.status) for s in statuses] == [
        ("BINANCE:BTCUSDT", FeedState.GAP),
        ("BINANCE:BTCUSDT", FeedState.RECOVERED),
    ]
    assert market_data.stats.gaps == 1 and market_data.stats.snapshots == 3
    removed_diff = data_of(lines[removed][1])
    assert (
        f"book at update {removed_diff['U'] - 1}, diff covers {removed_diff['u'] + 1}.." in statuses[0].detail
    )
    # after recovery the book is the exchange's again: its top equals the reference replay's
    book = market_data.book("BTCUSDT")
    reference_top = (
        max(reference.sides["bids"]),
        float(reference.sides["bids"][max(reference.sides["bids"])][1]),
        min(reference.sides["asks"]),
        float(reference.sides["asks"][min(reference.sides["asks"])][1]),
    )
    assert book.top() == reference_top and book.last_update_id == reference.last
    assert len(quotes_after_recovery) > 100


def test_spot_sequence_rules() -> None:
    book = LocalOrderBook("BTCUSDT", "spot")
    diff = _diff(first=5, final=8, bids=[("10.0", "1")], asks=[("11.0", "2")])
    assert book.apply_diff(diff) is BookUpdate.BUFFERED and not book.synced
    # snapshot at 9 contains the buffered diff (u <= lastUpdateId): dropped on replay
    assert book.apply_snapshot(_snapshot(9, bids=[("9.0", "3")], asks=[("12.0", "4")])) is BookUpdate.APPLIED
    assert book.top() == (9.0, 3.0, 12.0, 4.0)
    assert book.apply_diff(_diff(first=7, final=9, bids=[("9.5", "1")])) is BookUpdate.DUPLICATE
    # first event must straddle lastUpdateId + 1
    assert book.apply_diff(_diff(first=9, final=11, bids=[("9.5", "1")])) is BookUpdate.APPLIED
    assert book.apply_diff(_diff(first=12, final=12, bids=[("9.5", "0"), ("8.0", "0")])) is BookUpdate.APPLIED
    assert book.bids == {9.0: 3.0}  # 0 removes, removing an absent level is harmless
    assert book.apply_diff(_diff(first=14, final=15, asks=[("11.5", "1")])) is BookUpdate.GAP  # 13 missing
    assert not book.synced and book.top() is None and "update 12" in book.last_gap


def test_futures_sequence_rules() -> None:
    book = LocalOrderBook("BTCUSDT", "usdm")
    book.apply_snapshot(_snapshot(100, bids=[("1.0", "1")], asks=[("2.0", "1")]))
    assert (
        book.apply_diff(_diff(first=90, final=99, previous=80, bids=[("1.5", "1")])) is BookUpdate.DUPLICATE
    )
    # first processed event: U <= lastUpdateId <= u (u == lastUpdateId included)
    assert book.apply_diff(_diff(first=95, final=100, previous=90, bids=[("1.1", "1")])) is BookUpdate.APPLIED
    assert (
        book.apply_diff(_diff(first=104, final=110, previous=100, asks=[("1.9", "5")])) is BookUpdate.APPLIED
    )
    assert book.top() == (1.1, 1.0, 1.9, 5.0)
    # ids are not contiguous on futures: only pu tells a gap
    assert book.apply_diff(_diff(first=120, final=130, previous=115)) is BookUpdate.GAP
    assert not book.synced


def test_snapshot_older_than_buffer_is_a_gap() -> None:
    book = LocalOrderBook("BTCUSDT", "spot")
    book.apply_diff(_diff(first=50, final=60, bids=[("1.0", "1")]))
    assert book.apply_snapshot(_snapshot(40, bids=[("1.0", "2")], asks=[("2.0", "1")])) is BookUpdate.GAP
    assert not book.synced
    # a newer snapshot then works with the diff kept in the buffer
    assert book.apply_snapshot(_snapshot(55, bids=[("1.0", "2")], asks=[("2.0", "1")])) is BookUpdate.APPLIED
    assert book.last_update_id == 60 and book.bids == {1.0: 1.0}


def test_book_quotes_never_roll_back_behind_book_ticker() -> None:
    """bookTicker and depth share update ids: a book quote older than the last bookTicker is not sent."""
    market_data = BinanceMarketData("spot")
    market_data.on_snapshot("BTCUSDT", _snapshot_json(10, bids=[("1.0", "1")], asks=[("2.0", "1")]), 1)
    ticker = json.dumps({"u": 20, "s": "BTCUSDT", "b": "1.5", "B": "1", "a": "2.0", "A": "1"})
    assert len(market_data.on_message(ticker, 2)) == 1
    old_diff = _diff_json(11, 15, bids=[("1.2", "1")])
    assert market_data.on_message(old_diff, 3) == []  # applied to the book, but older than the ticker
    assert market_data.book("BTCUSDT").top() == (1.2, 1.0, 2.0, 1.0)
    newer = _diff_json(16, 25, bids=[("1.5", "1"), ("1.6", "2")])
    assert market_data.on_message(newer, 4) == [
        Quote(
            ts_event=1 * MS,  # the diff's event time E
            ts_recv=4,
            instrument="BINANCE:BTCUSDT",
            bid=1.6,
            bid_size=2.0,
            ask=2.0,
            ask_size=1.0,
        )
    ]
    assert market_data.on_message(ticker, 5) == []  # the same bookTicker again (reconnect): dropped


def test_repeated_trades_are_dropped_by_trade_id() -> None:
    lines = [raw for _, raw in hft_lines(FIXTURE) if b"@trade" in raw[:40]]
    market_data = BinanceMarketData("spot")
    first = [e for raw in lines[:50] for e in market_data.on_message(raw, 1)]
    again = [e for raw in lines[40:80] for e in market_data.on_message(raw, 2)]
    assert [t.trade_id for t in first + again] == [str(data_of(raw)["t"]) for raw in lines[:80]]
    assert market_data.stats.duplicates == 10


# --- malformed input -------------------------------------------------------------------------------


TRADE = {"e": "trade", "E": 1, "s": "BTCUSDT", "t": 5, "p": "1.5", "q": "2", "T": 1, "m": True}
KLINE = {"t": 0, "i": "1m", "o": "1", "h": "1", "l": "1", "c": "1", "v": "1", "x": True}


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "not JSON"),
        ("not json", "not JSON"),
        ('{"stream":"btcusdt@trade","data":{"e":"trade","E":17231', "not JSON"),
        ("[1, 2]", "JSON object"),
        ('{"stream": "btcusdt@trade", "data": 5}', "data object"),
        (json.dumps({**TRADE, "e": "somethingNew"}), "unknown event type"),
        (json.dumps({"x": 1}), "unknown shape"),
        (json.dumps({"code": 2, "msg": "Invalid request"}), "error from Binance"),
        (json.dumps({**TRADE, "p": 1.5}), r"Expected `str`, got `float` - at `\$.p`"),
        (json.dumps({k: v for k, v in TRADE.items() if k != "t"}), "missing required field `t`"),
        (json.dumps({**TRADE, "p": "abc"}), "invalid number"),
        (json.dumps({**TRADE, "m": "yes"}), "Expected `bool`"),
        (json.dumps({"e": "kline", "E": 1, "s": "X", "k": {**KLINE, "i": "1M"}}), "1M"),
        (
            json.dumps({"e": "depthUpdate", "E": 1, "s": "X", "U": 1, "u": 2, "b": [["1"]], "a": []}),
            "length 2",
        ),
    ],
)
def test_malformed_messages_raise_parse_error(raw: str | bytes, reason: str) -> None:
    with pytest.raises(ParseError, match=reason):
        parse_message(raw, 1)


def test_acks_and_snapshots_give_no_events() -> None:
    assert parse_message('{"result":null,"id":1}', 1) == []
    assert parse_message('{"lastUpdateId":5,"bids":[["1.0","2"]],"asks":[]}', 1) == []


def test_bad_number_in_diff_leaves_book_untouched_and_next_diff_is_a_gap() -> None:
    market_data = BinanceMarketData("spot")
    market_data.on_snapshot("BTCUSDT", _snapshot_json(10, bids=[("1.0", "1")], asks=[("2.0", "1")]), 1)
    with pytest.raises(ParseError):
        market_data.on_message(_diff_json(11, 12, bids=[("1.1", "x")]), 2)
    assert market_data.book("BTCUSDT").top() == (1.0, 1.0, 2.0, 1.0)
    events = market_data.on_message(_diff_json(13, 14, bids=[("1.1", "1")]), 3)
    assert [e.status for e in events if isinstance(e, FeedStatus)] == [FeedState.GAP]


def test_default_receive_time_is_now() -> None:
    before = time.time_ns()
    trade = only(parse_message(json.dumps(TRADE)), Trade)
    assert before <= trade.ts_recv <= time.time_ns()
    assert trade.instrument == "BINANCE:BTCUSDT"
    assert only(parse_message(json.dumps(TRADE), 1, "usdm"), Trade).instrument == "BINANCE_USDM:BTCUSDT"


def test_interval_seconds() -> None:
    assert [interval_seconds(i) for i in ("1s", "1m", "15m", "4h", "1d", "1w")] == [
        1,
        60,
        900,
        14400,
        86400,
        604800,
    ]


_SAMPLE = [raw for _, raw in list(hft_lines(FIXTURE))[:400]]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(_SAMPLE), st.data())
def test_damaged_messages_only_ever_raise_parse_error(raw: bytes, data: st.DataObject) -> None:
    """Truncated or corrupted frames never escape as anything but ParseError."""
    cut = data.draw(st.integers(0, len(raw)))
    position = data.draw(st.integers(0, max(len(raw) - 1, 0)))
    byte = data.draw(st.integers(0, 255))
    for damaged in (raw[:cut], raw[:position] + bytes([byte]) + raw[position + 1 :]):
        market_data = BinanceMarketData("spot")
        try:
            events = market_data.on_message(damaged, 1)
        except ParseError:
            continue
        assert all(e.ts_recv == 1 for e in events)


# --- builders for hand-made book messages ----------------------------------------------------------


def _diff(
    first: int,
    final: int,
    previous: int | None = None,
    bids: list[tuple[str, str]] | None = None,
    asks: list[tuple[str, str]] | None = None,
) -> DepthUpdateMsg:
    message = decode_message(_diff_json(first, final, previous, bids, asks))
    assert isinstance(message, DepthUpdateMsg)
    return message


def _diff_json(
    first: int,
    final: int,
    previous: int | None = None,
    bids: list[tuple[str, str]] | None = None,
    asks: list[tuple[str, str]] | None = None,
) -> str:
    data: dict[str, Any] = {"e": "depthUpdate", "E": 1, "s": "BTCUSDT", "U": first, "u": final}
    if previous is not None:
        data["pu"] = previous
    data["b"], data["a"] = bids or [], asks or []
    return json.dumps(data)


def _snapshot(last: int, bids: list[tuple[str, str]], asks: list[tuple[str, str]]) -> DepthSnapshotMsg:
    message = decode_message(_snapshot_json(last, bids, asks))
    assert isinstance(message, DepthSnapshotMsg)
    return message


def _snapshot_json(last: int, bids: list[tuple[str, str]], asks: list[tuple[str, str]]) -> str:
    return json.dumps({"lastUpdateId": last, "bids": bids, "asks": asks})
