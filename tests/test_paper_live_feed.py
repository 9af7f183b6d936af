"""Paper trading on the Binance feed, end to end against local servers replaying a recorded session.

The websocket server streams a recorded spot BTCUSDT session (the MIT hftbacktest subset in
``tests/fixtures/binance``), drops the connection mid-stream, sends garbage and goes quiet; a
local HTTP server answers ccxt's ``exchangeInfo`` from the recorded response and the depth
snapshots. The whole paper session runs on it: instruments from ccxt, the same engine as every
other mode, the journal and the store.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from ccxt_server import BinanceRestServer, Market
from pydantic import SecretStr
from test_binance_feed import FIXTURE, Recording, binance_acks, depth_now
from wsreplay import HttpReplayServer, ReplayServer, Session

from adapters.sources import SourceError
from bot.app import PaperOptions, PaperSession
from bot.events import FeedState, FeedStatus, Fill, OrderStatus, OrderUpdate, Trade
from bot.journal import read_events, read_header
from bot.store import Store
from config.settings import ConfigError, LiveConfig, Settings, load_settings
from strategies.hold import HoldPolicyConfig

SPOT = "BINANCE:BTCUSDT"


def live_settings(tmp_path: Path, ws_url: str, rest_url: str) -> Settings:
    market = {"ws_url": ws_url, "rest_url": rest_url, "streams": ["trade", "bookTicker", "depth@100ms"]}
    connection = {
        # well above a loaded machine's hiccups, well below the recorded silences the tests stage
        "stale_after_s": 0.6,
        "ping_interval_s": None,
        "max_connection_age_s": None,
        "backoff": {"initial_s": 0.05, "max_s": 0.2, "seed": 3},
    }
    settings = load_settings(
        overrides={
            "run": {
                "feed": "binance",
                "policy": "hold",
                "decision_interval_s": 0.25,
                "snapshot_interval_s": 0.25,
                "var_dir": str(tmp_path / "var"),
            },
            "state": {"window": 2},
            "binance": {
                "spot": {**market, "symbols": ["BTCUSDT"]},
                "usdm": {**market, "symbols": []},
                "connection": connection,
            },
            "store": {"url": f"sqlite:///{tmp_path / 'volbot.db'}"},
            "journal": {"dir": str(tmp_path / "journal")},
            "logging": {"dir": str(tmp_path / "logs"), "console": False},
        }
    )
    # set, not merged into the default file's targets as a table override would be
    return settings.model_copy(update={"hold": HoldPolicyConfig(targets={SPOT: 0.05})})


async def test_paper_session_trades_the_binance_feed_through_a_drop_and_garbage(
    shared_data: Path, tmp_path: Path
) -> None:
    recording = Recording(FIXTURE)
    stream = recording.stream
    cut = 1500
    sessions = [
        Session(
            messages=stream[:cut],
            await_client_messages=1,
            interval_s=0.0005,
            drop_after=cut,
            garbage={400: ["<html>502 Bad Gateway</html>", stream[cut + 5][:40]]},
        ),
        Session(
            messages=stream[cut:],
            await_client_messages=1,
            interval_s=0.0005,
            garbage={300: [b"\x00\x01binary"]},
            pauses={700: 1.5},  # quiet for longer than stale_after_s
        ),
    ]
    exchange_info = (shared_data / "binance_rest" / "api_v3_exchangeInfo.json").read_bytes()
    async with ReplayServer(sessions, respond=binance_acks) as ws, HttpReplayServer({}) as http:
        http.routes["/api/v3/exchangeInfo"] = exchange_info
        http.routes["/fapi/v1/exchangeInfo"] = (
            shared_data / "binance_rest" / "fapi_v1_exchangeInfo.json"
        ).read_bytes()
        http.routes["/api/v3/depth"] = depth_now(recording, ws)
        settings = live_settings(tmp_path, ws.url, http.url)
        journal_path = tmp_path / "journal" / "live.jsonl"
        session = PaperSession(settings, PaperOptions(journal_path=journal_path))
        task = asyncio.create_task(session.run())
        expected_trades = recording.trade_ids()
        async with asyncio.timeout(60):
            while not (len(ws.connections) == 2 and ws.connections[1].sent == len(stream) - cut):
                assert not task.done(), task.exception()
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.2)  # the last frames reach the engine; then the feed goes stale
        session.request_stop("test done")
        summary = await task

    events = list(read_events(journal_path))
    assert read_header(journal_path)["meta"]["feed"] == "binance"
    # every recorded trade exactly once, in order, across the drop and the reconnect
    assert [e.trade_id for e in events if isinstance(e, Trade)] == expected_trades
    statuses = [e.status for e in events if isinstance(e, FeedStatus) and e.feed == "BINANCE"]
    assert statuses == [
        FeedState.CONNECTED,
        FeedState.DISCONNECTED,
        FeedState.CONNECTED,
        FeedState.STALE,
        FeedState.RECOVERED,
        FeedState.STALE,  # the recording is over: the server stays quiet until the session stops
    ]
    # the pipeline traded on the feed: a fill on the recorded instrument, stored and reconciled
    assert summary.status == "completed" and summary.fills >= 1
    assert set(summary.positions) == {SPOT} and summary.positions[SPOT] > 0
    store = Store(settings.store.url)
    await store.open()
    try:
        fills = await store.fills(summary.run_id)
        orders = await store.orders(summary.run_id)
        equity = await store.equity(summary.run_id)
    finally:
        await store.close()
    assert fills and {f.instrument for f in fills} == {SPOT}
    assert orders and all(o.instrument == SPOT for o in orders)
    assert equity
    quotes_bid = [float(d["b"]) for d in recording.data if "b" in d and "e" not in d]
    quotes_ask = [float(d["a"]) for d in recording.data if "a" in d and "e" not in d]
    assert all(min(quotes_bid) <= f.price <= max(quotes_ask) * 1.01 for f in fills)
    cash_flows = sum(-f.qty * f.price - f.fee if f.side == "BUY" else f.qty * f.price - f.fee for f in fills)
    assert abs(summary.cash - (settings.run.initial_cash + cash_flows)) <= 1e-9 * settings.run.initial_cash


async def test_unlisted_symbol_is_refused_in_one_line(shared_data: Path, tmp_path: Path) -> None:
    exchange_info = (shared_data / "binance_rest" / "api_v3_exchangeInfo.json").read_bytes()
    async with HttpReplayServer({"/api/v3/exchangeInfo": exchange_info}) as http:
        http.routes["/fapi/v1/exchangeInfo"] = (
            shared_data / "binance_rest" / "fapi_v1_exchangeInfo.json"
        ).read_bytes()
        settings = live_settings(tmp_path, "ws://127.0.0.1:9", http.url)
        settings.binance.spot.symbols.append("NOSUCHCOIN")
        session = PaperSession(settings, PaperOptions())
        try:
            await session.run()
        except SourceError as exc:
            message = str(exc)
        else:
            raise AssertionError("an unlisted symbol must stop the session before it starts")
    assert message == "Binance does not list BINANCE:NOSUCHCOIN as active"


async def test_a_policy_on_instruments_the_feed_does_not_list_is_refused(
    shared_data: Path, tmp_path: Path
) -> None:
    routes = {
        "/api/v3/exchangeInfo": (shared_data / "binance_rest" / "api_v3_exchangeInfo.json").read_bytes(),
        "/fapi/v1/exchangeInfo": (shared_data / "binance_rest" / "fapi_v1_exchangeInfo.json").read_bytes(),
    }
    async with HttpReplayServer(routes) as http:
        settings = live_settings(tmp_path, "ws://127.0.0.1:9", http.url)
        settings = settings.model_copy(update={"run": settings.run.model_copy(update={"policy": "trend"})})
        try:
            await PaperSession(settings, PaperOptions()).run()
        except ConfigError as exc:
            message = str(exc)
        else:
            raise AssertionError("the default trend policy trades SYNTH instruments: the session must refuse")
    assert message.startswith("config error: policy 'trend' trades SYNTH:BTCUSDT-PERP, SYNTH:DOGEUSDT-PERP")
    assert "(it lists BINANCE:BTCUSDT)" in message


async def test_live_mode_sends_the_pipelines_orders_through_ccxt_once_each(
    shared_data: Path, tmp_path: Path
) -> None:
    """The same session with ``live=True``: no paper venue, orders go to a local exchange through ccxt."""
    recording = Recording(FIXTURE)
    stream = recording.stream
    first_quote = next(d for d in recording.data if "b" in d and "e" not in d)
    touch = float(first_quote["a"])
    rest = shared_data / "binance_rest"
    info: dict[Market, bytes] = {
        "spot": (rest / "api_v3_exchangeInfo.json").read_bytes(),
        "usdm": (rest / "fapi_v1_exchangeInfo.json").read_bytes(),
    }
    key, secret = f"vbkey{uuid.uuid4().hex}", f"vbsecret{uuid.uuid4().hex}"
    session_frames = Session(messages=stream, await_client_messages=1, interval_s=0.0005)
    async with (
        ReplayServer([session_frames], respond=binance_acks) as ws,
        HttpReplayServer({}) as http,
        BinanceRestServer(info, key, secret, prices={"BTCUSDT": touch}) as exchange,
    ):
        http.routes["/api/v3/exchangeInfo"] = info["spot"]
        http.routes["/fapi/v1/exchangeInfo"] = info["usdm"]
        http.routes["/api/v3/depth"] = depth_now(recording, ws)
        settings = live_settings(tmp_path, ws.url, http.url)
        live = LiveConfig(
            enabled=True,
            exchange="binance",
            testnet=True,
            base_url=exchange.url,
            api_key=SecretStr(key),
            api_secret=SecretStr(secret),
        )
        settings = settings.model_copy(update={"live": live})
        journal_path = tmp_path / "journal" / "live.jsonl"
        session = PaperSession(settings, PaperOptions(journal_path=journal_path, live=True))
        task = asyncio.create_task(session.run())
        async with asyncio.timeout(60):
            while not (ws.connections and ws.connections[0].sent == len(stream)):
                assert not task.done(), task.exception()
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
        session.request_stop("test done")
        summary = await task
        posted = exchange.requested("POST", "/api/v3/order")

    events = list(read_events(journal_path))
    assert read_header(journal_path)["meta"]["mode"] == "live"
    fills = [e for e in events if isinstance(e, Fill)]
    accepted = [e for e in events if isinstance(e, OrderUpdate) and e.status is OrderStatus.ACCEPTED]
    # every order the pipeline approved went to the exchange exactly once, and its fill came back
    assert posted and len(posted) == len(accepted) == len({u.client_order_id for u in accepted})
    assert fills and {f.instrument for f in fills} == {SPOT}
    assert all(f.price == touch for f in fills), "filled at the exchange's price, not by a simulation"
    assert {f.client_order_id for f in fills} == {u.client_order_id for u in accepted}
    assert summary.status == "completed" and summary.fills == len(fills)
    assert summary.run_id.startswith("live-") and summary.positions[SPOT] > 0
