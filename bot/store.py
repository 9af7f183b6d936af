"""The store: what a run did (orders, fills, equity, risk events, positions, funding) and where to resume.

SQLAlchemy 2 async with identical models on SQLite (default, ``aiosqlite``) and PostgreSQL
(``asyncpg``). Prices and quantities are stored as IEEE doubles (bit-exact round trip),
timestamps as integer nanoseconds since the epoch. JSON columns are encoded by msgspec
(floats exact, NaN/inf as ``null`` so PostgreSQL accepts them).

The engine never waits on the database: :class:`StoreRecorder` turns bus events into rows in
synchronous handlers, and the app awaits :meth:`StoreRecorder.flush` (every second of wall
time, at checkpoints and at shutdown), which writes everything buffered in one transaction.
Table by table reference and the resume protocol: ``docs/STORE.md``.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import msgspec
import structlog
from sqlalchemy import (
    JSON,
    BigInteger,
    Double,
    ForeignKey,
    Index,
    Integer,
    UniqueConstraint,
    delete,
    event,
    func,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, declared_attr, mapped_column

from bot.bus import EventBus
from bot.events import (
    Fill,
    FundingPayment,
    OrderIntent,
    OrderStatus,
    OrderUpdate,
    PortfolioSnapshot,
    PositionUpdate,
    RiskDecision,
    RiskStateChanged,
)

DEFAULT_URL = "sqlite+aiosqlite:///var/volbot.db"
# Plain URLs are mapped to the async driver of their backend.
_ASYNC_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
}

log = structlog.get_logger("bot.store")


class RunStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    CRASHED = "crashed"


def async_database_url(url: str | URL) -> URL:
    """``url`` with its backend's async driver (``sqlite://`` → aiosqlite, ``postgresql://`` → asyncpg)."""
    parsed = make_url(url)
    driver = _ASYNC_DRIVERS.get(parsed.drivername)
    return parsed.set(drivername=driver) if driver else parsed


def _json_dumps(value: Any) -> str:
    return msgspec.json.encode(value).decode()


# --- tables ------------------------------------------------------------------------------------

# SQLite only auto-increments an INTEGER PRIMARY KEY; BIGINT everywhere else.
_Id = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        int: BigInteger,
        float: Double,
        dict[str, Any]: JSON(none_as_null=True),
    }


class RunRecord(Base):
    """One process run: how it was configured, how it ended, and the run it resumed from."""

    __tablename__ = "runs"

    run_id: Mapped[str] = mapped_column(primary_key=True)
    mode: Mapped[str]
    status: Mapped[str] = mapped_column(index=True)
    started_at: Mapped[int]
    ended_at: Mapped[int | None]
    seed: Mapped[int]
    config: Mapped[dict[str, Any]]
    policy: Mapped[str]
    journal_path: Mapped[str]
    fills_sha256: Mapped[str | None]
    obs_sha256: Mapped[str | None]
    summary: Mapped[dict[str, Any] | None]
    parent_run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.run_id"))


class _RunRow:
    """Columns shared by every per-run table: insertion id, owning run, event time."""

    id: Mapped[int] = mapped_column(_Id, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id"), index=True)
    ts: Mapped[int]


class _AppendedRow(_RunRow):
    """A row the recorder appends; ``seq`` numbers the run's rows of its table from 1."""

    seq: Mapped[int]

    @declared_attr.directive
    def __table_args__(cls) -> tuple[UniqueConstraint, ...]:
        return (UniqueConstraint("run_id", "seq"),)


class OrderRecord(Base):
    """Latest state of one order; upserted on every change.

    ``reason`` is why the order manager made it; ``status_reason`` why the risk engine or the
    venue rejected or cancelled it. Intent columns are NULL for an order this run only saw
    updates of (one left open by the run it resumed).
    """

    __tablename__ = "orders"
    __table_args__ = (UniqueConstraint("run_id", "client_order_id"),)

    id: Mapped[int] = mapped_column(_Id, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id"), index=True)
    client_order_id: Mapped[str]
    instrument: Mapped[str]
    side: Mapped[str | None]
    qty: Mapped[float | None]
    order_type: Mapped[str | None]
    limit_price: Mapped[float | None]
    reduce_only: Mapped[bool | None]
    reason: Mapped[str]
    status: Mapped[str]
    status_reason: Mapped[str]
    venue_order_id: Mapped[str]
    filled_qty: Mapped[float]
    avg_price: Mapped[float]
    ts_created: Mapped[int]
    ts_updated: Mapped[int]


class FillRecord(_AppendedRow, Base):
    __tablename__ = "fills"

    client_order_id: Mapped[str]
    instrument: Mapped[str]
    side: Mapped[str]
    qty: Mapped[float]
    price: Mapped[float]
    fee: Mapped[float]
    fee_currency: Mapped[str]
    liquidity: Mapped[str]
    trade_id: Mapped[str]


class EquityRecord(_AppendedRow, Base):
    """One portfolio snapshot; marked values are NULL when not a number (no mark yet)."""

    __tablename__ = "equity"

    equity: Mapped[float | None]
    cash: Mapped[float]
    unrealized_pnl: Mapped[float | None]
    realized_pnl: Mapped[float]
    fees: Mapped[float]
    funding: Mapped[float]
    gross_exposure: Mapped[float | None]


class RiskEventRecord(_AppendedRow, Base):
    """A risk decision on one intent (``kind="decision"``) or a risk state change (``"state_change"``)."""

    __tablename__ = "risk_events"

    kind: Mapped[str]
    client_order_id: Mapped[str | None]
    instrument: Mapped[str | None]
    approved: Mapped[bool | None]
    reason: Mapped[str]
    detail: Mapped[str]
    risk_state: Mapped[str]
    previous_state: Mapped[str | None]
    drawdown: Mapped[float | None]


class PositionRecord(_AppendedRow, Base):
    """Position history; the latest row per instrument is the current position."""

    __tablename__ = "positions"

    instrument: Mapped[str]
    qty: Mapped[float]
    avg_price: Mapped[float | None]
    realized_pnl: Mapped[float]
    unrealized_pnl: Mapped[float | None]


class FundingRecord(_AppendedRow, Base):
    __tablename__ = "funding"

    instrument: Mapped[str]
    rate: Mapped[float]
    mark: Mapped[float]
    qty: Mapped[float]
    amount: Mapped[float]


class ComponentStateRecord(_RunRow, Base):
    """A component's ``state_dict()`` at a checkpoint; only the latest per (run, component) is kept."""

    __tablename__ = "component_state"
    __table_args__ = (Index("ix_component_state_run_component", "run_id", "component"),)

    component: Mapped[str]
    state: Mapped[dict[str, Any]]


# Row tables the recorder appends to, in the order a flush writes them.
_APPEND_TABLES: tuple[type[Base], ...] = (
    FillRecord,
    EquityRecord,
    PositionRecord,
    FundingRecord,
    RiskEventRecord,
)
# Order columns an update may change; the others are written once, when the order is first seen.
_ORDER_MUTABLE = ("status", "status_reason", "venue_order_id", "filled_qty", "avg_price", "ts_updated")


_R = TypeVar("_R", FillRecord, EquityRecord, RiskEventRecord, FundingRecord, OrderRecord)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The states a run saved last, and which run saved them."""

    run_id: str
    ts: int
    states: dict[str, dict[str, Any]]


# --- the store ---------------------------------------------------------------------------------


class Store:
    """Async access to the database; one instance per process, opened once and closed at exit."""

    def __init__(self, url: str | URL = DEFAULT_URL, *, echo: bool = False) -> None:
        self.url = async_database_url(url)
        self._engine = create_async_engine(
            self.url, echo=echo, json_serializer=_json_dumps, json_deserializer=msgspec.json.decode
        )
        if self.url.get_backend_name() == "sqlite":
            event.listen(self._engine.sync_engine, "connect", _sqlite_pragmas)
        self._sessions = async_sessionmaker(self._engine, expire_on_commit=False)
        self._upsert_insert = sqlite.insert if self.url.get_backend_name() == "sqlite" else postgresql.insert

    async def open(self) -> None:
        """Create the SQLite file's folder and any missing table."""
        database = self.url.database
        if self.url.get_backend_name() == "sqlite" and database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        async with self._engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)

    async def close(self) -> None:
        await self._engine.dispose()

    # --- runs ----------------------------------------------------------------------------------

    async def start_run(
        self,
        run_id: str,
        mode: str,
        seed: int,
        config: dict[str, Any],
        policy: str,
        journal_path: str,
        parent_run_id: str | None = None,
    ) -> list[str]:
        """Record a new running run; runs a dead process left ``running`` become ``crashed`` (returned).

        One bot writes to a database at a time, so any other ``running`` run is a dead one.
        """
        async with self._sessions.begin() as session:
            crashed = list(
                await session.scalars(select(RunRecord.run_id).where(RunRecord.status == RunStatus.RUNNING))
            )
            if crashed:
                await session.execute(
                    update(RunRecord).where(RunRecord.run_id.in_(crashed)).values(status=RunStatus.CRASHED)
                )
            session.add(
                RunRecord(
                    run_id=run_id,
                    mode=mode,
                    status=RunStatus.RUNNING,
                    started_at=time.time_ns(),
                    seed=seed,
                    config=config,
                    policy=policy,
                    journal_path=journal_path,
                    parent_run_id=parent_run_id,
                )
            )
        for dead in crashed:
            log.warning("run_marked_crashed", crashed_run_id=dead, new_run_id=run_id)
        return crashed

    async def finish_run(
        self,
        run_id: str,
        status: RunStatus | str,
        summary: dict[str, Any],
        fills_sha256: str | None = None,
        obs_sha256: str | None = None,
    ) -> None:
        status = RunStatus(status)
        async with self._sessions.begin() as session:
            result = await session.execute(
                update(RunRecord)
                .where(RunRecord.run_id == run_id)
                .values(
                    status=status,
                    ended_at=time.time_ns(),
                    summary=summary,
                    fills_sha256=fills_sha256,
                    obs_sha256=obs_sha256,
                )
            )
            if result.rowcount != 1:
                raise KeyError(f"unknown run {run_id!r}")

    async def runs(self) -> list[RunRecord]:
        """Every run, oldest first."""
        async with self._sessions() as session:
            return list(
                await session.scalars(select(RunRecord).order_by(RunRecord.started_at, RunRecord.run_id))
            )

    async def latest_run(self, mode: str | None = None) -> RunRecord | None:
        """The newest run, of ``mode`` only when given."""
        query = select(RunRecord)
        if mode is not None:
            query = query.where(RunRecord.mode == mode)
        async with self._sessions() as session:
            return await session.scalar(
                query.order_by(RunRecord.started_at.desc(), RunRecord.run_id.desc()).limit(1)
            )

    # --- checkpoints ---------------------------------------------------------------------------

    async def save_component_states(self, run_id: str, ts: int, states: dict[str, dict[str, Any]]) -> None:
        """Save one checkpoint atomically, replacing the run's previous state of each component."""
        async with self._sessions.begin() as session:
            await session.execute(
                delete(ComponentStateRecord).where(
                    ComponentStateRecord.run_id == run_id, ComponentStateRecord.component.in_(list(states))
                )
            )
            session.add_all(
                ComponentStateRecord(run_id=run_id, ts=ts, component=name, state=state)
                for name, state in states.items()
            )

    async def latest_checkpoint(self, mode: str | None = None) -> Checkpoint | None:
        """The run that saved a checkpoint last (of ``mode`` when given), with each component's latest state.

        A live run must never resume a paper run's books, nor the other way round: the app asks by mode.
        """
        query = select(ComponentStateRecord)
        if mode is not None:
            query = query.join(RunRecord, RunRecord.run_id == ComponentStateRecord.run_id).where(
                RunRecord.mode == mode
            )
        async with self._sessions() as session:
            last = await session.scalar(query.order_by(ComponentStateRecord.id.desc()).limit(1))
            if last is None:
                return None
            latest_ids = (
                select(func.max(ComponentStateRecord.id))
                .where(ComponentStateRecord.run_id == last.run_id)
                .group_by(ComponentStateRecord.component)
            )
            rows = await session.scalars(
                select(ComponentStateRecord).where(ComponentStateRecord.id.in_(latest_ids))
            )
            return Checkpoint(
                run_id=last.run_id, ts=last.ts, states={row.component: row.state for row in rows}
            )

    async def latest_component_states(self, mode: str | None = None) -> dict[str, dict[str, Any]] | None:
        """What a new run resumes from: the latest checkpoint's states (of a run of ``mode`` when given)."""
        checkpoint = await self.latest_checkpoint(mode)
        return checkpoint.states if checkpoint is not None else None

    # --- rows ----------------------------------------------------------------------------------

    async def write_rows(
        self, orders: list[dict[str, Any]], rows: dict[type[Base], list[dict[str, Any]]]
    ) -> None:
        """Upsert ``orders`` and append ``rows`` (column dicts per table) in one transaction."""
        async with self._sessions.begin() as session:
            if orders:
                upsert = self._upsert_insert(OrderRecord)
                await session.execute(
                    upsert.on_conflict_do_update(
                        index_elements=["run_id", "client_order_id"],
                        set_={column: upsert.excluded[column] for column in _ORDER_MUTABLE},
                    ),
                    orders,
                )
            for table in _APPEND_TABLES:
                if rows.get(table):
                    # A retry of a flush whose commit did land rewrites nothing.
                    append = self._upsert_insert(table).on_conflict_do_nothing(
                        index_elements=["run_id", "seq"]
                    )
                    await session.execute(append, rows[table])

    async def orders(self, run_id: str) -> list[OrderRecord]:
        """The run's orders in creation order."""
        return await self._select(OrderRecord, run_id, OrderRecord.id)

    async def fills(self, run_id: str) -> list[FillRecord]:
        return await self._select(FillRecord, run_id, FillRecord.seq)

    async def equity(self, run_id: str) -> list[EquityRecord]:
        return await self._select(EquityRecord, run_id, EquityRecord.seq)

    async def risk_events(self, run_id: str) -> list[RiskEventRecord]:
        return await self._select(RiskEventRecord, run_id, RiskEventRecord.seq)

    async def funding(self, run_id: str) -> list[FundingRecord]:
        return await self._select(FundingRecord, run_id, FundingRecord.seq)

    async def positions(self, run_id: str) -> dict[str, PositionRecord]:
        """Current position per instrument: the latest row of each."""
        async with self._sessions() as session:
            latest = (
                select(func.max(PositionRecord.seq))
                .where(PositionRecord.run_id == run_id)
                .group_by(PositionRecord.instrument)
            )
            rows = await session.scalars(
                select(PositionRecord)
                .where(PositionRecord.run_id == run_id, PositionRecord.seq.in_(latest))
                .order_by(PositionRecord.instrument)
            )
            return {row.instrument: row for row in rows}

    async def _select(self, table: type[_R], run_id: str, order_by: Any) -> list[_R]:
        async with self._sessions() as session:
            return list(await session.scalars(select(table).where(table.run_id == run_id).order_by(order_by)))


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """Enforce foreign keys like PostgreSQL; WAL lets reports read while the bot writes."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


# --- the recorder ------------------------------------------------------------------------------


def _number(value: float) -> float | None:
    """NaN as NULL: SQLite cannot store NaN, so both backends store NULL."""
    return None if math.isnan(value) else value


class StoreRecorder:
    """Buffers the run's order, fill, funding, position, equity and risk events as rows.

    Handlers only append to memory; :meth:`flush` writes the buffer in one transaction. A
    failed flush puts its rows back in front of the buffer and re-raises, so the next flush
    retries them and nothing is lost or reordered.
    """

    def __init__(self, bus: EventBus, store: Store, run_id: str) -> None:
        self.run_id = run_id
        self._store = store
        self._rows: dict[type[Base], list[dict[str, Any]]] = {table: [] for table in _APPEND_TABLES}
        # Full rows of orders that may still change, and the ones changed since the last flush.
        self._orders: dict[str, dict[str, Any]] = {}
        self._dirty: dict[str, None] = {}
        self._seq: dict[type[Base], int] = dict.fromkeys(_APPEND_TABLES, 0)
        self._flush_lock = asyncio.Lock()
        bus.subscribe(OrderIntent, self.on_order_intent)
        bus.subscribe(RiskDecision, self.on_risk_decision)
        bus.subscribe(RiskStateChanged, self.on_risk_state_changed)
        bus.subscribe(OrderUpdate, self.on_order_update)
        bus.subscribe(Fill, self.on_fill)
        bus.subscribe(FundingPayment, self.on_funding)
        bus.subscribe(PositionUpdate, self.on_position)
        bus.subscribe(PortfolioSnapshot, self.on_snapshot)

    @property
    def pending(self) -> int:
        """Rows waiting for the next flush (an order changed several times counts once)."""
        return sum(len(rows) for rows in self._rows.values()) + len(self._dirty)

    # --- handlers (synchronous, memory only) ----------------------------------------------------

    def on_order_intent(self, intent: OrderIntent) -> None:
        self._orders[intent.client_order_id] = {
            "run_id": self.run_id,
            "client_order_id": intent.client_order_id,
            "instrument": intent.instrument,
            "side": intent.side.value,
            "qty": intent.quantity,
            "order_type": intent.order_type.value,
            "limit_price": intent.limit_price,
            "reduce_only": intent.reduce_only,
            "reason": intent.reason,
            "status": OrderStatus.NEW.value,
            "status_reason": "",
            "venue_order_id": "",
            "filled_qty": 0.0,
            "avg_price": 0.0,
            "ts_created": intent.ts_event,
            "ts_updated": intent.ts_event,
        }
        self._dirty[intent.client_order_id] = None

    def on_risk_decision(self, decision: RiskDecision) -> None:
        self._append(
            RiskEventRecord,
            {
                "ts": decision.ts_event,
                "kind": "decision",
                "client_order_id": decision.client_order_id,
                "instrument": decision.instrument,
                "approved": decision.approved,
                "reason": decision.reason,
                "detail": decision.detail,
                "risk_state": decision.risk_state.value,
                "previous_state": None,
                "drawdown": None,
            },
        )
        if not decision.approved:
            order = self._order_row(decision.client_order_id, decision.instrument, decision.ts_event)
            order.update(
                status=OrderStatus.REJECTED.value, status_reason=decision.reason, ts_updated=decision.ts_event
            )

    def on_risk_state_changed(self, change: RiskStateChanged) -> None:
        self._append(
            RiskEventRecord,
            {
                "ts": change.ts_event,
                "kind": "state_change",
                "client_order_id": None,
                "instrument": None,
                "approved": None,
                "reason": change.reason,
                "detail": "",
                "risk_state": change.current.value,
                "previous_state": change.previous.value,
                "drawdown": _number(change.drawdown),
            },
        )

    def on_order_update(self, update: OrderUpdate) -> None:
        order = self._order_row(update.client_order_id, update.instrument, update.ts_event)
        order.update(
            status=update.status.value,
            status_reason=update.reason,
            venue_order_id=update.venue_order_id or order["venue_order_id"],
            filled_qty=update.filled_qty,
            avg_price=update.avg_price,
            ts_updated=update.ts_event,
        )

    def on_fill(self, fill: Fill) -> None:
        self._append(
            FillRecord,
            {
                "ts": fill.ts_event,
                "client_order_id": fill.client_order_id,
                "instrument": fill.instrument,
                "side": fill.side.value,
                "qty": fill.quantity,
                "price": fill.price,
                "fee": fill.fee,
                "fee_currency": fill.fee_currency,
                "liquidity": fill.liquidity.value,
                "trade_id": fill.trade_id,
            },
        )

    def on_funding(self, payment: FundingPayment) -> None:
        self._append(
            FundingRecord,
            {
                "ts": payment.ts_event,
                "instrument": payment.instrument,
                "rate": payment.funding_rate,
                "mark": payment.mark_price,
                "qty": payment.position_qty,
                "amount": payment.amount,
            },
        )

    def on_position(self, position: PositionUpdate) -> None:
        self._append(
            PositionRecord,
            {
                "ts": position.ts_event,
                "instrument": position.instrument,
                "qty": position.quantity,
                "avg_price": _number(position.avg_price),
                "realized_pnl": position.realized_pnl,
                "unrealized_pnl": _number(position.unrealized_pnl),
            },
        )

    def on_snapshot(self, snapshot: PortfolioSnapshot) -> None:
        self._append(
            EquityRecord,
            {
                "ts": snapshot.ts_event,
                "equity": _number(snapshot.equity),
                "cash": snapshot.cash,
                "unrealized_pnl": _number(snapshot.unrealized_pnl),
                "realized_pnl": snapshot.realized_pnl,
                "fees": snapshot.fees,
                "funding": snapshot.funding,
                "gross_exposure": _number(snapshot.gross_exposure),
            },
        )

    def _append(self, table: type[Base], row: dict[str, Any]) -> None:
        self._seq[table] += 1
        self._rows[table].append({"run_id": self.run_id, "seq": self._seq[table], **row})

    def _order_row(self, client_order_id: str, instrument: str, ts: int) -> dict[str, Any]:
        """The order's cached row, marked changed; a bare row for an order whose intent this run never saw."""
        order = self._orders.get(client_order_id)
        if order is None:
            order = self._orders[client_order_id] = {
                "run_id": self.run_id,
                "client_order_id": client_order_id,
                "instrument": instrument,
                "side": None,
                "qty": None,
                "order_type": None,
                "limit_price": None,
                "reduce_only": None,
                "reason": "",
                "status": OrderStatus.NEW.value,
                "status_reason": "",
                "venue_order_id": "",
                "filled_qty": 0.0,
                "avg_price": 0.0,
                "ts_created": ts,
                "ts_updated": ts,
            }
        self._dirty[client_order_id] = None
        return order

    # --- writing -------------------------------------------------------------------------------

    async def flush(self) -> int:
        """Write everything buffered in one transaction; returns the number of rows written."""
        async with self._flush_lock:
            rows, self._rows = self._rows, {table: [] for table in _APPEND_TABLES}
            dirty, self._dirty = self._dirty, {}
            orders = [dict(self._orders[client_order_id]) for client_order_id in dirty]
            written = len(orders) + sum(len(batch) for batch in rows.values())
            if written == 0:
                return 0
            try:
                await self._store.write_rows(orders, rows)
            except BaseException:
                for table, batch in rows.items():
                    self._rows[table][:0] = batch
                self._dirty = dirty | self._dirty
                raise
            for order in orders:
                client_order_id = order["client_order_id"]
                if client_order_id not in self._dirty and not OrderStatus(order["status"]).is_open:
                    del self._orders[client_order_id]
            return written
