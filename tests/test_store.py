"""The store on SQLite and on the local PostgreSQL: rows, runs, resume checkpoints, flush batching."""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import pytest
from sqlalchemy.exc import IntegrityError

from bot.bus import EventBus
from bot.events import (
    Fill,
    FundingPayment,
    Liquidity,
    OrderIntent,
    OrderStatus,
    OrderType,
    OrderUpdate,
    PortfolioSnapshot,
    PositionUpdate,
    RiskDecision,
    RiskState,
    RiskStateChanged,
    Side,
)
from bot.store import RunStatus, Store, StoreRecorder, async_database_url

POSTGRES_ADMIN_URL = os.environ.get("POSTGRES_TEST_URL", "postgresql://postgres@127.0.0.1:5432/test")
BTC = "SYNTH:BTCUSDT-PERP"
DOGE = "SYNTH:DOGEUSDT"


@pytest.fixture(params=["sqlite", "postgresql"])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh empty database: a SQLite file in a folder not yet made, or a throwaway PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/not-yet-made/volbot.db"
        return
    try:
        admin = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=3)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}: {exc}")
    name = f"volbot_test_{uuid.uuid4().hex[:12]}"
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield str(
            async_database_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
        )
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    opened = Store(store_url)
    await opened.open()
    yield opened
    await opened.close()


async def start(
    store: Store, run_id: str, parent_run_id: str | None = None, mode: str = "paper"
) -> list[str]:
    return await store.start_run(
        run_id,
        mode=mode,
        seed=7,
        config={"run": {"seed": 7}, "risk": {"max_drawdown": 0.2}},
        policy="trend",
        journal_path=f"var/journal/{run_id}.jsonl",
        parent_run_id=parent_run_id,
    )


def intent(client_order_id: str, ts: int, instrument: str = BTC, side: Side = Side.BUY) -> OrderIntent:
    return OrderIntent(
        ts_event=ts,
        ts_recv=ts,
        client_order_id=client_order_id,
        instrument=instrument,
        side=side,
        quantity=0.25,
        order_type=OrderType.LIMIT,
        limit_price=30_000.5,
        reduce_only=False,
        reason="rebalance",
    )


def order_update(client_order_id: str, ts: int, status: OrderStatus, filled: float = 0.0) -> OrderUpdate:
    return OrderUpdate(
        ts_event=ts,
        ts_recv=ts,
        client_order_id=client_order_id,
        instrument=BTC,
        status=status,
        venue_order_id=f"V-{client_order_id}",
        filled_qty=filled,
        avg_price=30_000.25 if filled else 0.0,
    )


def fill(client_order_id: str, ts: int, quantity: float, price: float) -> Fill:
    return Fill(
        ts_event=ts,
        ts_recv=ts,
        client_order_id=client_order_id,
        instrument=BTC,
        side=Side.BUY,
        quantity=quantity,
        price=price,
        fee=quantity * price * 0.0005,
        liquidity=Liquidity.MAKER,
        trade_id=f"T-{ts}",
    )


def snapshot(ts: int, equity: float) -> PortfolioSnapshot:
    return PortfolioSnapshot(
        ts_event=ts,
        ts_recv=ts,
        equity=equity,
        cash=equity - 5.0,
        unrealized_pnl=5.0,
        realized_pnl=-1.5,
        fees=0.75,
        funding=-0.01,
        gross_exposure=0.3,
    )


async def test_full_cycle_write_read_resume(store_url: str) -> None:
    store = Store(store_url)
    await store.open()
    assert await start(store, "run-a") == []
    bus = EventBus()
    recorder = StoreRecorder(bus, store, "run-a")
    bus.publish(intent("c1", 1_000))
    bus.publish(
        RiskDecision(
            ts_event=1_000, ts_recv=1_000, client_order_id="c1", instrument=BTC, approved=True, reason="ok"
        )
    )
    bus.publish(order_update("c1", 1_100, OrderStatus.ACCEPTED))
    bus.publish(fill("c1", 1_200, 0.25, 30_000.25))
    bus.publish(order_update("c1", 1_200, OrderStatus.FILLED, filled=0.25))
    bus.publish(
        PositionUpdate(
            ts_event=1_200,
            ts_recv=1_200,
            instrument=BTC,
            quantity=0.25,
            avg_price=30_000.25,
            realized_pnl=0.0,
            unrealized_pnl=0.0,
        )
    )
    bus.publish(
        FundingPayment(
            ts_event=1_300,
            ts_recv=1_300,
            instrument=BTC,
            funding_rate=0.0001,
            mark_price=30_010.0,
            position_qty=0.25,
            amount=-0.7502,
        )
    )
    bus.publish(snapshot(1_400, 100_004.0))
    bus.publish(intent("c2", 1_500, instrument=DOGE, side=Side.SELL))
    bus.publish(
        RiskDecision(
            ts_event=1_500,
            ts_recv=1_500,
            client_order_id="c2",
            instrument=DOGE,
            approved=False,
            reason="MAX_GROSS_EXPOSURE",
            detail="gross 1.2 > 1.0",
            risk_state=RiskState.REDUCING,
        )
    )
    bus.publish(
        RiskStateChanged(
            ts_event=1_600,
            ts_recv=1_600,
            previous=RiskState.ACTIVE,
            current=RiskState.REDUCING,
            reason="drawdown",
            drawdown=0.12,
        )
    )
    assert await recorder.flush() == 9  # 2 orders, 1 fill, 1 position, 1 funding, 1 equity, 3 risk events

    orders = await store.orders("run-a")
    assert [(o.client_order_id, o.status, o.status_reason) for o in orders] == [
        ("c1", "FILLED", ""),
        ("c2", "REJECTED", "MAX_GROSS_EXPOSURE"),
    ]
    assert (orders[0].filled_qty, orders[0].avg_price, orders[0].venue_order_id) == (0.25, 30_000.25, "V-c1")
    assert (orders[0].ts_created, orders[0].ts_updated, orders[0].reason) == (1_000, 1_200, "rebalance")
    fills = await store.fills("run-a")
    assert [(f.seq, f.ts, f.qty, f.price, f.liquidity, f.trade_id) for f in fills] == [
        (1, 1_200, 0.25, 30_000.25, "MAKER", "T-1200")
    ]
    assert fills[0].fee == 0.25 * 30_000.25 * 0.0005
    [equity] = await store.equity("run-a")
    assert (equity.ts, equity.equity, equity.cash, equity.fees, equity.funding) == (
        1_400,
        100_004.0,
        99_999.0,
        0.75,
        -0.01,
    )
    [funding] = await store.funding("run-a")
    assert (funding.rate, funding.mark, funding.qty, funding.amount) == (0.0001, 30_010.0, 0.25, -0.7502)
    risk = await store.risk_events("run-a")
    assert [(r.kind, r.client_order_id, r.approved, r.reason, r.risk_state) for r in risk] == [
        ("decision", "c1", True, "ok", "ACTIVE"),
        ("decision", "c2", False, "MAX_GROSS_EXPOSURE", "REDUCING"),
        ("state_change", None, None, "drawdown", "REDUCING"),
    ]
    assert (risk[1].detail, risk[2].previous_state, risk[2].drawdown) == ("gross 1.2 > 1.0", "ACTIVE", 0.12)
    assert (await store.positions("run-a"))[BTC].qty == 0.25

    states = {
        "portfolio": {"cash": 99_999.0, "positions": {BTC: [0.25, 30_000.25]}},
        "clock": {"now_ns": 1_600},
    }
    await store.save_component_states("run-a", 1_600, states)
    await store.finish_run(
        "run-a", RunStatus.COMPLETED, {"fills": 1}, fills_sha256="f" * 64, obs_sha256="o" * 64
    )
    await store.close()

    # A new process resumes from the checkpoint and records its parent.
    reopened = Store(store_url)
    await reopened.open()
    assert await reopened.latest_component_states() == states
    previous = await reopened.latest_run()
    assert previous is not None and previous.run_id == "run-a"
    assert await start(reopened, "run-b", parent_run_id=previous.run_id) == []
    runs = await reopened.runs()
    assert [(r.run_id, r.status, r.parent_run_id) for r in runs] == [
        ("run-a", "completed", None),
        ("run-b", "running", "run-a"),
    ]
    assert (
        runs[0].summary == {"fills": 1}
        and runs[0].fills_sha256 == "f" * 64
        and runs[0].obs_sha256 == "o" * 64
    )
    assert runs[0].config == {"run": {"seed": 7}, "risk": {"max_drawdown": 0.2}}
    assert runs[0].ended_at is not None and runs[0].ended_at >= runs[0].started_at
    await reopened.close()


async def test_floats_round_trip_bit_for_bit(store: Store) -> None:
    rng = np.random.default_rng(20240601)
    values = [0.1 + 0.2, 1 / 3, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, math.pi, -1e-300]
    values += (rng.standard_normal(40) * 10.0 ** rng.integers(-300, 300, 40)).tolist()
    await start(store, "run-f")
    bus = EventBus()
    recorder = StoreRecorder(bus, store, "run-f")
    for ts, value in enumerate([*values, -0.0]):
        bus.publish(fill(f"c{ts}", ts, quantity=abs(value), price=value))
    await recorder.flush()
    await store.save_component_states("run-f", 0, {"values": {"floats": values}})

    *prices, signed_zero = [f.price for f in await store.fills("run-f")]
    assert [p.hex() for p in prices] == [v.hex() for v in values]
    assert signed_zero == 0.0  # SQLite stores -0.0 as 0 (equal value); PostgreSQL keeps the sign
    stored = await store.latest_component_states()
    assert stored is not None
    assert [v.hex() for v in stored["values"]["floats"]] == [v.hex() for v in values]


async def test_order_rows_are_upserted_not_duplicated(store: Store) -> None:
    await start(store, "run-o")
    bus = EventBus()
    recorder = StoreRecorder(bus, store, "run-o")
    bus.publish(intent("c1", 10))
    await recorder.flush()
    bus.publish(order_update("c1", 20, OrderStatus.ACCEPTED))
    await recorder.flush()
    [accepted] = await store.orders("run-o")
    assert (accepted.status, accepted.ts_updated) == ("ACCEPTED", 20)

    bus.publish(order_update("c1", 30, OrderStatus.PARTIALLY_FILLED, filled=0.1))
    bus.publish(order_update("c1", 40, OrderStatus.FILLED, filled=0.25))
    assert recorder.pending == 1  # two changes of one order make one row
    await recorder.flush()
    # An update for an order this run never saw (left open by the run it resumed).
    bus.publish(order_update("old", 50, OrderStatus.CANCELLED))
    await recorder.flush()

    orders = {o.client_order_id: o for o in await store.orders("run-o")}
    assert len(orders) == 2
    filled = orders["c1"]
    assert (filled.status, filled.filled_qty, filled.avg_price, filled.ts_updated) == (
        "FILLED",
        0.25,
        30_000.25,
        40,
    )
    assert (filled.side, filled.qty, filled.order_type, filled.limit_price, filled.ts_created) == (
        "BUY",
        0.25,
        "LIMIT",
        30_000.5,
        10,
    )
    assert (orders["old"].status, orders["old"].side, orders["old"].qty) == ("CANCELLED", None, None)

    # A late update of an order already flushed as final must not erase what its intent said.
    bus.publish(order_update("c1", 60, OrderStatus.FILLED, filled=0.25))
    await recorder.flush()
    [late] = [o for o in await store.orders("run-o") if o.client_order_id == "c1"]
    assert (late.side, late.qty, late.ts_created, late.ts_updated) == ("BUY", 0.25, 10, 60)


async def test_run_left_running_is_marked_crashed_and_stays_resumable(store_url: str) -> None:
    crashed_process = Store(store_url)
    await crashed_process.open()
    await start(crashed_process, "run-dead")
    await crashed_process.save_component_states("run-dead", 5_000, {"portfolio": {"cash": 123.5}})
    await crashed_process.close()  # the process dies without finish_run

    store = Store(store_url)
    await store.open()
    assert await store.latest_component_states() == {"portfolio": {"cash": 123.5}}
    assert await start(store, "run-next", parent_run_id="run-dead") == ["run-dead"]
    await store.finish_run("run-next", "completed", {})
    assert await start(store, "run-third") == []  # a finished run is never marked crashed
    statuses = {r.run_id: r.status for r in await store.runs()}
    assert statuses == {"run-dead": "crashed", "run-next": "completed", "run-third": "running"}
    with pytest.raises(KeyError, match="no-such-run"):
        await store.finish_run("no-such-run", "completed", {})
    await store.close()


async def test_latest_checkpoint_wins_per_component_and_across_runs(store: Store) -> None:
    assert await store.latest_component_states() is None
    await start(store, "run-1")
    await store.save_component_states("run-1", 100, {"portfolio": {"cash": 1.0}, "risk": {"peak": 10.0}})
    await store.save_component_states("run-1", 200, {"portfolio": {"cash": 2.0}})
    checkpoint = await store.latest_checkpoint()
    assert checkpoint is not None
    assert (checkpoint.run_id, checkpoint.ts) == ("run-1", 200)
    assert checkpoint.states == {"portfolio": {"cash": 2.0}, "risk": {"peak": 10.0}}

    await start(store, "run-2", parent_run_id="run-1")
    assert (await store.latest_checkpoint()).run_id == "run-1"  # type: ignore[union-attr]
    await store.save_component_states("run-2", 300, {"portfolio": {"cash": 3.0}, "risk": {"peak": 30.0}})
    assert await store.latest_component_states() == {"portfolio": {"cash": 3.0}, "risk": {"peak": 30.0}}


async def test_a_run_resumes_only_a_run_of_its_own_mode(store: Store) -> None:
    """Live books come from live runs: a paper checkpoint must never become a live portfolio."""
    await start(store, "paper-1")
    await store.save_component_states("paper-1", 100, {"portfolio": {"cash": 1.0}})
    assert await store.latest_component_states(mode="live") is None
    assert await store.latest_run(mode="live") is None
    await start(store, "live-1", mode="live")
    await store.save_component_states("live-1", 200, {"portfolio": {"cash": 2.0}})
    await start(store, "paper-2", parent_run_id="paper-1")
    assert await store.latest_component_states(mode="paper") == {"portfolio": {"cash": 1.0}}
    assert await store.latest_component_states(mode="live") == {"portfolio": {"cash": 2.0}}
    assert (await store.latest_run(mode="live")).run_id == "live-1"  # type: ignore[union-attr]
    assert (await store.latest_run()).run_id == "paper-2"  # type: ignore[union-attr]


async def test_rows_are_written_only_by_flush_and_all_of_them(store: Store) -> None:
    await start(store, "run-b")
    bus = EventBus()
    recorder = StoreRecorder(bus, store, "run-b")
    for i in range(50):
        bus.publish(fill(f"c{i}", i, 0.01, 30_000.0 + i))
        bus.publish(snapshot(i, 100_000.0 + i))
    assert recorder.pending == 100
    assert await store.fills("run-b") == [] and await store.equity("run-b") == []

    assert await recorder.flush() == 100
    assert recorder.pending == 0
    assert [f.price for f in await store.fills("run-b")] == [30_000.0 + i for i in range(50)]
    assert [e.equity for e in await store.equity("run-b")] == [100_000.0 + i for i in range(50)]
    assert await recorder.flush() == 0


async def test_failed_flush_keeps_its_rows_for_the_next_one(store: Store) -> None:
    bus = EventBus()
    recorder = StoreRecorder(bus, store, "run-late")  # the run row does not exist yet
    bus.publish(intent("c1", 1))
    bus.publish(fill("c1", 2, 0.1, 100.0))
    with pytest.raises(IntegrityError):
        await recorder.flush()
    assert recorder.pending == 2
    bus.publish(fill("c1", 3, 0.2, 101.0))

    await start(store, "run-late")
    assert await recorder.flush() == 3
    assert [(f.seq, f.price) for f in await store.fills("run-late")] == [(1, 100.0), (2, 101.0)]
    assert [o.client_order_id for o in await store.orders("run-late")] == ["c1"]


async def test_retrying_a_flush_whose_commit_landed_writes_nothing_twice(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    await start(store, "run-r")
    bus = EventBus()
    recorder = StoreRecorder(bus, store, "run-r")
    bus.publish(intent("c1", 1))
    bus.publish(fill("c1", 2, 0.1, 100.0))
    bus.publish(snapshot(3, 100_000.0))
    real_write = store.write_rows

    async def write_then_lose_the_answer(*args: Any) -> None:
        await real_write(*args)
        raise ConnectionResetError("connection lost after COMMIT")

    monkeypatch.setattr(store, "write_rows", write_then_lose_the_answer)
    with pytest.raises(ConnectionResetError):
        await recorder.flush()
    assert recorder.pending == 3
    monkeypatch.setattr(store, "write_rows", real_write)
    bus.publish(fill("c1", 4, 0.2, 101.0))
    assert await recorder.flush() == 4

    assert [(f.seq, f.price) for f in await store.fills("run-r")] == [(1, 100.0), (2, 101.0)]
    assert [(e.seq, e.equity) for e in await store.equity("run-r")] == [(1, 100_000.0)]
    assert len(await store.orders("run-r")) == 1


async def test_nan_marks_are_stored_as_null(store: Store) -> None:
    await start(store, "run-n")
    bus = EventBus()
    recorder = StoreRecorder(bus, store, "run-n")
    unmarked = PortfolioSnapshot(
        ts_event=1,
        ts_recv=1,
        equity=math.nan,
        cash=100_000.0,
        unrealized_pnl=math.nan,
        realized_pnl=0.0,
        fees=0.0,
        funding=0.0,
        gross_exposure=math.nan,
    )
    bus.publish(unmarked)
    await recorder.flush()
    await store.finish_run("run-n", "completed", {"equity": math.nan})
    [row] = await store.equity("run-n")
    assert (row.equity, row.unrealized_pnl, row.gross_exposure, row.cash) == (None, None, None, 100_000.0)
    assert (await store.runs())[0].summary == {"equity": None}


async def test_positions_are_the_latest_row_per_instrument(store: Store) -> None:
    await start(store, "run-p")
    bus = EventBus()
    recorder = StoreRecorder(bus, store, "run-p")
    for ts, (instrument, quantity) in enumerate([(BTC, 0.1), (DOGE, 50.0), (BTC, 0.3), (BTC, 0.0)]):
        bus.publish(
            PositionUpdate(
                ts_event=ts,
                ts_recv=ts,
                instrument=instrument,
                quantity=quantity,
                avg_price=1.0,
                realized_pnl=0.0,
                unrealized_pnl=0.0,
            )
        )
    await recorder.flush()
    positions = await store.positions("run-p")
    assert {name: row.qty for name, row in positions.items()} == {BTC: 0.0, DOGE: 50.0}


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///var/volbot.db", "sqlite+aiosqlite:///var/volbot.db"),
        ("postgresql://u@h:5432/db", "postgresql+asyncpg://u@h:5432/db"),
        ("postgres://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
        ("sqlite+aiosqlite:///x.db", "sqlite+aiosqlite:///x.db"),
    ],
)
def test_plain_urls_get_their_async_driver(url: str, expected: str) -> None:
    assert async_database_url(url).render_as_string(hide_password=False) == expected
