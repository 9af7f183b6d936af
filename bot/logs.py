"""Structured logging: JSON lines per run for machines, a readable console for people, secrets for no one.

Every logger — structlog's (``structlog.get_logger("bot.bus")``) and the standard library's
(SQLAlchemy, asyncio) — goes through the standard ``logging`` root logger to two handlers:
``<log_dir>/<run_id>.jsonl`` (one JSON object per line: ``timestamp`` ISO UTC, ``level``,
``logger``, ``event`` and the bound context) and the console on stderr (colours only on a
terminal). Both pass through :func:`redact_secrets` last, so a secret cannot reach either.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import msgspec
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from bot.bus import EventBus
from bot.events import (
    FeedState,
    FeedStatus,
    Fill,
    FundingPayment,
    OrderIntent,
    OrderStatus,
    OrderUpdate,
    RiskDecision,
    RiskState,
    RiskStateChanged,
)

REDACTED = "***"
# Keys whose values are secrets whatever they hold.
_SECRET_KEY = re.compile(r"api_?key|secret|password|passwd|token|passphrase", re.IGNORECASE)
# Shorter strings would redact ordinary words all over the logs.
MIN_SECRET_LENGTH = 8

_secrets: set[str] = set()
_handlers: list[logging.Handler] = []
_previous_root_level: int | None = None
_json_encoder = msgspec.json.Encoder(enc_hook=str)


def register_secret(value: str) -> None:
    """Redact ``value`` wherever it appears in any later log line (API keys read at start-up)."""
    if len(value) < MIN_SECRET_LENGTH:
        raise ValueError(f"a secret to redact needs at least {MIN_SECRET_LENGTH} characters")
    _secrets.add(value)


def _redact(key: object, value: Any) -> Any:
    if isinstance(key, str) and _SECRET_KEY.search(key) and value is not None:
        return REDACTED
    if isinstance(value, dict):
        return {k: _redact(k, v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(None, item) for item in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    # Strings, and anything else by its text: an object's repr could carry a secret too.
    text = value if isinstance(value, str) else str(value)
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def redact_secrets(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Processor: values of secret-looking keys and every registered secret become ``***``."""
    return {key: _redact(key, value) for key, value in event_dict.items()}


_LEADING_KEYS = ("timestamp", "level", "logger", "event")


def _json_dumps(event_dict: EventDict, **_: Any) -> str:
    """Valid JSON whatever the values (NaN as null, unknown types by their text), the standard keys first."""
    ordered = {key: event_dict[key] for key in _LEADING_KEYS if key in event_dict}
    ordered.update(event_dict)
    return _json_encoder.encode(ordered).decode()


def configure_logging(
    log_dir: Path, run_id: str, level: str = "INFO", console: bool = True, json_file: bool = True
) -> Path:
    """Send all logging to ``log_dir/<run_id>.jsonl`` and/or the console; returns that file's path.

    Calling it again replaces the previous configuration (repeated runs and tests in one
    process); ``run_id`` is bound in the calling context, so tasks started afterwards carry it.
    The file is not created when ``json_file`` is false.
    """
    global _previous_root_level
    close_logging()
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.stdlib.PositionalArgumentsFormatter(),
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )

    path = Path(log_dir) / f"{run_id}.jsonl"
    if json_file:
        path.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(path, encoding="utf-8")
        file_handler.setFormatter(
            _formatter(shared, structlog.processors.JSONRenderer(serializer=_json_dumps))
        )
        _handlers.append(file_handler)
    if console:
        colors = sys.stderr.isatty() and "NO_COLOR" not in os.environ
        console_handler = logging.StreamHandler(sys.stderr)
        console_handler.setFormatter(
            _formatter(shared, structlog.dev.ConsoleRenderer(colors=colors, sort_keys=False))
        )
        _handlers.append(console_handler)

    root = logging.getLogger()
    _previous_root_level = root.level
    root.setLevel(level.upper())
    for handler in _handlers:
        root.addHandler(handler)
    structlog.contextvars.bind_contextvars(run_id=run_id)
    return path


def _formatter(shared: list[Processor], renderer: Processor) -> structlog.stdlib.ProcessorFormatter:
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, redact_secrets, renderer],
    )


def close_logging() -> None:
    """Flush and close the handlers :func:`configure_logging` installed and undo its configuration."""
    global _previous_root_level
    root = logging.getLogger()
    for handler in _handlers:
        root.removeHandler(handler)
        handler.close()
    _handlers.clear()
    if _previous_root_level is not None:
        root.setLevel(_previous_root_level)
        _previous_root_level = None
    structlog.contextvars.unbind_contextvars("run_id")
    structlog.reset_defaults()


class EventLogger:
    """Logs the trading story — intents, risk verdicts, orders, fills, funding, feed health — with context.

    Rejections, risk state changes and degraded feeds are warnings; a lost feed is an error.
    """

    def __init__(self, bus: EventBus) -> None:
        self._log = structlog.get_logger("bot.events")
        bus.subscribe(OrderIntent, self.on_order_intent)
        bus.subscribe(RiskDecision, self.on_risk_decision)
        bus.subscribe(RiskStateChanged, self.on_risk_state_changed)
        bus.subscribe(OrderUpdate, self.on_order_update)
        bus.subscribe(Fill, self.on_fill)
        bus.subscribe(FundingPayment, self.on_funding)
        bus.subscribe(FeedStatus, self.on_feed_status)

    def on_order_intent(self, intent: OrderIntent) -> None:
        self._log.info(
            "order_intent",
            client_order_id=intent.client_order_id,
            instrument=intent.instrument,
            side=intent.side.value,
            quantity=intent.quantity,
            order_type=intent.order_type.value,
            limit_price=intent.limit_price,
            reduce_only=intent.reduce_only,
            reason=intent.reason,
            ts_event=intent.ts_event,
        )

    def on_risk_decision(self, decision: RiskDecision) -> None:
        log = self._log.info if decision.approved else self._log.warning
        log(
            "risk_approved" if decision.approved else "risk_rejected",
            client_order_id=decision.client_order_id,
            instrument=decision.instrument,
            reason=decision.reason,
            detail=decision.detail,
            risk_state=decision.risk_state.value,
            ts_event=decision.ts_event,
        )

    def on_risk_state_changed(self, change: RiskStateChanged) -> None:
        self._log.warning(
            "risk_state_changed",
            previous=change.previous.value,
            current=change.current.value,
            reason=change.reason,
            drawdown=change.drawdown,
            ts_event=change.ts_event,
        )

    def on_order_update(self, update: OrderUpdate) -> None:
        log = self._log.warning if update.status is OrderStatus.REJECTED else self._log.info
        log(
            "order_" + update.status.value.lower(),
            client_order_id=update.client_order_id,
            instrument=update.instrument,
            venue_order_id=update.venue_order_id,
            filled_qty=update.filled_qty,
            avg_price=update.avg_price,
            reason=update.reason,
            ts_event=update.ts_event,
        )

    def on_fill(self, fill: Fill) -> None:
        self._log.info(
            "fill",
            client_order_id=fill.client_order_id,
            instrument=fill.instrument,
            side=fill.side.value,
            quantity=fill.quantity,
            price=fill.price,
            fee=fill.fee,
            fee_currency=fill.fee_currency,
            liquidity=fill.liquidity.value,
            trade_id=fill.trade_id,
            ts_event=fill.ts_event,
        )

    def on_funding(self, payment: FundingPayment) -> None:
        self._log.info(
            "funding",
            instrument=payment.instrument,
            funding_rate=payment.funding_rate,
            mark_price=payment.mark_price,
            position_qty=payment.position_qty,
            amount=payment.amount,
            ts_event=payment.ts_event,
        )

    def on_feed_status(self, status: FeedStatus) -> None:
        if status.status is FeedState.DISCONNECTED:
            log = self._log.error
        elif status.status in (FeedState.STALE, FeedState.GAP):
            log = self._log.warning
        else:
            log = self._log.info
        log(
            "feed_status",
            feed=status.feed,
            status=status.status.value,
            detail=status.detail,
            ts_event=status.ts_event,
        )


class PositionView(Protocol):
    @property
    def quantity(self) -> float: ...


class PortfolioView(Protocol):
    """What the status line reads of the portfolio."""

    @property
    def initial_cash(self) -> float: ...

    @property
    def positions(self) -> Mapping[str, PositionView]: ...

    def equity(self) -> float: ...

    def gross_exposure(self) -> float: ...


class StatusLine:
    """The periodic one-line summary: equity, PnL since the first start, positions, risk state, throughput."""

    def __init__(self) -> None:
        self._log = structlog.get_logger("bot.status")

    def format(self, portfolio: PortfolioView, risk_state: RiskState, events_per_s: float) -> str:
        equity = portfolio.equity()
        pnl = equity - portfolio.initial_cash
        pnl_pct = 100.0 * pnl / portfolio.initial_cash if portfolio.initial_cash else math.nan
        positions = " ".join(f"{name}={p.quantity:+g}" for name, p in portfolio.positions.items()) or "flat"
        return (
            f"equity {equity:,.2f} | PnL {pnl:+,.2f} ({pnl_pct:+.2f}%)"
            f" | gross {portfolio.gross_exposure():.2f} | {positions}"
            f" | risk {risk_state.value} | {events_per_s:,.1f} ev/s"
        )

    def emit(self, portfolio: PortfolioView, risk_state: RiskState, events_per_s: float) -> str:
        """Log the line (INFO ``status``, with the figures as fields for the JSON log) and return it."""
        line = self.format(portfolio, risk_state, events_per_s)
        self._log.info(
            "status",
            line=line,
            equity=portfolio.equity(),
            pnl=portfolio.equity() - portfolio.initial_cash,
            gross_exposure=portfolio.gross_exposure(),
            positions={name: p.quantity for name, p in portfolio.positions.items()},
            risk_state=risk_state.value,
            events_per_s=events_per_s,
        )
        return line
