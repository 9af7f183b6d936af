"""The order manager: turns target exposures into order intents and owns every order's lifecycle.

Sizing: target quantity = target · equity / mark (spot targets below zero become zero), minus
the current position and the unfilled quantity of this manager's open orders on the
instrument, rounded down to the lot size. Adjustments smaller than ``rebalance_threshold`` of
equity, or below the instrument's minimums, are skipped. The manager never sends an order
against its own working orders on an instrument: it cancels them and sizes afresh at the
next decision.

Client order ids are derived from the decision's event time, the instrument and the index
of the intent within that decision, so the same events always produce the same ids (a replay
reproduces a live run's ids, and a venue can de-duplicate a resend). A second
``TargetExposure`` for an instrument at a decision time already handled is ignored.

When the risk engine halts trading, the manager cancels its open orders and sends reduce-only
market orders that flatten every position; while halted, every target is treated as zero.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict, Field

from bot.bus import EventBus
from bot.events import (
    CancelOrder,
    Fill,
    OrderIntent,
    OrderStatus,
    OrderType,
    OrderUpdate,
    RiskDecision,
    RiskState,
    RiskStateChanged,
    Side,
    TargetExposure,
)
from bot.instruments import InstrumentRegistry, InstrumentSpec
from bot.portfolio import Portfolio

log = structlog.get_logger(__name__)

STATE_VERSION = 1
CLIENT_ORDER_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,36}$")

# Legal lifecycle moves; a repeated status is a duplicate (ignored), anything else is illegal.
_TRANSITIONS: dict[OrderStatus, frozenset[OrderStatus]] = {
    OrderStatus.NEW: frozenset(
        {
            OrderStatus.ACCEPTED,
            OrderStatus.PARTIALLY_FILLED,
            OrderStatus.FILLED,
            OrderStatus.CANCELLED,
            OrderStatus.REJECTED,
        }
    ),
    # A venue may still refuse an accepted order when it comes to fill it (e.g. nothing left to reduce).
    OrderStatus.ACCEPTED: frozenset(
        {OrderStatus.PARTIALLY_FILLED, OrderStatus.FILLED, OrderStatus.CANCELLED, OrderStatus.REJECTED}
    ),
    OrderStatus.PARTIALLY_FILLED: frozenset(
        {OrderStatus.PARTIALLY_FILLED, OrderStatus.FILLED, OrderStatus.CANCELLED}
    ),
    OrderStatus.FILLED: frozenset(),
    OrderStatus.CANCELLED: frozenset(),
    OrderStatus.REJECTED: frozenset(),
}


class OrderManagerConfig(BaseModel):
    """How targets become orders."""

    model_config = ConfigDict(extra="forbid")

    rebalance_threshold: float = Field(
        0.02, ge=0, lt=1, description="skip adjustments whose notional is below this fraction of equity"
    )
    order_type: OrderType = OrderType.MARKET
    limit_offset_bps: float = Field(
        0.0, ge=0, le=500, description="LIMIT orders: price this far through the mark (buy above, sell below)"
    )
    client_id_prefix: str = Field("vb", pattern=r"^[A-Za-z0-9]{1,8}$")
    closed_order_history: int = Field(1000, ge=0, description="finished orders kept for order() lookups")


@dataclass(frozen=True, slots=True)
class ManagedOrder:
    """One order as the manager knows it; immutable, replaced on every change."""

    client_order_id: str
    instrument: str
    side: Side
    quantity: float
    order_type: OrderType
    limit_price: float | None
    reduce_only: bool
    status: OrderStatus
    ts_created: int
    ts_updated: int
    filled_qty: float = 0.0
    avg_fill_price: float = 0.0
    venue_order_id: str = ""
    reason: str = ""
    cancel_requested: bool = False

    @property
    def is_open(self) -> bool:
        return self.status.is_open

    @property
    def remaining(self) -> float:
        return max(self.quantity - self.filled_qty, 0.0)

    @property
    def signed_remaining(self) -> float:
        return self.remaining if self.side is Side.BUY else -self.remaining

    def to_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "side": self.side.value,
            "order_type": self.order_type.value,
            "status": self.status.value,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ManagedOrder:
        return cls(
            **{
                **data,
                "side": Side(data["side"]),
                "order_type": OrderType(data["order_type"]),
                "status": OrderStatus(data["status"]),
            }
        )


def client_order_id(prefix: str, decision_ts: int, instrument: str, index: int) -> str:
    """``{prefix}-{ts hex}-{instrument tag}-{index hex}``: deterministic and ≤ 36 Binance-safe chars."""
    tag = hashlib.blake2b(instrument.encode(), digest_size=3).hexdigest()
    cid = f"{prefix}-{decision_ts:x}-{tag}-{index:x}"
    if not CLIENT_ORDER_ID_PATTERN.match(cid):
        raise ValueError(f"client order id {cid!r} breaks the venue's format")
    return cid


class OrderManager:
    """Sizes orders from targets, tracks their lifecycle, flattens on a halt; sole owner of orders."""

    def __init__(
        self,
        bus: EventBus,
        instruments: InstrumentRegistry,
        portfolio: Portfolio,
        config: OrderManagerConfig | None = None,
    ) -> None:
        self._bus = bus
        self._instruments = instruments
        self._portfolio = portfolio
        self.config = config if config is not None else OrderManagerConfig()
        self._open: dict[str, ManagedOrder] = {}
        self._closed: OrderedDict[str, ManagedOrder] = OrderedDict()
        self._risk_state = RiskState.ACTIVE
        self._decision_ts = -1
        self._decision_index = 0
        self._decision_keys: set[str] = set()
        bus.subscribe(TargetExposure, self._on_target)
        bus.subscribe(RiskDecision, self._on_risk_decision)
        bus.subscribe(OrderUpdate, self._on_order_update)
        bus.subscribe(Fill, self._on_fill)
        bus.subscribe(RiskStateChanged, self._on_risk_state)

    # --- queries -------------------------------------------------------------------------------

    def open_orders(self, instrument: str | None = None) -> list[ManagedOrder]:
        """Open orders in creation order, optionally for one instrument."""
        return [o for o in self._open.values() if instrument is None or o.instrument == instrument]

    def order(self, client_order_id: str) -> ManagedOrder | None:
        """An open order, or a recently finished one (see ``closed_order_history``)."""
        return self._open.get(client_order_id) or self._closed.get(client_order_id)

    def pending_quantity(self, instrument: str) -> float:
        """Signed unfilled quantity of open orders on ``instrument``."""
        return sum(o.signed_remaining for o in self.open_orders(instrument))

    @property
    def risk_state(self) -> RiskState:
        """The risk state as last announced by the risk engine."""
        return self._risk_state

    # --- targets -------------------------------------------------------------------------------

    def _claim_decision(self, decision_ts: int, key: str) -> bool:
        """Register ``key`` for the decision at ``decision_ts``; False for a resend or a stale decision."""
        if decision_ts < self._decision_ts:
            return False
        if decision_ts > self._decision_ts:
            self._decision_ts = decision_ts
            self._decision_index = 0
            self._decision_keys.clear()
        if key in self._decision_keys:
            return False
        self._decision_keys.add(key)
        return True

    def _on_target(self, target: TargetExposure) -> None:
        context = {"instrument": target.instrument, "policy": target.policy, "target": target.target}
        if not self._claim_decision(target.ts_event, f"target:{target.instrument}"):
            log.info("target_ignored_duplicate_or_stale", decision_ts=target.ts_event, **context)
            return
        spec = self._instruments.get(target.instrument)
        if spec is None:
            log.error("target_unknown_instrument", **context)
            return
        if not math.isfinite(target.target):
            log.error("target_not_finite", **context)
            return
        halted = self._risk_state is RiskState.HALTED
        desired = 0.0 if halted else min(max(target.target, -1.0), 1.0)
        if not spec.is_perp:
            desired = max(desired, 0.0)
        mark = self._portfolio.mark(target.instrument)
        if mark is None or not mark > 0:
            log.warning("target_skipped_no_mark", **context)
            return
        equity = self._portfolio.equity()
        if desired != 0.0 and not equity > 0:
            log.warning("target_skipped_no_equity", equity=equity, **context)
            return
        target_qty = desired * equity / mark
        current = self._portfolio.position(target.instrument).quantity
        pending = self.pending_quantity(target.instrument)
        delta = spec.round_qty_down(target_qty - current - pending)
        if delta == 0.0:
            return
        notional = abs(delta) * mark
        if not halted and notional < self.config.rebalance_threshold * equity:
            log.debug("target_below_threshold", delta=delta, notional=notional, **context)
            return
        opposing = [o for o in self.open_orders(target.instrument) if (o.signed_remaining > 0) != (delta > 0)]
        if opposing:
            # Never trade against our own working orders: cancel them, size afresh next decision.
            for order in opposing:
                self._request_cancel(order)
            return
        if not halted and (abs(delta) < spec.min_qty or notional < spec.min_notional):
            log.debug("target_below_instrument_minimum", delta=delta, notional=notional, **context)
            return
        self._submit(
            spec,
            target.ts_event,
            delta,
            mark,
            reduce_only=halted,
            reason=f"target {desired:+.4f} by {target.policy}",
        )

    def _submit(
        self,
        spec: InstrumentSpec,
        decision_ts: int,
        signed_qty: float,
        mark: float,
        reduce_only: bool,
        reason: str,
    ) -> None:
        side = Side.BUY if signed_qty > 0 else Side.SELL
        order_type = OrderType.MARKET if reduce_only else self.config.order_type
        limit_price = None
        if order_type is OrderType.LIMIT:
            offset = self.config.limit_offset_bps * 1e-4
            limit_price = spec.round_price(mark * (1.0 + offset if side is Side.BUY else 1.0 - offset))
        cid = client_order_id(
            self.config.client_id_prefix, decision_ts, spec.instrument, self._decision_index
        )
        self._decision_index += 1
        now = self._bus.clock.now_ns()
        quantity = abs(signed_qty)
        self._open[cid] = ManagedOrder(
            client_order_id=cid,
            instrument=spec.instrument,
            side=side,
            quantity=quantity,
            order_type=order_type,
            limit_price=limit_price,
            reduce_only=reduce_only,
            status=OrderStatus.NEW,
            ts_created=now,
            ts_updated=now,
        )
        log.info(
            "order_intent",
            instrument=spec.instrument,
            client_order_id=cid,
            side=side.value,
            quantity=quantity,
            order_type=order_type.value,
            limit_price=limit_price,
            reduce_only=reduce_only,
            reason=reason,
        )
        self._bus.publish(
            OrderIntent(
                ts_event=now,
                ts_recv=now,
                client_order_id=cid,
                instrument=spec.instrument,
                side=side,
                quantity=quantity,
                order_type=order_type,
                limit_price=limit_price,
                reduce_only=reduce_only,
                reason=reason,
            )
        )

    # --- halt ----------------------------------------------------------------------------------

    def _on_risk_state(self, change: RiskStateChanged) -> None:
        previous, self._risk_state = self._risk_state, change.current
        log.warning("order_manager_risk_state", previous=previous.value, current=change.current.value)
        if change.current is RiskState.HALTED and previous is not RiskState.HALTED:
            self.flatten(change.ts_event)

    def flatten(self, decision_ts: int) -> None:
        """Cancel every open order and send reduce-only market orders closing every position."""
        for order in self.open_orders():
            self._request_cancel(order)
        for instrument, position in self._portfolio.positions.items():
            if not self._claim_decision(decision_ts, f"flatten:{instrument}"):
                continue
            spec = self._instruments[instrument]
            quantity = spec.round_qty_down(position.quantity)
            mark = self._portfolio.mark(instrument)
            if quantity == 0.0 or mark is None:
                log.error("flatten_impossible", instrument=instrument, quantity=position.quantity, mark=mark)
                continue
            self._submit(spec, decision_ts, -quantity, mark, reduce_only=True, reason="flatten on halt")

    def _request_cancel(self, order: ManagedOrder) -> None:
        """Ask the venue to cancel ``order`` once; it stays open until the venue confirms."""
        if order.cancel_requested:
            return
        self._store(dataclasses.replace(order, cancel_requested=True))
        log.warning(
            "order_cancel_requested", instrument=order.instrument, client_order_id=order.client_order_id
        )
        now = self._bus.clock.now_ns()
        self._bus.publish(
            CancelOrder(
                ts_event=now, ts_recv=now, client_order_id=order.client_order_id, instrument=order.instrument
            )
        )

    # --- lifecycle -----------------------------------------------------------------------------

    def _on_risk_decision(self, decision: RiskDecision) -> None:
        order = self._open.get(decision.client_order_id)
        if order is None:
            return
        if decision.approved:
            log.info("order_submitted", instrument=order.instrument, client_order_id=order.client_order_id)
            return
        self._transition(order, OrderStatus.REJECTED, decision.ts_event, reason=decision.reason)

    def _on_order_update(self, update: OrderUpdate) -> None:
        order = self.order(update.client_order_id)
        if order is None:
            log.warning(
                "order_update_unknown", instrument=update.instrument, client_order_id=update.client_order_id
            )
            return
        if update.venue_order_id and update.venue_order_id != order.venue_order_id:
            order = self._store(dataclasses.replace(order, venue_order_id=update.venue_order_id))
        self._transition(order, update.status, update.ts_event, reason=update.reason)

    def _on_fill(self, fill: Fill) -> None:
        order = self.order(fill.client_order_id)
        if order is None:
            log.warning(
                "fill_unknown_order", instrument=fill.instrument, client_order_id=fill.client_order_id
            )
            return
        filled = order.filled_qty + fill.quantity
        avg = (order.filled_qty * order.avg_fill_price + fill.quantity * fill.price) / filled
        order = self._store(
            dataclasses.replace(order, filled_qty=filled, avg_fill_price=avg, ts_updated=fill.ts_event)
        )
        if not order.is_open:
            if order.status is not OrderStatus.FILLED:
                log.warning(
                    "fill_after_terminal",
                    instrument=order.instrument,
                    client_order_id=order.client_order_id,
                    status=order.status.value,
                )
            return
        spec = self._instruments.get(order.instrument)
        tolerance = 1e-9 * (spec.lot_size if spec is not None else order.quantity)
        complete = filled >= order.quantity - tolerance
        status = OrderStatus.FILLED if complete else OrderStatus.PARTIALLY_FILLED
        self._transition(order, status, fill.ts_event)

    def _transition(self, order: ManagedOrder, status: OrderStatus, ts: int, reason: str = "") -> None:
        context = {
            "instrument": order.instrument,
            "client_order_id": order.client_order_id,
            "previous": order.status.value,
            "status": status.value,
        }
        if status is order.status and status is not OrderStatus.PARTIALLY_FILLED:
            log.debug("order_status_repeated", **context)
            return
        if status not in _TRANSITIONS[order.status]:
            log.warning("order_transition_illegal", **context)
            return
        self._store(dataclasses.replace(order, status=status, ts_updated=ts, reason=reason or order.reason))
        log.info("order_status", filled_qty=order.filled_qty, reason=reason, **context)

    def _store(self, order: ManagedOrder) -> ManagedOrder:
        """Put the new version of ``order`` where it belongs: open orders, or the bounded history."""
        cid = order.client_order_id
        if order.is_open:
            self._open[cid] = order
            return order
        self._open.pop(cid, None)
        self._closed[cid] = order
        self._closed.move_to_end(cid)
        while len(self._closed) > self.config.closed_order_history:
            self._closed.popitem(last=False)
        return order

    # --- persistence ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Open orders and the decision cursor (so a resent target is still recognised after a restart)."""
        return {
            "version": STATE_VERSION,
            "open_orders": [o.to_dict() for o in self._open.values()],
            "risk_state": self._risk_state.value,
            "decision_ts": self._decision_ts,
            "decision_index": self._decision_index,
            "decision_keys": sorted(self._decision_keys),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported order manager state version {state.get('version')!r}")
        self._open = {o["client_order_id"]: ManagedOrder.from_dict(o) for o in state["open_orders"]}
        self._closed.clear()
        self._risk_state = RiskState(state["risk_state"])
        self._decision_ts = int(state["decision_ts"])
        self._decision_index = int(state["decision_index"])
        self._decision_keys = set(state["decision_keys"])
        log.info("orders_restored", open_orders=list(self._open), risk_state=self._risk_state.value)
