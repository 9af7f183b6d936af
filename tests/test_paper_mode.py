"""``python main.py --mode paper`` end to end: trades, stores, journals, logs, reconciles, resumes."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from bot.events import MarkPrice, Quote
from bot.journal import read_events, read_header
from bot.store import RunRecord, Store

PROJECT_ROOT = Path(__file__).resolve().parent.parent
INITIAL_CASH = 100_000.0


def paper_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "VOLBOT_LOGGING__DIR": str(tmp_path / "logs"),
            "VOLBOT_JOURNAL__DIR": str(tmp_path / "journal"),
            "VOLBOT_RUN__VAR_DIR": str(tmp_path / "var"),
            "VOLBOT_RUN__CHECKPOINT_INTERVAL_S": "1",
        }
    )
    return env


def main_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "main.py",
        "--mode",
        "paper",
        "--db",
        f"sqlite:///{tmp_path / 'volbot.db'}",
        *extra,
    ]


def wait_for_first_fill(log_dir: Path, process: subprocess.Popen[str], timeout_s: float = 120.0) -> None:
    """Block until the run's JSON log records a fill: start-up time varies with machine load."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "the paper run exited before its first fill"
        for log_file in log_dir.glob("*.jsonl"):
            complete = log_file.read_text().splitlines(keepends=True)
            if any(line.endswith("\n") and json.loads(line).get("event") == "fill" for line in complete):
                return
        time.sleep(0.5)
    raise AssertionError(f"no fill logged within {timeout_s} s")


def run_main(tmp_path: Path, *extra: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        main_args(tmp_path, *extra),
        cwd=PROJECT_ROOT,
        env=paper_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def load_run(db_path: Path, run_id: str | None = None) -> dict:
    async def fetch() -> dict:
        store = Store(f"sqlite:///{db_path}")
        await store.open()
        try:
            runs: list[RunRecord] = await store.runs()
            run = next(r for r in runs if run_id in (None, r.run_id)) if run_id else runs[-1]
            return {
                "runs": runs,
                "run": run,
                "fills": await store.fills(run.run_id),
                "orders": await store.orders(run.run_id),
                "equity": await store.equity(run.run_id),
                "funding": await store.funding(run.run_id),
                "positions": await store.positions(run.run_id),
            }
        finally:
            await store.close()

    return asyncio.run(fetch())


def final_marks(journal: Path) -> dict[str, float]:
    """The marks a portfolio uses: last quote mid for spot, last mark price for perpetuals."""
    quotes: dict[str, float] = {}
    marks: dict[str, float] = {}
    for event in read_events(journal):
        if isinstance(event, Quote):
            quotes[event.instrument] = 0.5 * (event.bid + event.ask)
        elif isinstance(event, MarkPrice):
            marks[event.instrument] = event.mark_price
    return quotes | marks


def is_perp(instrument: str) -> bool:
    return instrument.endswith("-PERP")


def flows(data: dict) -> tuple[dict[str, float], float, float, float]:
    """Signed quantity per instrument, Σ signed notional, Σ fees and Σ funding, from stored rows."""
    quantity: dict[str, float] = defaultdict(float)
    notional = []
    for fill in data["fills"]:
        signed = fill.qty if fill.side == "BUY" else -fill.qty
        quantity[fill.instrument] += signed
        notional.append(signed * fill.price)
    fees = math.fsum(f.fee for f in data["fills"])
    funding = math.fsum(f.amount for f in data["funding"])
    return quantity, math.fsum(notional), fees, funding


def test_paper_run_trades_stores_journals_logs_and_reconciles(tmp_path: Path) -> None:
    journal = tmp_path / "run.jsonl"
    result = run_main(
        tmp_path, "--duration", "10", "--speed", "600", "--seed", "3", "--journal", str(journal)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = load_run(tmp_path / "volbot.db")
    run = data["run"]
    assert run.status == "completed"
    assert run.run_id in result.stdout
    assert len(data["fills"]) > 0 and len(data["orders"]) > 0 and len(data["equity"]) > 0
    assert run.fills_sha256 and run.obs_sha256

    # journal: every event the run processed, readable, with the run's id
    assert read_header(journal)["run_id"] == run.run_id
    assert sum(1 for _ in read_events(journal)) == run.summary["events"] > 1000

    # JSON logs with the run id and the order context
    log_lines = [
        json.loads(line) for line in (tmp_path / "logs" / f"{run.run_id}.jsonl").read_text().splitlines()
    ]
    assert all(line.get("run_id") == run.run_id for line in log_lines)
    assert any(line.get("client_order_id") for line in log_lines if "fill" in line["event"])

    # fills + fees + funding reconcile to the stored cash, and marked positions to the stored equity
    quantity, signed_notional, fees, funding = flows(data)
    last = data["equity"][-1]
    positions = data["positions"]
    perp_cost = math.fsum(
        positions[i].qty * positions[i].avg_price for i in positions if is_perp(i) and positions[i].qty
    )
    for instrument, qty in quantity.items():
        assert positions[instrument].qty == pytest.approx(qty, abs=1e-9)
    expected_cash = INITIAL_CASH - signed_notional + perp_cost - fees + funding
    assert abs(last.cash - expected_cash) <= 1e-9 * INITIAL_CASH
    marks = final_marks(journal)
    expected_equity = (
        INITIAL_CASH
        - signed_notional
        - fees
        + funding
        + math.fsum(qty * marks[instrument] for instrument, qty in quantity.items())
    )
    assert abs(last.equity - expected_equity) <= 1e-9 * INITIAL_CASH


def test_sigterm_loses_nothing_and_next_run_resumes(tmp_path: Path) -> None:
    first_journal = tmp_path / "first.jsonl"
    process = subprocess.Popen(
        main_args(tmp_path, "--speed", "600", "--seed", "4", "--journal", str(first_journal)),
        cwd=PROJECT_ROOT,
        env=paper_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_first_fill(tmp_path / "logs", process)
    time.sleep(2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr[-3000:]
    first = load_run(tmp_path / "volbot.db")
    run1 = first["run"]
    assert run1.status == "completed"
    assert sum(1 for _ in read_events(first_journal)) == run1.summary["events"]
    assert len(first["fills"]) == run1.summary["fills"] > 0

    second_journal = tmp_path / "second.jsonl"
    result = run_main(
        tmp_path, "--duration", "6", "--speed", "600", "--seed", "5", "--journal", str(second_journal)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    second = load_run(tmp_path / "volbot.db")
    run2 = second["run"]
    assert run2.run_id != run1.run_id and run2.parent_run_id == run1.run_id

    # positions and cash continue from the first run: run 2's flows applied to run 1's end state
    q1 = flows(first)[0]
    q2, notional2, fees2, funding2 = flows(second)
    for instrument in set(q1) | set(q2):
        assert second["positions"][instrument].qty == pytest.approx(
            q1.get(instrument, 0.0) + q2.get(instrument, 0.0), abs=1e-9
        )

    def perp_cost(positions: dict) -> float:
        return math.fsum(p.qty * p.avg_price for i, p in positions.items() if is_perp(i) and p.qty)

    cash1 = first["equity"][-1].cash
    expected_cash2 = (
        cash1 - notional2 + perp_cost(second["positions"]) - perp_cost(first["positions"]) - fees2 + funding2
    )
    assert abs(second["equity"][-1].cash - expected_cash2) <= 1e-9 * INITIAL_CASH
    # the second run's journal starts after the first run's last event (event time never goes back)
    last_first = max(e.ts_recv for e in read_events(first_journal))
    assert next(iter(read_events(second_journal))).ts_recv > last_first


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("[risk]\nmax_drawdown = 1.5\n", "risk.max_drawdown"),
        ("[run]\nspeling = 1\n", "run.speling"),
        ("[run\n", "TOML"),
    ],
)
def test_bad_config_is_one_line_and_exit_2(tmp_path: Path, toml: str, expected: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(toml)
    result = run_main(tmp_path, "--config", str(config), "--duration", "1", timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [["--speed", "fast"], ["--duration", "-3"], ["--mode", "nope"], ["--config", "/nonexistent/volbot.toml"]],
)
def test_bad_cli_arguments_are_one_line_and_exit_2(tmp_path: Path, args: list[str]) -> None:
    command = [sys.executable, "main.py", *(args if "--mode" in args else ["--mode", "paper", *args])]
    result = subprocess.run(
        command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60, env=paper_env(tmp_path)
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
