"""Parity: replaying a paper run's journal gives the orders, fills, equity and fingerprints it stored.

The paper run is the real command line (``main.py --mode paper``) in a subprocess: its pacing,
queue, journal, store and shutdown are the paths a user gets. The backtest replays its journal
with the same settings and seed; everything the run wrote to its database must come out equal.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from backtest.engine import BacktestResult, run_backtest
from bot.journal import read_header
from bot.store import Store
from config.settings import load_settings

SEED = 3
MAIN = Path(__file__).parent.parent / "main.py"
ORDER_FIELDS = (
    "instrument",
    "side",
    "order_type",
    "limit_price",
    "reduce_only",
    "reason",
    "status",
    "status_reason",
    "venue_order_id",
    "filled_qty",
    "avg_price",
    "ts_created",
    "ts_updated",
)


def paper_run(tmp_path: Path) -> tuple[Path, str]:
    """Six wall seconds at 600x (one hour of event time) of ``main.py --mode paper``."""
    journal, database = tmp_path / "j.jsonl", f"sqlite:///{tmp_path / 'v.db'}"
    env = {
        **{key: value for key, value in os.environ.items() if not key.upper().startswith("VOLBOT_")},
        "VOLBOT_LOGGING__DIR": str(tmp_path / "logs"),
        "VOLBOT_LOGGING__CONSOLE": "false",
        "VOLBOT_JOURNAL__DIR": str(tmp_path / "journals"),
        "VOLBOT_RUN__VAR_DIR": str(tmp_path / "var"),
    }
    command = [sys.executable, str(MAIN), "--mode", "paper", "--duration", "6", "--speed", "600"]
    command += ["--seed", str(SEED), "--db", database, "--journal", str(journal)]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"paper run failed:\n{done.stderr[-3000:]}"
    return journal, database


def nan_to_none(value: float) -> float | None:
    """The store writes NaN as NULL (SQLite has no NaN)."""
    return None if math.isnan(value) else value


def first_difference(stored: list[Any], replayed: list[Any]) -> str:
    for index, (a, b) in enumerate(zip(stored, replayed, strict=False)):
        if a != b:
            return f"first difference at #{index}:\n  paper    {a}\n  backtest {b}"
    return f"lengths differ: paper {len(stored)}, backtest {len(replayed)}"


async def test_backtest_of_a_paper_journal_reproduces_the_paper_run(tmp_path: Path) -> None:
    journal, database = paper_run(tmp_path)
    assert read_header(journal)["meta"] == {"mode": "paper", "seed": SEED, "feed": "synthetic"}
    settings = load_settings(overrides={section: {"seed": SEED} for section in ("run", "market", "venue")})
    result: BacktestResult = run_backtest(settings, events_path=journal, progress=False)

    store = Store(database)
    await store.open()
    try:
        (run,) = await store.runs()
        fills = await store.fills(run.run_id)
        orders = await store.orders(run.run_id)
        equity = await store.equity(run.run_id)
    finally:
        await store.close()

    assert run.status == "completed"
    assert run.summary is not None and run.summary["events"] == result.events
    assert run.summary["decisions"] == result.strategy.decisions
    assert len(fills) > 10, "an hour of the trend policy trades; parity of nothing proves nothing"

    stored_fills = [
        (f.seq, f.ts, f.client_order_id, f.instrument, f.side, f.qty, f.price, f.fee, f.liquidity, f.trade_id)
        for f in fills
    ]
    replayed_fills = [
        (
            f.seq,
            f.ts_ns,
            f.client_order_id,
            f.instrument,
            f.side,
            f.quantity,
            f.price,
            f.fee,
            f.liquidity,
            f.trade_id,
        )
        for f in result.fills
    ]
    assert stored_fills == replayed_fills, first_difference(stored_fills, replayed_fills)

    stored_orders = {o.client_order_id: (o.qty, *(getattr(o, f) for f in ORDER_FIELDS)) for o in orders}
    replayed_orders = {
        o.client_order_id: (o.quantity, *(getattr(o, f) for f in ORDER_FIELDS))
        for o in result.strategy.orders
    }
    assert sorted(stored_orders) == sorted(replayed_orders)
    assert stored_orders == replayed_orders, first_difference(
        [stored_orders[k] for k in sorted(stored_orders)], [replayed_orders[k] for k in sorted(stored_orders)]
    )

    stored_equity = [
        (e.ts, e.equity, e.cash, e.unrealized_pnl, e.realized_pnl, e.fees, e.funding, e.gross_exposure)
        for e in equity
    ]
    replayed_equity = [
        (
            p.ts_ns,
            nan_to_none(p.equity),
            p.cash,
            nan_to_none(p.unrealized_pnl),
            p.realized_pnl,
            p.fees,
            p.funding,
            nan_to_none(p.gross_exposure),
        )
        for p in result.equity
    ]
    assert stored_equity == replayed_equity, first_difference(stored_equity, replayed_equity)

    assert (run.fills_sha256, run.obs_sha256) == (result.fills_sha256, result.obs_sha256)
