"""Deribit adapter against real recorded Deribit messages: parsing, the SVI surface of a real chain,
and the live feed over a local JSON-RPC websocket server."""

from __future__ import annotations

import ast
import asyncio
import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
import pytest
from wsreplay import Frame as WsFrame
from wsreplay import ReplayServer, Session

from adapters.connection import BackoffConfig, ConnectionConfig
from adapters.deribit import (
    NANOS_PER_MILLI,
    DeribitFeed,
    DeribitFeedConfig,
    OptionName,
    ParseError,
    SurfaceBuilder,
    SurfaceConfig,
    parse_message,
    parse_option_name,
)
from bot.events import (
    AggressorSide,
    Bar,
    Event,
    FeedState,
    FeedStatus,
    IVSurface,
    MarkPrice,
    OptionMark,
    Quote,
    Trade,
    VolatilityIndex,
)
from models import grid

CAPTURE = Path("cryptofeed") / "DERIBIT.ws.1.0.txt"
INSTRUMENTS = Path("cryptofeed") / "DERIBIT.0.txt"
REFERENCE = Path("reference_fixtures") / "deribit"
CHAIN = Path("deribit_chains") / "btc_options_snapshot_2020-05-14.csv"
ONE_WEEK_YEARS = 7.0 / 365.0
# The fields of a Deribit option ticker notification, as the capture's tickers carry them.
TICKER_FIELDS = (
    *("underlying_price", "underlying_index", "timestamp", "stats", "state", "settlement_price"),
    *("open_interest", "min_price", "max_price", "mark_price", "mark_iv", "last_price", "interest_rate"),
    *("instrument_name", "index_price", "greeks", "estimated_delivery_price", "bid_iv", "best_bid_price"),
    *("best_bid_amount", "best_ask_price", "best_ask_amount", "ask_iv"),
)


# --- recorded data ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """One line of a cryptofeed raw recording: the local time in ns and the frame, sent or received."""

    ts_ns: int
    sent: bool
    body: str


def _seconds_to_ns(text: str) -> int:
    """cryptofeed's float seconds, exactly (a float would lose the last digits)."""
    whole, _, fraction = text.partition(".")
    return int(whole) * 1_000_000_000 + int((fraction + "0" * 9)[:9])


def read_capture(path: Path) -> list[Frame]:
    """Frames of a cryptofeed ``*.ws.*.txt`` file; the header line and blank lines are skipped."""
    frames = []
    for line in path.read_text().splitlines()[1:]:
        if not line.strip():
            continue
        head, _, body = line.partition(": ")
        sent = " <- " in head
        frames.append(Frame(_seconds_to_ns(head.rpartition(" ")[2]), sent, body))
    return frames


def read_instruments(path: Path, currency: str) -> list[dict]:
    """The recorded ``public/get_instruments?currency=<currency>`` result."""
    for line in path.read_text().splitlines():
        url, _, rest = line.partition(" -> ")
        if f"currency={currency}&" in url:
            return json.loads(rest.partition(": ")[2])["result"]
    raise LookupError(f"no get_instruments for {currency} in {path}")


def ticker_data(frame: Frame) -> dict:
    return json.loads(frame.body)["params"]["data"]


def channel_of(frame: Frame) -> str:
    return json.loads(frame.body).get("params", {}).get("channel", "")


@pytest.fixture(scope="module")
def capture(shared_data: Path) -> list[Frame]:
    return read_capture(shared_data / CAPTURE)


@pytest.fixture(scope="module")
def received(capture: list[Frame]) -> list[Frame]:
    return [frame for frame in capture if not frame.sent]


def reference(shared_data: Path, name: str) -> str:
    return (shared_data / REFERENCE / name).read_text()


def _number(text: str) -> float | None:
    return float(text) if text else None


def chain_rows(path: Path) -> list[dict]:
    """The 2020-05-14 chain, in quote-time order."""
    with path.open(newline="") as handle:
        return sorted(csv.DictReader(handle), key=lambda row: int(row["timestamp"]))


def chain_ticker(row: dict, interval: str = "100ms") -> str:
    """A chain row as the ticker notification Deribit sent for it (same fields as the capture's)."""
    data: dict = {}
    for name in TICKER_FIELDS:
        text = row[name]
        if name in ("stats", "greeks"):
            data[name] = ast.literal_eval(text)
        elif name in ("underlying_index", "state", "instrument_name"):
            data[name] = text
        elif name == "timestamp":
            data[name] = int(text)
        else:
            data[name] = _number(text)
    channel = f"ticker.{row['instrument_name']}.{interval}"
    return json.dumps(
        {"jsonrpc": "2.0", "method": "subscription", "params": {"channel": channel, "data": data}}
    )


@pytest.fixture(scope="module")
def chain(shared_data: Path) -> list[dict]:
    path = shared_data / CHAIN
    if not path.is_file():
        pytest.skip(f"Deribit chain snapshot not found at {path}")
    return chain_rows(path)


# --- parsing: the cryptofeed capture --------------------------------------------------------------


def test_every_received_frame_of_the_capture_parses(received: list[Frame]) -> None:
    kinds: dict[str, int] = {}
    for frame in received:
        parse_message(frame.body, frame.ts_ns)
        kind = channel_of(frame).partition(".")[0] or "response"
        kinds[kind] = kinds.get(kind, 0) + 1
    assert kinds == {"ticker": 89, "book": 46, "response": 1}


def test_option_tickers_become_marks_equal_to_the_source(received: list[Frame]) -> None:
    tickers = [frame for frame in received if channel_of(frame).startswith("ticker.")]
    one_sided = 0
    for frame in tickers:
        data = ticker_data(frame)
        [mark] = parse_message(frame.body, frame.ts_ns)
        assert isinstance(mark, OptionMark)
        name = data["instrument_name"]
        underlying, _, strike, right = name.split("-")
        assert mark.instrument == f"DERIBIT:{name}"
        assert (mark.underlying, mark.strike, mark.is_call) == (underlying, float(strike), right == "C")
        assert mark.ts_event == data["timestamp"] * 1_000_000 and mark.ts_recv == frame.ts_ns
        assert mark.mark_price == data["mark_price"]
        assert mark.mark_iv == data["mark_iv"] / 100.0
        for side in ("bid_iv", "ask_iv"):
            expected = None if data[side] == 0.0 else data[side] / 100.0
            assert getattr(mark, side) == expected
            one_sided += expected is None
        assert mark.underlying_price == data["underlying_price"]
        assert mark.index_price == data["index_price"]
    assert len(tickers) == 89 and one_sided > 0  # the capture has empty sides: they come out as None


def test_option_expiry_is_eight_utc_on_the_named_date_as_get_instruments_says(shared_data: Path) -> None:
    """Every BTC and ETH option listed on 2021-07-22: the name gives Deribit's own expiry and strike."""
    options = [
        row
        for currency in ("BTC", "ETH")
        for row in read_instruments(shared_data / INSTRUMENTS, currency)
        if row["kind"] == "option"
    ]
    assert len(options) > 700
    for row in options:
        parsed = parse_option_name(row["instrument_name"])
        assert parsed == OptionName(
            underlying=row["base_currency"],
            expiry_ts=row["expiration_timestamp"] * NANOS_PER_MILLI,
            strike=row["strike"],
            is_call=row["option_type"] == "call",
        )


def test_option_names_with_one_digit_days_and_decimal_strikes() -> None:
    assert parse_option_name("BTC-4JUN21-36000-P") == OptionName("BTC", 1_622_793_600 * 10**9, 36000.0, False)
    assert parse_option_name("XRP_USDC-30MAY25-2d5-C") == OptionName(
        "XRP_USDC", 1_748_592_000 * 10**9, 2.5, True
    )
    for not_an_option in ("BTC-PERPETUAL", "BTC-25JUN21", "BTC-31FEB21-30000-C", "BTC-25XYZ21-30000-C"):
        assert parse_option_name(not_an_option) is None


def test_book_frames_and_the_subscribe_ack_give_no_events(received: list[Frame]) -> None:
    silent = [frame for frame in received if not channel_of(frame).startswith("ticker.")]
    assert len(silent) == 47
    assert all(parse_message(frame.body, frame.ts_ns) == [] for frame in silent)


# --- parsing: reference fixtures ------------------------------------------------------------------


def test_perpetual_ticker_gives_quote_and_mark_with_funding(shared_data: Path) -> None:
    raw = reference(shared_data, "ws_ticker.json")
    data = json.loads(raw)["params"]["data"]
    quote, mark = parse_message(raw, 7)
    ts = data["timestamp"] * 1_000_000
    assert quote == Quote(
        ts_event=ts,
        ts_recv=7,
        instrument="DERIBIT:BTC-PERPETUAL",
        bid=data["best_bid_price"],
        bid_size=data["best_bid_amount"],
        ask=data["best_ask_price"],
        ask_size=data["best_ask_amount"],
    )
    assert isinstance(mark, MarkPrice) and mark.ts_event == ts
    assert (mark.mark_price, mark.index_price, mark.funding_rate) == (
        data["mark_price"],
        data["index_price"],
        data["funding_8h"],
    )
    # 2025-12-12 12:11:14 UTC: the next 8-hour boundary is 16:00 UTC.
    assert mark.next_funding_ts == 1_765_555_200 * 10**9


def test_dated_future_ticker_gives_a_quote_only(shared_data: Path) -> None:
    """The perpetual's recorded ticker under a dated future's name, without the perpetual-only fields."""
    message = json.loads(reference(shared_data, "ws_ticker.json"))
    data = message["params"]["data"]
    for field in ("current_funding", "funding_8h", "interest_value"):
        del data[field]
    data["instrument_name"] = "BTC-27DEC24"
    message["params"]["channel"] = "ticker.BTC-27DEC24.100ms"
    [quote] = parse_message(json.dumps(message), 1)
    assert isinstance(quote, Quote) and quote.instrument == "DERIBIT:BTC-27DEC24"
    assert (quote.bid, quote.ask) == (data["best_bid_price"], data["best_ask_price"])


def test_dvol_becomes_a_decimal_volatility_index(shared_data: Path) -> None:
    raw = reference(shared_data, "ws_volatility_index.json")
    data = json.loads(raw)["params"]["data"]
    assert parse_message(raw, 3) == [
        VolatilityIndex(
            ts_event=data["timestamp"] * 1_000_000,
            ts_recv=3,
            instrument="DERIBIT:BTC-DVOL",
            value=data["volatility"] / 100.0,
        )
    ]


def test_quote_trades_and_chart_channels(shared_data: Path) -> None:
    quote_data = json.loads(reference(shared_data, "ws_quote.json"))["params"]["data"]
    [quote] = parse_message(reference(shared_data, "ws_quote.json"), 1)
    assert quote == Quote(
        ts_event=quote_data["timestamp"] * 1_000_000,
        ts_recv=1,
        instrument="DERIBIT:BTC-PERPETUAL",
        bid=quote_data["best_bid_price"],
        bid_size=quote_data["best_bid_amount"],
        ask=quote_data["best_ask_price"],
        ask_size=quote_data["best_ask_amount"],
    )

    rows = json.loads(reference(shared_data, "ws_trades.json"))["params"]["data"]
    trades = parse_message(reference(shared_data, "ws_trades.json"), 1)
    assert trades == [
        Trade(
            ts_event=row["timestamp"] * 1_000_000,
            ts_recv=1,
            instrument=f"DERIBIT:{row['instrument_name']}",
            price=row["price"],
            size=row["amount"],
            aggressor_side=AggressorSide.SELL,
            trade_id=row["trade_id"],
        )
        for row in rows
    ]

    candle = json.loads(reference(shared_data, "ws_chart.json"))["params"]["data"]
    [bar] = parse_message(reference(shared_data, "ws_chart.json"), 1)
    assert bar == Bar(
        ts_event=candle["tick"] * 1_000_000,
        ts_recv=1,
        instrument="DERIBIT:BTC-PERPETUAL",
        interval_s=60,
        open=candle["open"],
        high=candle["high"],
        low=candle["low"],
        close=candle["close"],
        volume=candle["volume"],
        closed=False,
    )


def test_book_snapshot_and_delta_give_no_events(shared_data: Path) -> None:
    assert parse_message(reference(shared_data, "ws_book_snapshot.json"), 1) == []
    assert parse_message(reference(shared_data, "ws_book_delta.json"), 1) == []


def test_heartbeats_and_responses_give_no_events() -> None:
    for raw in (
        '{"jsonrpc":"2.0","method":"heartbeat","params":{"type":"test_request"}}',
        '{"jsonrpc":"2.0","method":"heartbeat","params":{"type":"heartbeat"}}',
        '{"jsonrpc":"2.0","id":4,"result":"ok","usIn":1,"usOut":2,"usDiff":1,"testnet":false}',
        '{"jsonrpc":"2.0","id":5,"error":{"code":11050,"message":"bad_request"},"testnet":false}',
        '{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"parse_error"}}',
    ):
        assert parse_message(raw, 1) == []


def _edited_option_ticker(received: list[Frame], edit: str) -> str:
    """The capture's first option ticker with one deliberate defect."""
    message = json.loads(next(f.body for f in received if channel_of(f).startswith("ticker.")))
    data = message["params"]["data"]
    if edit == "no mark_iv":
        del data["mark_iv"]
    elif edit == "iv as text":
        data["mark_iv"] = str(data["mark_iv"])
    elif edit == "other instrument":
        data["instrument_name"] = "BTC-24SEP21-8000-P"
    elif edit == "no data":
        del message["params"]["data"]
    elif edit == "unknown channel":
        message["params"]["channel"] = "estimated_expiration_price.btc_usd"
    elif edit == "unknown method":
        message["method"] = "notification"
    elif edit == "not json-rpc 2.0":
        message["jsonrpc"] = "1.0"
    return json.dumps(message)


@pytest.mark.parametrize(
    "edit",
    [
        "no mark_iv",
        "iv as text",
        "other instrument",
        "no data",
        "unknown channel",
        "unknown method",
        "not json-rpc 2.0",
    ],
)
def test_defective_messages_raise_parse_error(received: list[Frame], edit: str) -> None:
    with pytest.raises(ParseError):
        parse_message(_edited_option_ticker(received, edit), 1)


def test_truncated_and_garbage_frames_raise_parse_error(received: list[Frame]) -> None:
    body = next(f.body for f in received if channel_of(f).startswith("ticker."))
    for raw in (body[: len(body) // 2], body[:-1], "", "garbage", b"\x00\xff", "[]", '{"jsonrpc":"2.0"}'):
        with pytest.raises(ParseError):
            parse_message(raw, 1)


def test_parse_error_names_the_defect(received: list[Frame]) -> None:
    with pytest.raises(ParseError, match=r"ticker\.ETH-30JUL21-2800-C\.raw.*mark_iv"):
        parse_message(_edited_option_ticker(received, "no mark_iv"), 1)
    with pytest.raises(ParseError, match="unknown channel"):
        parse_message(_edited_option_ticker(received, "unknown channel"), 1)


# --- the 2020-05-14 chain as a surface ------------------------------------------------------------


def _chain_marks(chain: list[dict]) -> list[OptionMark]:
    marks = []
    for row in chain:
        [mark] = parse_message(chain_ticker(row), int(row["timestamp"]) * NANOS_PER_MILLI)
        assert isinstance(mark, OptionMark)
        marks.append(mark)
    return marks


def _traded_range_points(chain: list[dict], now_ns: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Independent of the builder: out-of-the-money mark IVs inside each expiry's traded range
    (the strike span of its out-of-the-money options with a bid and an ask IV), from a week out."""
    by_expiry: dict[int, list[tuple[float, float, bool]]] = {}
    for row in chain:
        k = math.log(float(row["strike"]) / float(row["underlying_price"]))
        if (row["option_type"] == "call") != (k >= 0.0):
            continue
        two_sided = float(row["bid_iv"]) > 0.0 and float(row["ask_iv"]) > 0.0
        by_expiry.setdefault(int(row["expiration_timestamp"]), []).append(
            (k, float(row["mark_iv"]) / 100.0, two_sided)
        )
    t, k, iv = [], [], []
    for expiry_ms, rows in by_expiry.items():
        maturity = (expiry_ms * NANOS_PER_MILLI - now_ns) / (365 * 86_400 * 1e9)
        if maturity < ONE_WEEK_YEARS:
            continue
        live = [moneyness for moneyness, _, two_sided in rows if two_sided]
        for moneyness, mark_iv, _ in rows:
            if min(live) <= moneyness <= max(live):
                t.append(maturity)
                k.append(moneyness)
                iv.append(mark_iv)
    return np.array(t), np.array(k), np.array(iv)


def test_chain_instrument_names_give_the_recorded_expiry_and_strike(chain: list[dict]) -> None:
    for row in chain:
        option = parse_option_name(row["instrument_name"])
        assert option is not None
        assert option.expiry_ts == int(row["expiration_timestamp"]) * NANOS_PER_MILLI
        assert option.strike == float(row["strike"])
        assert option.is_call == (row["option_type"] == "call")


def test_chain_surface_fits_the_traded_marks_within_one_vol_point_without_arbitrage(
    chain: list[dict],
) -> None:
    builder = SurfaceBuilder()
    marks = _chain_marks(chain)
    for mark in marks:
        builder.on_mark(mark)
    now = marks[-1].ts_event
    surface = builder.build(now, marks[-1].ts_recv)
    fit = builder.last_fit
    assert surface is not None and fit is not None

    # Five expiries from 8 to 225 days; the 2-hour and 1-day ones are nearer than a week.
    assert len(fit.slices) == 5 and fit.expiries.min() > ONE_WEEK_YEARS
    t, k, iv = _traded_range_points(chain, now)
    assert t.size == 114
    rmse = float(np.sqrt(np.mean((fit.iv(k, t) - iv) ** 2)))
    assert rmse < 0.01  # 0.74 vol points
    assert fit.butterfly_free and fit.calendar_free

    assert surface.source == "deribit-svi" and surface.underlying == "BTC"
    assert surface.fit_rmse == fit.rmse_iv
    assert surface.ts_event == now and surface.ts_recv == marks[-1].ts_recv
    assert surface.log_moneyness == tuple(grid.LOG_MONEYNESS) and surface.maturities == tuple(grid.MATURITIES)
    assert np.array_equal(np.array(surface.iv), fit.iv_grid)
    assert surface.spot == marks[-1].index_price  # the latest index, whichever option brought it


def test_surface_quotes_are_the_fresh_two_sided_out_of_the_money_marks(chain: list[dict]) -> None:
    builder = SurfaceBuilder()
    marks = _chain_marks(chain)
    for mark in marks:
        builder.on_mark(mark)
    now = marks[-1].ts_event
    quotes = builder.quotes(now)
    assert quotes is not None
    expected = [
        mark
        for mark in marks
        if mark.expiry_ts - now >= 7 * 86_400 * 10**9
        and mark.bid_iv is not None
        and mark.ask_iv is not None
        and mark.is_call == (mark.strike >= mark.underlying_price)
    ]
    assert quotes.ivs.size == len(expected) == 114 and quotes.expiries == 5
    assert sorted(quotes.ivs) == sorted(mark.mark_iv for mark in expected)
    assert np.all(quotes.maturities >= ONE_WEEK_YEARS)
    spreads = sorted(max(m.ask_iv - m.bid_iv, 0.005) for m in expected)  # type: ignore[operator]
    assert np.allclose(sorted(1.0 / quotes.weights), spreads)

    # Five minutes without an update makes every mark stale; past the last expiry nothing is left.
    assert builder.quotes(now + 301 * 10**9) is None
    assert builder.build(max(m.expiry_ts for m in marks)) is None
    assert builder.quotes(now) is None  # expired options are forgotten


def test_surfaces_follow_event_time_and_replay_identically(chain: list[dict]) -> None:
    marks = _chain_marks(chain)

    def replay() -> list[IVSurface]:
        builder = SurfaceBuilder(SurfaceConfig(surface_interval_s=60.0))
        return [surface for mark in marks if (surface := builder.on_mark(mark)) is not None]

    first, second = replay(), replay()
    assert first == second
    # The snapshot spans 14:21:36 → 14:24:06 UTC: minutes start at :22:00, :23:00 and :24:00; at
    # 14:22 too few marks are in for any expiry, after that each minute's first mark fits one.
    minute_ns = 60 * 10**9
    due = [mark.ts_event for mark in marks if mark.ts_event // minute_ns > marks[0].ts_event // minute_ns]
    firsts = sorted({min(ts for ts in due if ts // minute_ns == m) for m in {ts // minute_ns for ts in due}})
    assert [surface.ts_event for surface in first] == firsts[1:]


def test_other_underlyings_are_ignored(chain: list[dict]) -> None:
    builder = SurfaceBuilder(SurfaceConfig(underlying="ETH"))
    assert all(builder.on_mark(mark) is None for mark in _chain_marks(chain))
    assert builder.quotes(int(chain[-1]["timestamp"]) * NANOS_PER_MILLI) is None


# --- the live feed against a local JSON-RPC websocket server ------------------------------------

TEST_REQUEST = '{"jsonrpc":"2.0","method":"heartbeat","params":{"type":"test_request"}}'


def deribit_responder(instruments: list[dict]) -> Callable[[WsFrame], Sequence[WsFrame]]:
    """Answers requests as Deribit does: acks, the subscribed channels, the recorded option list."""

    def respond(frame: WsFrame) -> list[WsFrame]:
        request = json.loads(frame)
        method, params = request["method"], request.get("params", {})
        if method == "public/set_heartbeat":
            result: object = "ok"
        elif method == "public/subscribe":
            result = params["channels"]
        elif method == "public/get_instruments":
            assert params == {"currency": "BTC", "kind": "option", "expired": False}
            result = [row for row in instruments if row["kind"] == params["kind"]]
        elif method == "public/test":
            result = {"version": "1.2.26"}
        else:
            error = {"code": -32601, "message": "Method not found"}
            return [json.dumps({"jsonrpc": "2.0", "id": request["id"], "error": error})]
        return [json.dumps({"jsonrpc": "2.0", "id": request["id"], "result": result, "testnet": False})]

    return respond


def requests_of(frames: Sequence[WsFrame], method: str) -> list[dict]:
    return [request for frame in frames if (request := json.loads(frame))["method"] == method]


def feed_config(url: str, **connection: object) -> DeribitFeedConfig:
    values: dict[str, object] = {
        "stale_after_s": 5.0,
        "max_connection_age_s": None,
        "ping_interval_s": None,
        "open_timeout_s": 2.0,
        "backoff": BackoffConfig(initial_s=0.02, max_s=0.1, seed=3),
    }
    values.update(connection)
    return DeribitFeedConfig(
        url=url, ticker_interval="raw", connection=ConnectionConfig.model_validate(values)
    )


async def run_feed(feed: DeribitFeed, done: Callable[[], bool], timeout: float = 10.0) -> None:
    task = asyncio.create_task(feed.run())
    try:
        async with asyncio.timeout(timeout):
            while not done():
                if task.done():
                    task.result()
                await asyncio.sleep(0.005)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def without_ts_recv(events: Sequence[Event]) -> list[Event]:
    return [msgspec.structs.replace(event, ts_recv=0) for event in events]


async def test_feed_answers_heartbeats_reconnects_resubscribes_and_loses_no_mark(
    shared_data: Path, received: list[Frame]
) -> None:
    instruments = read_instruments(shared_data / INSTRUMENTS, "BTC")
    btc_options = {row["instrument_name"] for row in instruments if row["kind"] == "option"}
    tickers = [f.body for f in received if channel_of(f).startswith("ticker.BTC-")]
    assert len(tickers) == 69
    dvol = reference(shared_data, "ws_volatility_index.json")
    cut = 40
    sessions = [
        # set_heartbeat, subscribe (DVOL), get_instruments, then the options' subscribe.
        Session(
            messages=[TEST_REQUEST, dvol, *tickers[:cut]],
            await_client_messages=4,
            pauses={12: 1.5},  # silence: STALE, then RECOVERED with the next ticker
            drop_after=2 + cut,
        ),
        # On a new connection the known options are in the first subscribe, so three messages.
        # Subscribing sends each channel's current ticker: the last two before the cut come again.
        Session(messages=tickers[cut - 2 :], await_client_messages=3, garbage={10: ["{truncated"]}),
    ]
    sunk: list[Event] = []
    async with ReplayServer(sessions, respond=deribit_responder(instruments)) as server:
        feed = DeribitFeed(feed_config(server.url, stale_after_s=0.6), sunk.append)
        await run_feed(feed, lambda: len([e for e in sunk if isinstance(e, OptionMark)]) == len(tickers))
        await server.wait_for(lambda s: feed.websocket.stats.parse_errors == 1)
        first, second = server.connections

    # The probe was answered with public/test on its own connection.
    assert len(requests_of(first.received, "public/test")) == 1 and feed.stats.test_requests == 1
    assert requests_of(first.received, "public/set_heartbeat")[0]["params"] == {"interval": 30}
    # First connection: DVOL, then every listed BTC option once the list came back.
    subscribes = [
        request["params"]["channels"] for request in requests_of(first.received, "public/subscribe")
    ]
    assert subscribes == [
        ["deribit_volatility_index.btc_usd"],
        sorted(f"ticker.{n}.raw" for n in btc_options),
    ]
    # Second connection: one subscribe with everything again, nothing left to add after the list.
    [resubscribe] = [
        request["params"]["channels"] for request in requests_of(second.received, "public/subscribe")
    ]
    assert resubscribe == ["deribit_volatility_index.btc_usd", *subscribes[1]]
    assert len(requests_of(second.received, "public/get_instruments")) == 1
    assert first.dropped and second.garbage_sent == 1

    marks = [event for event in sunk if isinstance(event, OptionMark)]
    expected = [event for body in tickers for event in parse_message(body, 0)]
    assert without_ts_recv(marks) == expected  # every recorded mark, in order, once
    assert feed.stats.duplicates == 2
    dvol_events = [event for event in sunk if isinstance(event, VolatilityIndex)]
    assert without_ts_recv(dvol_events) == parse_message(dvol, 0)
    statuses = [event for event in sunk if isinstance(event, FeedStatus)]
    assert [status.status for status in statuses] == [
        FeedState.CONNECTED,
        FeedState.STALE,
        FeedState.RECOVERED,
        FeedState.DISCONNECTED,
        FeedState.CONNECTED,
    ]
    assert all(status.feed == "deribit" for status in statuses)
    assert feed.websocket.stats.reconnects == 1 and feed.stats.rpc_errors == 0


async def test_feed_fits_surfaces_from_a_streamed_chain(chain: list[dict]) -> None:
    instruments = [
        {"instrument_name": row["instrument_name"], "kind": "option", "is_active": True} for row in chain
    ]
    tickers = [chain_ticker(row, "raw") for row in chain]
    sunk: list[Event] = []
    session = Session(messages=tickers, await_client_messages=4)
    async with ReplayServer([session], respond=deribit_responder(instruments)) as server:
        feed = DeribitFeed(feed_config(server.url), sunk.append)
        await run_feed(feed, lambda: len([e for e in sunk if isinstance(e, OptionMark)]) == len(chain))
        assert (
            len(requests_of(server.connections[0].received, "public/subscribe")[1]["params"]["channels"])
            == 310
        )

    surfaces = [event for event in sunk if isinstance(event, IVSurface)]
    # The same marks replayed through a fresh builder: event time makes the same surfaces.
    offline = SurfaceBuilder()
    replayed = [s for mark in _chain_marks(chain) if (s := offline.on_mark(mark)) is not None]
    assert len(surfaces) == 2 and feed.stats.surfaces == 2
    assert without_ts_recv(surfaces) == without_ts_recv(replayed)
    # Each surface comes right after the mark that made it due.
    for surface in surfaces:
        before = sunk[sunk.index(surface) - 1]
        assert isinstance(before, OptionMark) and before.ts_event == surface.ts_event
        assert surface.ts_recv == before.ts_recv
    assert all(s.fit_rmse is not None and s.fit_rmse < 0.01 for s in surfaces)


async def test_feed_subscribes_new_listings_on_refresh_and_survives_rpc_errors(
    shared_data: Path, received: list[Frame]
) -> None:
    """The option list is fetched again every ``instruments_refresh_s``: a listing that appears in
    the meantime is subscribed alone on the live connection; a refused request is logged, not fatal."""
    instruments = read_instruments(shared_data / INSTRUMENTS, "BTC")
    newcomer = next(row for row in instruments if row["kind"] == "option")
    answer = deribit_responder(instruments)
    lists_sent = 0

    def respond(frame: WsFrame) -> Sequence[WsFrame]:
        nonlocal lists_sent
        request = json.loads(frame)
        if request["method"] == "public/set_heartbeat":
            error = {"code": 10028, "message": "too_many_requests"}
            return [json.dumps({"jsonrpc": "2.0", "id": request["id"], "error": error})]
        [reply] = answer(frame)
        if request["method"] == "public/get_instruments":
            lists_sent += 1
            if lists_sent == 1:  # before the listing
                response = json.loads(reply)
                response["result"].remove(newcomer)
                return [json.dumps(response)]
        return [reply]

    tickers = [f.body for f in received if channel_of(f).startswith("ticker.BTC-")]
    # Refreshes ride on incoming frames: replay the tickers (repeats are dropped as duplicates) long
    # enough that several refresh periods pass even on a loaded machine.
    session = Session(messages=tickers * 5, await_client_messages=4, interval_s=0.01)
    sunk: list[Event] = []
    async with ReplayServer([session], respond=respond) as server:
        config = feed_config(server.url).model_copy(update={"instruments_refresh_s": 0.1})
        feed = DeribitFeed(config, sunk.append)

        def subscribes() -> list[list[str]]:
            frames = server.connections[0].received if server.connections else []
            return [request["params"]["channels"] for request in requests_of(frames, "public/subscribe")]

        await run_feed(feed, lambda: len(subscribes()) == 3 and lists_sent >= 3)

    dvol, listed, added = subscribes()
    assert dvol == ["deribit_volatility_index.btc_usd"]
    assert f"ticker.{newcomer['instrument_name']}.raw" not in listed
    assert added == [f"ticker.{newcomer['instrument_name']}.raw"]
    assert feed.stats.subscribed_options == len(listed) + 1
    assert feed.stats.rpc_errors == 1
    assert feed.websocket.stats.handler_errors == 0 and feed.websocket.stats.parse_errors == 0
