"""Logging: JSON lines with run context, secret redaction everywhere, event logging, the status line."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog

from bot.bus import EventBus
from bot.events import (
    FeedState,
    FeedStatus,
    Fill,
    OrderStatus,
    OrderUpdate,
    RiskDecision,
    RiskState,
    Side,
)
from bot.logs import EventLogger, StatusLine, close_logging, configure_logging, register_secret

BTC = "SYNTH:BTCUSDT-PERP"


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Leave the process's logging as it was for the other tests of this worker."""
    yield
    close_logging()


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_json_lines_carry_timestamp_level_logger_run_id_and_context(tmp_path: Path) -> None:
    path = configure_logging(tmp_path / "logs", "run-42", console=False)
    assert path == tmp_path / "logs" / "run-42.jsonl"
    structlog.get_logger("bot.test").info("order_sent", instrument=BTC, client_order_id="c-1", quantity=0.5)
    logging.getLogger("third.party").warning("pool %s exhausted", "db")
    close_logging()

    native, foreign = read_lines(path)
    assert {
        k: native[k] for k in ("event", "level", "logger", "run_id", "instrument", "client_order_id")
    } == {
        "event": "order_sent",
        "level": "info",
        "logger": "bot.test",
        "run_id": "run-42",
        "instrument": BTC,
        "client_order_id": "c-1",
    }
    assert native["quantity"] == 0.5
    stamp = datetime.fromisoformat(native["timestamp"])
    assert stamp.utcoffset() == UTC.utcoffset(None)
    assert abs((datetime.now(UTC) - stamp).total_seconds()) < 60
    assert (foreign["event"], foreign["level"], foreign["logger"], foreign["run_id"]) == (
        "pool db exhausted",
        "warning",
        "third.party",
        "run-42",
    )


def test_level_filters_lower_levels(tmp_path: Path) -> None:
    path = configure_logging(tmp_path, "run-w", level="WARNING", console=False)
    log = structlog.get_logger("bot.test")
    log.info("quiet")
    log.warning("loud")
    close_logging()
    assert [line["event"] for line in read_lines(path)] == ["loud"]


def test_secrets_never_reach_the_file_or_the_console(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = f"sk-{uuid.uuid4().hex}"
    register_secret(secret)
    path = configure_logging(tmp_path, "run-s", console=True)
    log = structlog.get_logger("bot.test")
    log.info("connecting", api_key=secret, url=f"wss://user:{secret}@example.invalid/ws")
    log.info("settings", live={"api_secret": "by-key-only", "keys": [secret]}, passphrase="hunter2")
    log.info(f"event text with {secret} inside")
    logging.getLogger("ccxt").error("auth failed for key %s", secret)
    try:
        raise PermissionError(f"rejected key {secret}")
    except PermissionError:
        log.exception("login_failed")
    close_logging()

    text = path.read_text(encoding="utf-8")
    console = capsys.readouterr().err
    assert secret not in text and secret not in console
    assert "hunter2" not in text and "by-key-only" not in text
    lines = read_lines(path)
    assert lines[0]["api_key"] == "***" and lines[0]["url"] == "wss://user:***@example.invalid/ws"
    assert lines[1]["live"] == {"api_secret": "***", "keys": ["***"]}
    assert "rejected key ***" in lines[-1]["exception"]
    assert "login_failed" in console and "\x1b[" not in console  # readable, no colours off a terminal


def test_short_secrets_are_refused() -> None:
    with pytest.raises(ValueError, match="at least"):
        register_secret("abc")


def test_reconfiguring_replaces_handlers_and_run_id(tmp_path: Path) -> None:
    root = logging.getLogger()
    handlers_before = len(root.handlers)
    first = configure_logging(tmp_path, "run-1", console=True)
    second = configure_logging(tmp_path, "run-2", console=True)
    assert len(root.handlers) == handlers_before + 2
    structlog.get_logger("bot.test").info("after")
    close_logging()
    assert len(root.handlers) == handlers_before
    assert first.read_text(encoding="utf-8") == ""
    [line] = read_lines(second)
    assert (line["event"], line["run_id"]) == ("after", "run-2")


def test_event_logger_logs_fills_and_rejections_with_their_order_ids(tmp_path: Path) -> None:
    path = configure_logging(tmp_path, "run-e", console=False)
    bus = EventBus()
    EventLogger(bus)
    bus.publish(
        Fill(
            ts_event=5,
            ts_recv=5,
            client_order_id="c-fill",
            instrument=BTC,
            side=Side.SELL,
            quantity=0.2,
            price=61_000.5,
            fee=6.1,
        )
    )
    bus.publish(
        RiskDecision(
            ts_event=6,
            ts_recv=6,
            client_order_id="c-risk",
            instrument=BTC,
            approved=False,
            reason="MAX_DRAWDOWN",
            detail="drawdown 0.21 > 0.20",
            risk_state=RiskState.HALTED,
        )
    )
    bus.publish(
        OrderUpdate(
            ts_event=7,
            ts_recv=7,
            client_order_id="c-venue",
            instrument=BTC,
            status=OrderStatus.REJECTED,
            reason="x",
        )
    )
    bus.publish(
        FeedStatus(ts_event=8, ts_recv=8, feed="binance", status=FeedState.DISCONNECTED, detail="eof")
    )
    close_logging()

    fill, rejection, venue_rejection, feed = read_lines(path)
    assert (fill["event"], fill["level"], fill["client_order_id"]) == ("fill", "info", "c-fill")
    assert (fill["side"], fill["price"], fill["instrument"], fill["ts_event"]) == ("SELL", 61_000.5, BTC, 5)
    assert (rejection["event"], rejection["level"], rejection["client_order_id"]) == (
        "risk_rejected",
        "warning",
        "c-risk",
    )
    assert (rejection["reason"], rejection["risk_state"]) == ("MAX_DRAWDOWN", "HALTED")
    assert (venue_rejection["event"], venue_rejection["level"]) == ("order_rejected", "warning")
    assert (feed["event"], feed["level"], feed["status"]) == ("feed_status", "error", "DISCONNECTED")


@dataclass
class FakePosition:
    quantity: float


@dataclass
class FakePortfolio:
    equity_value: float
    initial_cash: float = 100_000.0
    gross: float = 0.35
    positions: dict[str, FakePosition] = field(default_factory=dict)

    def equity(self) -> float:
        return self.equity_value

    def gross_exposure(self) -> float:
        return self.gross


def test_status_line_summarises_equity_pnl_positions_risk_and_rate(tmp_path: Path) -> None:
    portfolio = FakePortfolio(
        101_234.5, positions={BTC: FakePosition(0.25), "SYNTH:DOGEUSDT": FakePosition(-1e4)}
    )
    line = StatusLine().format(portfolio, RiskState.REDUCING, 12.34)
    assert "\n" not in line
    assert "equity 101,234.50" in line and "PnL +1,234.50 (+1.23%)" in line and "gross 0.35" in line
    assert f"{BTC}=+0.25" in line and "SYNTH:DOGEUSDT=-10000" in line
    assert "risk REDUCING" in line and "12.3 ev/s" in line
    assert "flat" in StatusLine().format(FakePortfolio(99_000.0), RiskState.ACTIVE, 0.0)
    assert "PnL -1,000.00 (-1.00%)" in StatusLine().format(FakePortfolio(99_000.0), RiskState.ACTIVE, 0.0)

    path = configure_logging(tmp_path, "run-status", console=False)
    assert StatusLine().emit(portfolio, RiskState.REDUCING, 12.34) == line
    close_logging()
    [record] = read_lines(path)
    assert (record["event"], record["line"], record["equity"], record["risk_state"]) == (
        "status",
        line,
        101_234.5,
        "REDUCING",
    )
    assert record["positions"] == {BTC: 0.25, "SYNTH:DOGEUSDT": -1e4}
