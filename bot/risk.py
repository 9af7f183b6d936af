"""The risk engine: the only gate between an order intent and a venue, and the drawdown kill switch.

Every :class:`~bot.events.OrderIntent` becomes exactly one :class:`~bot.events.RiskDecision`
(approved, or rejected with a :class:`RiskReason` code) and, when approved, a
:class:`~bot.events.SubmitOrder`. The engine fails closed: a missing instrument, price,
equity or funding rate is a rejection, never a pass.

Orders that *reduce* a position (opposite side, no larger than the position, also counting
this engine's approved orders still in flight) are judged only on what a venue would
refuse anyway (instrument, precision, price, reduce-only validity, rate limit, limit price
band): they are how risk comes off, so they pass in every risk state. Everything else is
judged on the position the account would hold if the order and every in-flight order filled.

Kill switch: peak-to-current drawdown of equity marked to market (open positions included),
evaluated on each quote or mark price while positions are open and on each portfolio
snapshot. ACTIVE → REDUCING at ``reduce_drawdown`` (only reducing orders pass) → HALTED at
``max_drawdown`` (the order manager flattens). The state never relaxes on its own; a person
calls :meth:`RiskEngine.reset`.

The engine must be subscribed after the portfolio (the app constructs the portfolio first)
so that it reads marks the portfolio has already updated.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bot.bus import EventBus
from bot.clock import NANOS_PER_SECOND
from bot.events import (
    FeedState,
    FeedStatus,
    Fill,
    MarketData,
    MarkPrice,
    OrderIntent,
    OrderType,
    OrderUpdate,
    PortfolioSnapshot,
    Quote,
    RiskDecision,
    RiskState,
    RiskStateChanged,
    Side,
    SubmitOrder,
    split_instrument,
)
from bot.instruments import InstrumentRegistry, InstrumentSpec
from bot.portfolio import Portfolio

log = structlog.get_logger(__name__)

STATE_VERSION = 1
_SEVERITY = {RiskState.ACTIVE: 0, RiskState.REDUCING: 1, RiskState.HALTED: 2}
_BLOCKING_FEED_STATES = frozenset({FeedState.STALE, FeedState.GAP, FeedState.DISCONNECTED})


class RiskReason(StrEnum):
    """Why an intent was approved or rejected (``RiskDecision.reason``)."""

    APPROVED = "APPROVED"
    UNKNOWN_INSTRUMENT = "UNKNOWN_INSTRUMENT"
    PRECISION = "PRECISION"
    NO_PRICE = "NO_PRICE"
    REDUCE_ONLY = "REDUCE_ONLY"
    HALTED = "HALTED"
    REDUCING = "REDUCING"
    PRICE_BAND = "PRICE_BAND"
    RATE_LIMIT = "RATE_LIMIT"
    STALE_DATA = "STALE_DATA"
    MIN_SIZE = "MIN_SIZE"
    ORDER_NOTIONAL = "ORDER_NOTIONAL"
    NO_EQUITY = "NO_EQUITY"
    INSUFFICIENT_BALANCE = "INSUFFICIENT_BALANCE"
    POSITION_LIMIT = "POSITION_LIMIT"
    GROSS_EXPOSURE = "GROSS_EXPOSURE"
    LEVERAGE = "LEVERAGE"
    MARGIN = "MARGIN"
    LIQUIDATION_DISTANCE = "LIQUIDATION_DISTANCE"
    FUNDING_BUDGET = "FUNDING_BUDGET"


class RiskConfig(BaseModel):
    """Limits of the risk engine. Notionals are USDT; exposures, rates and drawdowns are fractions."""

    model_config = ConfigDict(extra="forbid")

    max_position_notional: float = Field(
        150_000.0, gt=0, description="default cap on |qty·mark| per instrument"
    )
    position_notional_limits: dict[str, float] = Field(
        default_factory=dict, description="per-instrument overrides of max_position_notional"
    )
    max_gross_exposure: float = Field(1.5, gt=0, description="Σ|notional| / equity after the order")
    max_leverage: float = Field(1.0, gt=0, description="Σ|perp notional| / equity after the order")
    max_order_notional: float = Field(150_000.0, gt=0)
    price_band: float = Field(0.02, gt=0, lt=1, description="max |price / mark − 1| of the expected fill")
    max_orders_per_window: int = Field(20, ge=1)
    rate_window_s: float = Field(10.0, gt=0)
    stale_after_s: float = Field(5.0, gt=0, description="event-time age after which market data is stale")
    fee_rate: float = Field(0.001, ge=0, lt=1, description="taker fee used to estimate an order's cost")
    initial_margin_rate: float = Field(0.10, gt=0, le=1)
    maintenance_margin_rate: float = Field(0.005, gt=0, le=1)
    min_liquidation_distance: float = Field(
        0.15, ge=0, description="adverse move of all perps (fraction of price) the account must survive"
    )
    max_funding_cost: float = Field(
        0.0005, ge=0, description="expected funding paid per interval at current rates, fraction of equity"
    )
    reduce_drawdown: float = Field(0.05, gt=0, lt=1)
    max_drawdown: float = Field(0.10, gt=0, lt=1)

    @field_validator("position_notional_limits")
    @classmethod
    def _positive_limits(cls, limits: dict[str, float]) -> dict[str, float]:
        for instrument, limit in limits.items():
            split_instrument(instrument)
            if not limit > 0:
                raise ValueError(f"position limit for {instrument} must be positive, got {limit}")
        return limits

    @model_validator(mode="after")
    def _ordered_thresholds(self) -> RiskConfig:
        if self.reduce_drawdown > self.max_drawdown:
            raise ValueError("reduce_drawdown must not exceed max_drawdown")
        if self.maintenance_margin_rate >= self.initial_margin_rate:
            raise ValueError("maintenance_margin_rate must be below initial_margin_rate")
        return self

    def position_limit(self, instrument: str) -> float:
        return self.position_notional_limits.get(instrument, self.max_position_notional)


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: RiskReason
    detail: str


@dataclass(slots=True)
class _InFlight:
    """An approved order not yet finished: its unfilled signed quantity still counts against limits."""

    instrument: str
    remaining: float


@dataclass(frozen=True, slots=True)
class _Order:
    """An intent that adds risk, with what the checks need to know about it."""

    intent: OrderIntent
    spec: InstrumentSpec
    signed: float
    price: float  # expected fill price
    mark: float
    position: float
    effective: float  # position plus this engine's orders in flight

    @property
    def notional(self) -> float:
        return self.intent.quantity * self.price


class RiskEngine:
    """Pre-trade checks on every intent and the drawdown kill switch; sole owner of the risk state."""

    def __init__(
        self,
        bus: EventBus,
        instruments: InstrumentRegistry,
        portfolio: Portfolio,
        config: RiskConfig | None = None,
    ) -> None:
        self._bus = bus
        self._instruments = instruments
        self._portfolio = portfolio
        self.config = config if config is not None else RiskConfig()
        self._state = RiskState.ACTIVE
        self._peak_equity: float | None = None
        self._drawdown = 0.0
        self._order_times: deque[int] = deque()
        self._in_flight: dict[str, _InFlight] = {}
        self._last_market_ns: dict[str, int] = {}
        self._quotes: dict[str, Quote] = {}
        self._funding_rates: dict[str, float] = {}
        self._feed_states: dict[str, FeedState] = {}
        bus.subscribe(MarketData, self._on_market_data)
        bus.subscribe(Quote, self._on_quote)
        bus.subscribe(MarkPrice, self._on_mark_price)
        bus.subscribe(FeedStatus, self._on_feed_status)
        bus.subscribe(PortfolioSnapshot, self._on_snapshot)
        bus.subscribe(OrderIntent, self._on_intent)
        bus.subscribe(Fill, self._on_fill)
        bus.subscribe(OrderUpdate, self._on_order_update)

    # --- public queries and commands -----------------------------------------------------------

    @property
    def state(self) -> RiskState:
        return self._state

    @property
    def peak_equity(self) -> float | None:
        return self._peak_equity

    @property
    def drawdown(self) -> float:
        """Last evaluated peak-to-current drawdown of marked equity."""
        return self._drawdown

    def reset(self, reason: str = "manual_reset") -> None:
        """Back to ACTIVE with the peak re-based at current equity: a human decision, never automatic."""
        previous = self._state
        self._state = RiskState.ACTIVE
        self._peak_equity = self._portfolio.equity()
        self._drawdown = 0.0
        log.warning("risk_reset", previous=previous.value, peak_equity=self._peak_equity)
        self._publish_state_change(previous, reason)

    # --- market state --------------------------------------------------------------------------

    def _on_market_data(self, event: MarketData) -> None:
        self._last_market_ns[event.instrument] = event.ts_recv

    def _on_quote(self, quote: Quote) -> None:
        self._quotes[quote.instrument] = quote
        self._evaluate_marks()

    def _on_mark_price(self, mark: MarkPrice) -> None:
        self._funding_rates[mark.instrument] = mark.funding_rate
        self._evaluate_marks()

    def _on_feed_status(self, status: FeedStatus) -> None:
        self._feed_states[status.feed] = status.status
        log.info("feed_status", feed=status.feed, status=status.status.value, detail=status.detail)

    def _on_snapshot(self, snapshot: PortfolioSnapshot) -> None:
        if not self._portfolio.missing_marks():
            self._evaluate_drawdown(snapshot.equity)

    def _evaluate_marks(self) -> None:
        if self._portfolio.positions and not self._portfolio.missing_marks():
            self._evaluate_drawdown(self._portfolio.equity())

    # --- kill switch ---------------------------------------------------------------------------

    def _evaluate_drawdown(self, equity: float) -> None:
        if self._peak_equity is None or equity > self._peak_equity:
            self._peak_equity = equity
        peak = self._peak_equity
        if peak > 0:
            self._drawdown = max(0.0, 1.0 - equity / peak)
        else:
            self._drawdown = 0.0 if equity >= peak else 1.0
        if self._drawdown >= self.config.max_drawdown:
            target = RiskState.HALTED
        elif self._drawdown >= self.config.reduce_drawdown:
            target = RiskState.REDUCING
        else:
            return
        if _SEVERITY[target] > _SEVERITY[self._state]:
            previous = self._state
            self._state = target
            log.warning(
                "risk_state_changed",
                previous=previous.value,
                current=target.value,
                drawdown=self._drawdown,
                equity=equity,
                peak_equity=peak,
            )
            self._publish_state_change(previous, "max_drawdown" if target is RiskState.HALTED else "drawdown")

    def _publish_state_change(self, previous: RiskState, reason: str) -> None:
        now = self._bus.clock.now_ns()
        self._bus.publish(
            RiskStateChanged(
                ts_event=now,
                ts_recv=now,
                previous=previous,
                current=self._state,
                reason=reason,
                drawdown=self._drawdown,
            )
        )

    # --- order flow ----------------------------------------------------------------------------

    def _on_intent(self, intent: OrderIntent) -> None:
        rejection = self._check(intent)
        now = self._bus.clock.now_ns()
        context = {
            "instrument": intent.instrument,
            "client_order_id": intent.client_order_id,
            "side": intent.side.value,
            "quantity": intent.quantity,
            "reduce_only": intent.reduce_only,
            "risk_state": self._state.value,
        }
        if rejection is None:
            reason, detail = RiskReason.APPROVED, ""
            self._order_times.append(now)
            self._in_flight[intent.client_order_id] = _InFlight(intent.instrument, _signed(intent))
            log.info("risk_approved", **context)
        else:
            reason, detail = rejection.reason, rejection.detail
            log.warning("risk_rejected", reason=reason.value, detail=detail, **context)
        self._bus.publish(
            RiskDecision(
                ts_event=now,
                ts_recv=now,
                client_order_id=intent.client_order_id,
                instrument=intent.instrument,
                approved=rejection is None,
                reason=reason.value,
                detail=detail,
                risk_state=self._state,
            )
        )
        if rejection is None:
            self._bus.publish(SubmitOrder(ts_event=now, ts_recv=now, intent=intent))

    def _on_fill(self, fill: Fill) -> None:
        order = self._in_flight.get(fill.client_order_id)
        if order is None:
            return
        order.remaining -= fill.signed_quantity
        spec = self._instruments.get(order.instrument)
        lot = spec.lot_size if spec is not None else 1.0
        overfilled = math.copysign(1.0, order.remaining) == math.copysign(1.0, fill.signed_quantity)
        if abs(order.remaining) <= 1e-9 * lot or overfilled:
            del self._in_flight[fill.client_order_id]

    def _on_order_update(self, update: OrderUpdate) -> None:
        if not update.status.is_open:
            self._in_flight.pop(update.client_order_id, None)

    def in_flight_quantity(self, instrument: str) -> float:
        """Signed unfilled quantity of approved orders on ``instrument``."""
        return sum(o.remaining for o in self._in_flight.values() if o.instrument == instrument)

    # --- checks --------------------------------------------------------------------------------

    def _check(self, intent: OrderIntent) -> Rejection | None:
        """First failing check, or None when the intent may go to the venue."""
        spec = self._instruments.get(intent.instrument)
        if spec is None:
            return Rejection(RiskReason.UNKNOWN_INSTRUMENT, f"no spec for {intent.instrument}")
        rejection = _check_precision(intent, spec)
        if rejection is not None:
            return rejection
        mark = self._portfolio.mark(intent.instrument)
        if mark is None or not mark > 0:
            return Rejection(RiskReason.NO_PRICE, "no mark for the instrument")
        signed = _signed(intent)
        position = self._portfolio.position(intent.instrument).quantity
        effective = position + self.in_flight_quantity(intent.instrument)
        reducing = _reduces(position, signed) and _reduces(effective, signed)
        if intent.reduce_only and not reducing:
            return Rejection(
                RiskReason.REDUCE_ONLY, f"position {position}, with orders in flight {effective}"
            )
        if not reducing and self._state is RiskState.HALTED:
            return Rejection(RiskReason.HALTED, f"drawdown {self._drawdown:.4f}")
        if not reducing and self._state is RiskState.REDUCING:
            return Rejection(RiskReason.REDUCING, f"drawdown {self._drawdown:.4f}")
        price = self._expected_price(intent, mark)
        banded = intent.order_type is OrderType.LIMIT or not reducing
        if banded and abs(price / mark - 1.0) > self.config.price_band:
            return Rejection(RiskReason.PRICE_BAND, f"price {price} vs mark {mark}")
        rejection = self._check_rate()
        if rejection is not None:
            return rejection
        if reducing:
            return None  # risk coming off: nothing more to check
        order = _Order(intent, spec, signed, price, mark, position, effective)
        return self._check_market(order) or self._check_order_size(order) or self._check_account(order)

    def _expected_price(self, intent: OrderIntent, mark: float) -> float:
        """Limit price, or the touch a market order would take (the mark when no quote is known)."""
        if intent.order_type is OrderType.LIMIT and intent.limit_price is not None:
            return intent.limit_price
        quote = self._quotes.get(intent.instrument)
        if quote is None:
            return mark
        return quote.ask if intent.side is Side.BUY else quote.bid

    def _check_rate(self) -> Rejection | None:
        now = self._bus.clock.now_ns()
        window_ns = round(self.config.rate_window_s * NANOS_PER_SECOND)
        while self._order_times and self._order_times[0] <= now - window_ns:
            self._order_times.popleft()
        if len(self._order_times) >= self.config.max_orders_per_window:
            return Rejection(
                RiskReason.RATE_LIMIT,
                f"{len(self._order_times)} orders in the last {self.config.rate_window_s} s",
            )
        return None

    def _check_market(self, order: _Order) -> Rejection | None:
        """No new risk on an instrument whose feed is down or whose data is older than ``stale_after_s``."""
        instrument = order.intent.instrument
        venue, _ = split_instrument(instrument)
        for feed in (instrument, venue.value):
            feed_state = self._feed_states.get(feed)
            if feed_state in _BLOCKING_FEED_STATES:
                return Rejection(RiskReason.STALE_DATA, f"feed {feed} is {feed_state}")
        last = self._last_market_ns.get(instrument)
        if last is None:
            return Rejection(RiskReason.STALE_DATA, "no market data received")
        age_s = (self._bus.clock.now_ns() - last) / NANOS_PER_SECOND
        if age_s > self.config.stale_after_s:
            return Rejection(RiskReason.STALE_DATA, f"last market data {age_s:.1f} s old")
        return None

    def _check_order_size(self, order: _Order) -> Rejection | None:
        spec, quantity = order.spec, order.intent.quantity
        if quantity < spec.min_qty or order.notional < spec.min_notional:
            return Rejection(
                RiskReason.MIN_SIZE,
                f"qty {quantity} (min {spec.min_qty}), "
                f"notional {order.notional:.2f} (min {spec.min_notional})",
            )
        if order.notional > self.config.max_order_notional:
            return Rejection(
                RiskReason.ORDER_NOTIONAL, f"{order.notional:.2f} > {self.config.max_order_notional}"
            )
        return None

    def _check_account(self, order: _Order) -> Rejection | None:
        """Balance, position, exposure and margin checks on the account as it would be after the order.

        Resulting quantities count this engine's approved orders still in flight; the equity
        after the order subtracts the estimated fee and the cost of trading away from the mark.
        """
        portfolio = self._portfolio
        missing = portfolio.missing_marks()
        equity = portfolio.equity()
        if missing or not equity > 0:
            return Rejection(RiskReason.NO_EQUITY, f"equity {equity}, unmarked positions {missing}")
        fee = order.notional * self.config.fee_rate
        equity_after = equity + order.signed * (order.mark - order.price) - fee
        if not equity_after > 0:
            return Rejection(RiskReason.NO_EQUITY, f"equity after the order {equity_after}")

        commitment = self._spot_buy_commitment()
        if order.spec.is_perp:
            cash_change = -fee
        elif order.signed < 0:
            sellable = order.position + sum(
                min(o.remaining, 0.0)
                for o in self._in_flight.values()
                if o.instrument == order.intent.instrument
            )
            if order.intent.quantity > sellable:
                return Rejection(
                    RiskReason.INSUFFICIENT_BALANCE,
                    f"selling {order.intent.quantity}, free holding {sellable}",
                )
            cash_change = order.notional - fee
        else:
            cash_change = -(order.notional + fee)
            free_cash = portfolio.cash - commitment
            if free_cash + cash_change < 0:
                return Rejection(
                    RiskReason.INSUFFICIENT_BALANCE,
                    f"cost {order.notional + fee:.2f} > free cash {free_cash:.2f}",
                )

        resulting = order.effective + order.signed
        limit = self.config.position_limit(order.intent.instrument)
        if abs(resulting) * order.mark > limit:
            return Rejection(RiskReason.POSITION_LIMIT, f"|{resulting}|·{order.mark} > {limit}")
        notionals = self._resulting_notionals(order.intent.instrument, resulting)
        if isinstance(notionals, Rejection):
            return notionals
        rejection = self._check_exposure(notionals, equity_after)
        if rejection is not None:
            return rejection
        perp_notionals = {i: n for i, n in notionals.items() if self._instruments[i].is_perp}
        if not perp_notionals:
            return None
        balance = portfolio.margin_balance() - commitment + cash_change
        return self._check_perp_margin(balance, perp_notionals, equity_after)

    def _check_exposure(self, notionals: dict[str, float], equity_after: float) -> Rejection | None:
        config = self.config
        gross = sum(abs(n) for n in notionals.values()) / equity_after
        if gross > config.max_gross_exposure:
            return Rejection(RiskReason.GROSS_EXPOSURE, f"{gross:.4f} > {config.max_gross_exposure}")
        leverage = sum(abs(n) for i, n in notionals.items() if self._instruments[i].is_perp) / equity_after
        if leverage > config.max_leverage:
            return Rejection(RiskReason.LEVERAGE, f"{leverage:.4f} > {config.max_leverage}")
        return None

    def _check_perp_margin(
        self, balance: float, perp_notionals: dict[str, float], equity_after: float
    ) -> Rejection | None:
        """Margin, liquidation distance and funding budget of the resulting perpetual book.

        ``balance`` is the margin balance after the order (cash + Σ perp unrealised PnL, less cash
        reserved by in-flight spot buys): spot holdings are not USDT collateral. The liquidation
        distance is the adverse move x (the same fraction on every perp) at which the balance meets
        the maintenance margin: x = (balance − mmr·gross) / gross.
        """
        config = self.config
        perp_gross = sum(abs(n) for n in perp_notionals.values())
        initial_margin = config.initial_margin_rate * perp_gross
        if initial_margin > balance:
            return Rejection(
                RiskReason.MARGIN, f"initial margin {initial_margin:.2f} > balance {balance:.2f}"
            )
        distance = (balance - config.maintenance_margin_rate * perp_gross) / perp_gross
        if distance < config.min_liquidation_distance:
            return Rejection(
                RiskReason.LIQUIDATION_DISTANCE, f"{distance:.4f} < {config.min_liquidation_distance}"
            )
        funding_cost = 0.0
        for instrument, notional in perp_notionals.items():
            rate = self._funding_rates.get(instrument)
            if rate is None:
                return Rejection(RiskReason.FUNDING_BUDGET, f"no funding rate known for {instrument}")
            funding_cost += notional * rate
        budget = config.max_funding_cost * equity_after
        if funding_cost > budget:
            return Rejection(
                RiskReason.FUNDING_BUDGET, f"funding {funding_cost:.4f} per interval > budget {budget:.4f}"
            )
        return None

    def _resulting_notionals(self, instrument: str, resulting: float) -> dict[str, float] | Rejection:
        """Signed notional at the mark of every instrument after the order and the orders in flight."""
        quantities = {i: p.quantity for i, p in self._portfolio.positions.items()}
        for order in self._in_flight.values():
            quantities[order.instrument] = quantities.get(order.instrument, 0.0) + order.remaining
        quantities[instrument] = resulting
        notionals: dict[str, float] = {}
        for name, quantity in quantities.items():
            if quantity == 0.0:
                continue
            mark = self._portfolio.mark(name)
            if mark is None:
                return Rejection(RiskReason.NO_PRICE, f"no mark for {name}")
            notionals[name] = quantity * mark
        return notionals

    def _spot_buy_commitment(self) -> float:
        """Cash reserved by in-flight spot buys, valued at the mark plus the estimated fee."""
        committed = 0.0
        for order in self._in_flight.values():
            if order.remaining > 0 and not self._instruments[order.instrument].is_perp:
                mark = self._portfolio.mark(order.instrument) or 0.0
                committed += order.remaining * mark * (1.0 + self.config.fee_rate)
        return committed

    # --- persistence ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "state": self._state.value,
            "peak_equity": self._peak_equity,
            "drawdown": self._drawdown,
            "order_times": list(self._order_times),
            "in_flight": {cid: [o.instrument, o.remaining] for cid, o in self._in_flight.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume risk state, peak equity, rate-limit window and in-flight orders of a previous run."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported risk state version {state.get('version')!r}")
        self._state = RiskState(state["state"])
        self._peak_equity = None if state["peak_equity"] is None else float(state["peak_equity"])
        self._drawdown = float(state["drawdown"])
        self._order_times = deque(int(t) for t in state["order_times"])
        self._in_flight = {cid: _InFlight(str(i), float(q)) for cid, (i, q) in state["in_flight"].items()}
        log.info("risk_restored", state=self._state.value, peak_equity=self._peak_equity)


def _signed(intent: OrderIntent) -> float:
    return intent.quantity if intent.side is Side.BUY else -intent.quantity


def _reduces(position: float, signed_qty: float) -> bool:
    """True when the trade moves ``position`` toward zero without crossing it."""
    if position == 0.0 or math.copysign(1.0, position) == math.copysign(1.0, signed_qty):
        return False
    return abs(signed_qty) <= abs(position) * (1.0 + 1e-12)


def _check_precision(intent: OrderIntent, spec: InstrumentSpec) -> Rejection | None:
    """Exchange filters a venue would refuse: lot multiple, tick multiple, a limit price only on limits."""
    if not (math.isfinite(intent.quantity) and intent.quantity > 0):
        return Rejection(RiskReason.PRECISION, f"quantity {intent.quantity} is not positive")
    if spec.round_qty_down(intent.quantity) != intent.quantity:
        return Rejection(
            RiskReason.PRECISION, f"quantity {intent.quantity} not a multiple of {spec.lot_size}"
        )
    if intent.order_type is OrderType.LIMIT:
        if intent.limit_price is None or not spec.is_price_valid(intent.limit_price):
            return Rejection(
                RiskReason.PRECISION, f"limit price {intent.limit_price} not a multiple of {spec.tick_size}"
            )
    elif intent.limit_price is not None:
        return Rejection(RiskReason.PRECISION, "market order with a limit price")
    return None
