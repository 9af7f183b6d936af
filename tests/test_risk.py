"""Risk engine: one test per rejection reason, fail-closed cases, the kill switch and a property test.

Components run on a real EventBus with a SimulatedClock; where orders must fill, a tiny venue stub
fills every approved order at once at the touch, with the fee rate the risk engine estimates.
"""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from structlog.testing import capture_logs

from bot.bus import EventBus
from bot.clock import NANOS_PER_SECOND, SimulatedClock
from bot.events import (
    FeedState,
    FeedStatus,
    Fill,
    FundingPayment,
    MarkPrice,
    OrderIntent,
    OrderStatus,
    OrderType,
    OrderUpdate,
    Quote,
    RiskDecision,
    RiskState,
    RiskStateChanged,
    Side,
    SubmitOrder,
    TargetExposure,
)
from bot.instruments import InstrumentKind, InstrumentRegistry, InstrumentSpec
from bot.orders import OrderManager
from bot.portfolio import Portfolio
from bot.risk import RiskConfig, RiskEngine, RiskReason

T0 = 1_700_000_000 * NANOS_PER_SECOND
BTC = "SYNTH:BTCUSDT"
BTC_PERP = "SYNTH:BTCUSDT-PERP"
DOGE = "SYNTH:DOGEUSDT"
DOGE_PERP = "SYNTH:DOGEUSDT-PERP"
PERPS = (BTC_PERP, DOGE_PERP)
FEE_RATE = 0.001

BASE = RiskConfig(
    max_position_notional=60_000.0,
    max_gross_exposure=2.0,
    max_leverage=1.5,
    max_order_notional=40_000.0,
    price_band=0.01,
    max_orders_per_window=5,
    rate_window_s=10.0,
    stale_after_s=5.0,
    fee_rate=FEE_RATE,
    initial_margin_rate=0.1,
    maintenance_margin_rate=0.005,
    min_liquidation_distance=0.15,
    max_funding_cost=0.0005,
    reduce_drawdown=0.05,
    max_drawdown=0.10,
)


def registry() -> InstrumentRegistry:
    def spec(
        instrument: str, kind: InstrumentKind, tick: float, lot: float, min_notional: float
    ) -> InstrumentSpec:
        base = instrument.split(":")[1][:4].rstrip("U")
        return InstrumentSpec(
            instrument=instrument,
            kind=kind,
            base=base,
            tick_size=tick,
            lot_size=lot,
            min_qty=lot,
            min_notional=min_notional,
        )

    return InstrumentRegistry(
        [
            spec(BTC, InstrumentKind.SPOT, 0.01, 0.0001, 10.0),
            spec(BTC_PERP, InstrumentKind.PERP, 0.1, 0.001, 5.0),
            spec(DOGE, InstrumentKind.SPOT, 0.00001, 1.0, 5.0),
            spec(DOGE_PERP, InstrumentKind.PERP, 0.00001, 1.0, 5.0),
        ]
    )


def with_config(**changes: object) -> RiskConfig:
    return RiskConfig(**{**BASE.model_dump(), **changes})


class Harness:
    """Bus, portfolio, risk engine, maybe the order manager and a venue stub; records what they publish."""

    def __init__(
        self,
        config: RiskConfig = BASE,
        cash: float = 100_000.0,
        with_orders: bool = False,
        with_venue: bool = False,
    ) -> None:
        self.bus = EventBus(SimulatedClock())
        self.instruments = registry()
        self.portfolio = Portfolio(self.bus, self.instruments, cash)
        self.risk = RiskEngine(self.bus, self.instruments, self.portfolio, config)
        self.orders = OrderManager(self.bus, self.instruments, self.portfolio) if with_orders else None
        self.decisions: list[RiskDecision] = []
        self.submitted: list[SubmitOrder] = []
        self.state_changes: list[RiskStateChanged] = []
        self.quotes: dict[str, Quote] = {}
        self.bus.subscribe(RiskDecision, self.decisions.append)
        self.bus.subscribe(SubmitOrder, self.submitted.append)
        self.bus.subscribe(RiskStateChanged, self.state_changes.append)
        self.bus.subscribe(Quote, lambda q: self.quotes.__setitem__(q.instrument, q))
        if with_venue:
            self.bus.subscribe(SubmitOrder, self.fill_at_touch)
        self._ids = itertools.count()

    @property
    def now(self) -> int:
        return self.bus.clock.now_ns()

    def market(
        self,
        ts: int,
        btc: float = 50_000.0,
        doge: float = 0.1,
        funding: float = 0.0001,
        spread: float = 0.0002,
        instruments: tuple[str, ...] = (BTC, BTC_PERP, DOGE, DOGE_PERP),
    ) -> None:
        """Quotes (and perp mark prices) for ``instruments`` at event time ``ts``."""
        for instrument in instruments:
            mid = btc if instrument.startswith("SYNTH:BTC") else doge
            half = 0.5 * spread * mid
            self.bus.feed(
                Quote(
                    ts_event=ts,
                    ts_recv=ts,
                    instrument=instrument,
                    bid=mid - half,
                    bid_size=100.0,
                    ask=mid + half,
                    ask_size=100.0,
                )
            )
            if instrument in PERPS:
                self.bus.feed(
                    MarkPrice(
                        ts_event=ts,
                        ts_recv=ts,
                        instrument=instrument,
                        mark_price=mid,
                        index_price=mid,
                        funding_rate=funding,
                        next_funding_ts=ts + 8 * 3600 * NANOS_PER_SECOND,
                    )
                )

    def intent(
        self,
        instrument: str,
        side: Side,
        quantity: float,
        order_type: OrderType = OrderType.MARKET,
        limit_price: float | None = None,
        reduce_only: bool = False,
    ) -> RiskDecision:
        cid = f"test-{next(self._ids)}"
        self.bus.publish(
            OrderIntent(
                ts_event=self.now,
                ts_recv=self.now,
                client_order_id=cid,
                instrument=instrument,
                side=side,
                quantity=quantity,
                order_type=order_type,
                limit_price=limit_price,
                reduce_only=reduce_only,
            )
        )
        decision = next(d for d in reversed(self.decisions) if d.client_order_id == cid)
        return decision

    def fill(self, instrument: str, side: Side, quantity: float, price: float, cid: str = "setup") -> None:
        self.bus.publish(
            Fill(
                ts_event=self.now,
                ts_recv=self.now,
                client_order_id=cid,
                instrument=instrument,
                side=side,
                quantity=quantity,
                price=price,
                fee=quantity * price * FEE_RATE,
            )
        )

    def fill_at_touch(self, command: SubmitOrder) -> None:
        intent = command.intent
        quote = self.quotes[intent.instrument]
        price = quote.ask if intent.side is Side.BUY else quote.bid
        self.fill(intent.instrument, intent.side, intent.quantity, price, cid=intent.client_order_id)
        self.bus.publish(
            OrderUpdate(
                ts_event=self.now,
                ts_recv=self.now,
                client_order_id=intent.client_order_id,
                instrument=intent.instrument,
                status=OrderStatus.FILLED,
                filled_qty=intent.quantity,
                avg_price=price,
            )
        )


def rejected(decision: RiskDecision, reason: RiskReason) -> bool:
    return not decision.approved and decision.reason == reason.value


@pytest.fixture
def h() -> Harness:
    harness = Harness()
    harness.market(T0)
    return harness


def test_approved_intent_becomes_a_submit_order(h: Harness) -> None:
    decision = h.intent(BTC, Side.BUY, 0.1)
    assert decision.approved and decision.reason == RiskReason.APPROVED.value
    assert decision.risk_state is RiskState.ACTIVE
    (submit,) = h.submitted
    assert submit.intent.client_order_id == decision.client_order_id
    assert submit.intent.quantity == 0.1


def test_rejected_intent_is_not_submitted(h: Harness) -> None:
    assert rejected(h.intent("SYNTH:ETHUSDT", Side.BUY, 1.0), RiskReason.UNKNOWN_INSTRUMENT)
    assert h.submitted == []


@pytest.mark.parametrize(
    ("quantity", "order_type", "limit_price"),
    [
        (0.00015, OrderType.MARKET, None),  # not a lot multiple
        (0.0, OrderType.MARKET, None),
        (float("nan"), OrderType.MARKET, None),
        (0.1, OrderType.LIMIT, 50_000.005),  # not a tick multiple
        (0.1, OrderType.LIMIT, None),
        (0.1, OrderType.MARKET, 50_000.0),
    ],
)
def test_precision(h: Harness, quantity: float, order_type: OrderType, limit_price: float | None) -> None:
    assert rejected(h.intent(BTC, Side.BUY, quantity, order_type, limit_price), RiskReason.PRECISION)


def test_precision_passes_on_lot_and_tick(h: Harness) -> None:
    assert h.intent(BTC, Side.BUY, 0.1234, OrderType.LIMIT, 50_000.01).approved


def test_no_price_fails_closed() -> None:
    h = Harness()
    h.market(T0, instruments=(BTC, BTC_PERP))
    assert rejected(h.intent(DOGE, Side.BUY, 100.0), RiskReason.NO_PRICE)


def test_reduce_only_must_reduce(h: Harness) -> None:
    assert rejected(h.intent(BTC_PERP, Side.SELL, 0.1, reduce_only=True), RiskReason.REDUCE_ONLY)
    h.fill(BTC_PERP, Side.BUY, 0.1, 50_000.0)
    assert rejected(h.intent(BTC_PERP, Side.SELL, 0.2, reduce_only=True), RiskReason.REDUCE_ONLY)  # a flip
    assert rejected(h.intent(BTC_PERP, Side.BUY, 0.1, reduce_only=True), RiskReason.REDUCE_ONLY)
    assert h.intent(BTC_PERP, Side.SELL, 0.1, reduce_only=True).approved
    # The approved sell is in flight: a second one would go short if both filled.
    assert rejected(h.intent(BTC_PERP, Side.SELL, 0.1, reduce_only=True), RiskReason.REDUCE_ONLY)


def test_price_band_on_limit_price_and_on_the_touch(h: Harness) -> None:
    assert rejected(h.intent(BTC, Side.BUY, 0.1, OrderType.LIMIT, 50_600.0), RiskReason.PRICE_BAND)
    assert rejected(h.intent(BTC, Side.SELL, 0.1, OrderType.LIMIT, 49_400.0), RiskReason.PRICE_BAND)
    assert h.intent(BTC, Side.BUY, 0.1, OrderType.LIMIT, 50_400.0).approved
    h.market(T0 + 1, spread=0.03, instruments=(BTC,))  # the ask is 1.5 % above the mid
    assert rejected(h.intent(BTC, Side.BUY, 0.1), RiskReason.PRICE_BAND)


def test_rate_limit_over_a_rolling_window_of_event_time(h: Harness) -> None:
    for _ in range(5):
        assert h.intent(DOGE, Side.BUY, 100.0).approved
    assert rejected(h.intent(DOGE, Side.BUY, 100.0), RiskReason.RATE_LIMIT)
    h.market(T0 + 9 * NANOS_PER_SECOND)
    assert rejected(h.intent(DOGE, Side.BUY, 100.0), RiskReason.RATE_LIMIT)
    h.market(T0 + 10 * NANOS_PER_SECOND)  # the first five leave the window
    assert h.intent(DOGE, Side.BUY, 100.0).approved


def test_stale_feed_status_blocks_new_risk_until_recovered(h: Harness) -> None:
    h.fill(BTC_PERP, Side.BUY, 0.1, 50_000.0)
    h.bus.feed(FeedStatus(ts_event=h.now, ts_recv=h.now, feed=BTC_PERP, status=FeedState.STALE))
    assert rejected(h.intent(BTC_PERP, Side.BUY, 0.1), RiskReason.STALE_DATA)
    assert h.intent(BTC, Side.BUY, 0.1).approved  # another instrument's feed is fine
    assert h.intent(BTC_PERP, Side.SELL, 0.05).approved  # reducing still passes
    h.bus.feed(FeedStatus(ts_event=h.now, ts_recv=h.now, feed=BTC_PERP, status=FeedState.RECOVERED))
    assert h.intent(BTC_PERP, Side.BUY, 0.1).approved
    h.bus.feed(FeedStatus(ts_event=h.now, ts_recv=h.now, feed="SYNTH", status=FeedState.DISCONNECTED))
    assert rejected(h.intent(DOGE, Side.BUY, 100.0), RiskReason.STALE_DATA)  # the whole venue is down


def test_old_market_data_is_stale(h: Harness) -> None:
    h.market(T0 + 6 * NANOS_PER_SECOND, instruments=(DOGE,))  # time moves, BTC perp is silent
    assert rejected(h.intent(BTC_PERP, Side.BUY, 0.1), RiskReason.STALE_DATA)
    assert h.intent(DOGE, Side.BUY, 100.0).approved


def test_min_size(h: Harness) -> None:
    assert rejected(h.intent(BTC, Side.BUY, 0.0001), RiskReason.MIN_SIZE)  # 5 USDT < 10
    assert h.intent(BTC, Side.BUY, 0.0003).approved


def test_order_notional(h: Harness) -> None:
    assert rejected(h.intent(BTC_PERP, Side.BUY, 0.9), RiskReason.ORDER_NOTIONAL)  # 45 000 > 40 000
    assert h.intent(BTC_PERP, Side.BUY, 0.7).approved


def test_no_equity_fails_closed() -> None:
    h = Harness(cash=0.0)
    h.market(T0)
    assert rejected(h.intent(BTC_PERP, Side.BUY, 0.01), RiskReason.NO_EQUITY)


def test_unmarked_positions_after_restart_fail_closed(h: Harness) -> None:
    h.fill(DOGE_PERP, Side.BUY, 1000.0, 0.1)
    restarted = Harness()
    restarted.portfolio.load_state_dict(h.portfolio.state_dict())
    restarted.market(T0, instruments=(BTC, BTC_PERP))  # DOGE perp not quoted yet
    assert rejected(restarted.intent(BTC_PERP, Side.BUY, 0.01), RiskReason.NO_EQUITY)
    assert rejected(restarted.intent(DOGE_PERP, Side.SELL, 1000.0), RiskReason.NO_PRICE)


def test_insufficient_spot_balance() -> None:
    h = Harness(cash=10_000.0)
    h.market(T0)
    assert rejected(h.intent(BTC, Side.SELL, 0.01), RiskReason.INSUFFICIENT_BALANCE)  # holding nothing
    assert rejected(h.intent(BTC, Side.BUY, 0.2), RiskReason.INSUFFICIENT_BALANCE)  # 10 000 + fee > cash
    assert h.intent(BTC, Side.BUY, 0.19).approved
    # The approved buy is in flight: its cost is reserved, ~490 USDT stay free.
    assert rejected(h.intent(DOGE, Side.BUY, 5000.0), RiskReason.INSUFFICIENT_BALANCE)
    assert h.intent(DOGE, Side.BUY, 4000.0).approved


def test_spot_sells_in_flight_are_not_sold_twice(h: Harness) -> None:
    h.fill(BTC, Side.BUY, 0.2, 50_000.0)
    assert h.intent(BTC, Side.SELL, 0.15).approved
    assert rejected(h.intent(BTC, Side.SELL, 0.1), RiskReason.INSUFFICIENT_BALANCE)


def test_position_limit_counts_the_position_and_orders_in_flight() -> None:
    h = Harness(with_config(position_notional_limits={BTC_PERP: 10_000.0}))
    h.market(T0)
    assert rejected(h.intent(BTC_PERP, Side.BUY, 0.3), RiskReason.POSITION_LIMIT)
    first = h.intent(BTC_PERP, Side.BUY, 0.15)
    assert first.approved
    assert rejected(h.intent(BTC_PERP, Side.BUY, 0.1), RiskReason.POSITION_LIMIT)  # 0.15 in flight
    h.bus.publish(
        OrderUpdate(
            ts_event=h.now,
            ts_recv=h.now,
            client_order_id=first.client_order_id,
            instrument=BTC_PERP,
            status=OrderStatus.CANCELLED,
        )
    )
    assert h.intent(BTC_PERP, Side.BUY, 0.1).approved
    h.fill(BTC_PERP, Side.SELL, 0.19, 50_000.0)  # a short of 0.19 once the 0.1 is counted
    assert rejected(h.intent(BTC_PERP, Side.SELL, 0.12), RiskReason.POSITION_LIMIT)
    assert h.intent(BTC, Side.BUY, 0.3).approved  # the default limit applies elsewhere


def test_gross_exposure() -> None:
    h = Harness(with_config(max_gross_exposure=0.3))
    h.market(T0)
    h.fill(BTC_PERP, Side.SELL, 0.2, 50_000.0)  # 10 000 short counts in gross
    assert rejected(h.intent(BTC, Side.BUY, 0.5), RiskReason.GROSS_EXPOSURE)
    assert h.intent(BTC, Side.BUY, 0.3).approved


def test_leverage_counts_perpetuals_only() -> None:
    h = Harness(with_config(max_leverage=0.2))
    h.market(T0)
    assert rejected(h.intent(BTC_PERP, Side.BUY, 0.5), RiskReason.LEVERAGE)
    assert h.intent(BTC, Side.BUY, 0.5).approved
    assert h.intent(BTC_PERP, Side.SELL, 0.3).approved


def spot_heavy(config: RiskConfig) -> Harness:
    """An account with 90 % of its cash in spot BTC: little USDT left to margin perpetuals."""
    h = Harness(config)
    h.market(T0)
    h.fill(BTC, Side.BUY, 1.8, 50_000.0)
    return h


def test_margin() -> None:
    h = spot_heavy(with_config(initial_margin_rate=0.9, min_liquidation_distance=0.0))
    assert rejected(h.intent(BTC_PERP, Side.BUY, 0.3), RiskReason.MARGIN)  # 13 500 > ~9 900
    assert h.intent(BTC_PERP, Side.BUY, 0.2).approved


def test_liquidation_distance() -> None:
    h = spot_heavy(with_config(min_liquidation_distance=0.8))
    decision = h.intent(BTC_PERP, Side.BUY, 0.3)  # (9 910 − 15 − 75) / 15 000 ≈ 0.65 < 0.8
    assert rejected(decision, RiskReason.LIQUIDATION_DISTANCE)
    assert h.intent(BTC_PERP, Side.BUY, 0.2).approved  # ≈ 0.98


def test_funding_budget(h: Harness) -> None:
    h.market(T0 + 1, funding=0.01)  # 1 % per interval: longs pay
    assert rejected(h.intent(BTC_PERP, Side.BUY, 0.3), RiskReason.FUNDING_BUDGET)  # 150 > 50
    assert h.intent(BTC_PERP, Side.SELL, 0.3).approved  # shorts receive
    assert h.intent(BTC_PERP, Side.BUY, 0.08).approved  # the book nets to 0.22 short


def test_unknown_funding_rate_fails_closed() -> None:
    h = Harness()
    h.bus.feed(
        Quote(ts_event=T0, ts_recv=T0, instrument=DOGE_PERP, bid=0.1, bid_size=1e6, ask=0.1, ask_size=1e6)
    )
    decision = h.intent(DOGE_PERP, Side.BUY, 1000.0)  # quoted, but no mark price yet
    assert rejected(decision, RiskReason.FUNDING_BUDGET)
    assert "funding rate" in decision.detail


def long_book() -> Harness:
    """1 BTC perp long at 50 000 on 100 000 of equity: each 1 000 down is 1 % of drawdown."""
    h = Harness()
    h.market(T0)
    h.fill(BTC_PERP, Side.BUY, 1.0, 50_000.0)
    return h


def test_drawdown_moves_active_reducing_halted_and_never_back() -> None:
    h = long_book()
    h.market(T0 + 1, btc=47_000.0)
    assert h.risk.state is RiskState.ACTIVE
    h.market(T0 + 2, btc=44_900.0)
    assert h.risk.state is RiskState.REDUCING
    assert rejected(h.intent(BTC_PERP, Side.BUY, 0.1), RiskReason.REDUCING)
    assert rejected(h.intent(DOGE, Side.BUY, 1000.0), RiskReason.REDUCING)
    assert h.intent(BTC_PERP, Side.SELL, 0.1).approved

    h.market(T0 + 3, btc=39_800.0)
    assert h.risk.state is RiskState.HALTED
    assert rejected(h.intent(BTC_PERP, Side.BUY, 0.1), RiskReason.HALTED)
    assert rejected(h.intent(BTC_PERP, Side.SELL, 2.0), RiskReason.HALTED)  # a flip adds risk
    assert h.intent(BTC_PERP, Side.SELL, 0.2).approved  # reducing passes even when halted

    h.market(T0 + 4, btc=60_000.0)
    assert h.risk.state is RiskState.HALTED  # never relaxes on its own
    assert [(c.previous, c.current) for c in h.state_changes] == [
        (RiskState.ACTIVE, RiskState.REDUCING),
        (RiskState.REDUCING, RiskState.HALTED),
    ]
    assert h.state_changes[-1].drawdown >= 0.10

    h.risk.reset()
    assert h.risk.state is RiskState.ACTIVE
    assert h.state_changes[-1].current is RiskState.ACTIVE
    assert h.state_changes[-1].reason == "manual_reset"
    assert h.risk.peak_equity == pytest.approx(h.portfolio.equity())


def test_drawdown_is_also_evaluated_on_snapshots(h: Harness) -> None:
    h.portfolio.snapshot()
    h.bus.publish(
        FundingPayment(
            ts_event=h.now,
            ts_recv=h.now,
            instrument=BTC_PERP,
            funding_rate=0.01,
            mark_price=50_000.0,
            position_qty=0.0,
            amount=-11_000.0,
        )
    )
    assert h.risk.state is RiskState.ACTIVE  # flat: quotes do not move equity, nothing evaluated yet
    h.portfolio.snapshot()
    assert h.risk.state is RiskState.HALTED
    assert [c.current for c in h.state_changes] == [RiskState.HALTED]


def test_kill_switch_flattens_through_the_order_manager() -> None:
    h = Harness(with_orders=True, with_venue=True)
    h.market(T0)
    for instrument, target in ((BTC_PERP, 0.35), (BTC, 0.3)):
        h.bus.publish(
            TargetExposure(ts_event=T0, ts_recv=T0, instrument=instrument, target=target, policy="t")
        )
    assert h.portfolio.position(BTC_PERP).quantity == 0.7
    assert h.portfolio.position(BTC).quantity == pytest.approx(0.6, rel=1e-3)  # equity is net of costs

    for step, price in enumerate((48_000.0, 46_000.0, 44_000.0, 42_000.0, 41_000.0), start=1):
        h.market(T0 + step * NANOS_PER_SECOND, btc=price)
    assert [c.current for c in h.state_changes] == [RiskState.REDUCING, RiskState.HALTED]
    assert h.portfolio.positions == {}
    assert h.orders is not None and h.orders.open_orders() == []
    flatten = [s.intent for s in h.submitted if s.intent.reduce_only]
    assert {i.instrument for i in flatten} == {BTC_PERP, BTC}
    assert abs(h.portfolio.reconcile()) <= 1e-9

    submitted_before = len(h.submitted)
    ts = h.now
    h.bus.publish(TargetExposure(ts_event=ts, ts_recv=ts, instrument=BTC_PERP, target=0.5, policy="t"))
    assert len(h.submitted) == submitted_before  # halted: targets mean flat, and flat is done
    assert rejected(h.intent(BTC_PERP, Side.BUY, 0.1), RiskReason.HALTED)


def test_state_round_trip_keeps_state_peak_window_and_orders_in_flight() -> None:
    h = long_book()
    for _ in range(3):
        assert h.intent(DOGE, Side.BUY, 100.0).approved
    h.market(T0 + 1, btc=39_000.0)
    assert h.risk.state is RiskState.HALTED
    state = json.loads(json.dumps(h.risk.state_dict()))

    restarted = Harness()
    restarted.portfolio.load_state_dict(h.portfolio.state_dict())
    restarted.risk.load_state_dict(state)
    restarted.market(T0 + 2, btc=39_000.0)
    assert restarted.risk.state is RiskState.HALTED
    assert restarted.risk.peak_equity == h.risk.peak_equity
    assert restarted.risk.in_flight_quantity(DOGE) == 300.0
    for _ in range(2):
        assert restarted.intent(BTC_PERP, Side.SELL, 0.1).approved
    assert rejected(restarted.intent(BTC_PERP, Side.SELL, 0.1), RiskReason.RATE_LIMIT)  # 3 + 2 in window


def test_config_validation() -> None:
    with pytest.raises(ValidationError):
        RiskConfig(reduce_drawdown=0.2, max_drawdown=0.1)
    with pytest.raises(ValidationError):
        RiskConfig(initial_margin_rate=0.01, maintenance_margin_rate=0.02)
    with pytest.raises(ValidationError):
        RiskConfig(position_notional_limits={BTC: -1.0})
    with pytest.raises(ValidationError):
        RiskConfig(position_notional_limits={"BTCUSDT": 1.0})
    with pytest.raises(ValidationError):
        RiskConfig(unknown=1)


# --- property test: random policy outputs never breach a limit -----------------------------------

# Two books of limits so that between them every account-level limit binds often.
LEVERAGE_BOUND = RiskConfig(
    max_position_notional=60_000.0,
    position_notional_limits={BTC_PERP: 40_000.0},
    max_gross_exposure=0.9,
    max_leverage=0.5,
    max_order_notional=100_000.0,
    price_band=0.01,
    max_orders_per_window=1_000,
    fee_rate=FEE_RATE,
    min_liquidation_distance=0.6,
    max_funding_cost=0.0005,
    reduce_drawdown=0.015,
    max_drawdown=0.03,
)
GROSS_AND_CASH_BOUND = LEVERAGE_BOUND.model_copy(
    update={
        "max_position_notional": 80_000.0,
        "position_notional_limits": {},
        "max_gross_exposure": 0.7,
        "max_leverage": 2.0,
        "min_liquidation_distance": 0.2,
    }
)
SEVERITY = {RiskState.ACTIVE: 0, RiskState.REDUCING: 1, RiskState.HALTED: 2}

targets = st.one_of(
    st.sampled_from([-1.0, 0.0, 1.0]),
    st.floats(min_value=-1.0, max_value=1.0),
    st.floats(min_value=-0.4, max_value=0.4),  # the range where limits start to bind
)
step_strategy = st.tuples(
    st.floats(min_value=-0.04, max_value=0.04),  # BTC return
    st.floats(min_value=-0.04, max_value=0.04),  # DOGE return
    st.floats(min_value=-0.002, max_value=0.002),  # funding rate
    st.tuples(targets, targets, targets, targets),
)


class LimitWatcher:
    """Checks the account against every limit right after each fill that added risk.

    Breaches are collected, not raised: the bus would catch an exception in a handler.
    """

    def __init__(self, h: Harness, config: RiskConfig) -> None:
        self.h = h
        self.config = config
        self.reducing: dict[str, bool] = {}
        self.checked_fills = 0
        self.breaches: list[str] = []
        h.bus.subscribe(SubmitOrder, self.on_submit)  # before the venue stub fills it
        h.bus.subscribe(Fill, self.on_fill)  # after the portfolio applied it

    def on_submit(self, command: SubmitOrder) -> None:
        intent = command.intent
        position = self.h.portfolio.position(intent.instrument).quantity
        signed = intent.quantity if intent.side is Side.BUY else -intent.quantity
        reduces = position * signed < 0 and abs(signed) <= abs(position)
        self.reducing[intent.client_order_id] = reduces
        if self.h.risk.state is not RiskState.ACTIVE and not reduces:
            self.breaches.append(f"{self.h.risk.state} approved an order adding risk: {intent}")

    def on_fill(self, fill: Fill) -> None:
        portfolio = self.h.portfolio
        for instrument, position in portfolio.positions.items():
            if not self.h.instruments[instrument].is_perp and position.quantity < 0:
                self.breaches.append(f"short spot {instrument}: {position.quantity}")
        if self.reducing[fill.client_order_id]:
            return
        self.checked_fills += 1
        tolerance = 1 + 1e-9
        equity = portfolio.equity()
        # Only the traded instrument: a price move may carry another position past its limit.
        notional = abs(portfolio.notional(fill.instrument))
        if notional > self.config.position_limit(fill.instrument) * tolerance:
            self.breaches.append(f"position limit: {fill.instrument} at {notional}")
        gross = portfolio.gross_exposure()
        if gross > self.config.max_gross_exposure * tolerance:
            self.breaches.append(f"gross exposure {gross}")
        perp_gross = sum(abs(portfolio.notional(i)) for i in portfolio.positions if i in PERPS)
        if perp_gross / equity > self.config.max_leverage * tolerance:
            self.breaches.append(f"leverage {perp_gross / equity}")
        if self.config.initial_margin_rate * perp_gross > portfolio.margin_balance() * tolerance:
            self.breaches.append(f"margin: {perp_gross} of perps on {portfolio.margin_balance()}")
        spot_buy = fill.side is Side.BUY and fill.instrument not in PERPS
        if spot_buy and portfolio.cash < -1e-9 * equity:
            self.breaches.append(f"spot bought on credit: cash {portfolio.cash}")


@pytest.mark.parametrize("config", [LEVERAGE_BOUND, GROSS_AND_CASH_BOUND], ids=["leverage", "gross_cash"])
@settings(max_examples=40, deadline=None)
@given(steps=st.lists(step_strategy, min_size=1, max_size=20))
def test_random_policy_outputs_never_breach_the_limits(
    config: RiskConfig,
    steps: list[tuple[float, float, float, tuple[float, float, float, float]]],
) -> None:
    with capture_logs():  # thousands of log lines per run: keep them in memory, unrendered
        h = Harness(config, with_orders=True, with_venue=True)
        watcher = LimitWatcher(h, config)
        btc, doge = 50_000.0, 0.1
        h.market(T0, btc=btc, doge=doge)
        severity = 0
        for step, (btc_return, doge_return, funding, wishes) in enumerate(steps, start=1):
            ts = T0 + step * NANOS_PER_SECOND
            btc, doge = btc * (1 + btc_return), doge * (1 + doge_return)
            h.market(ts, btc=btc, doge=doge, funding=funding)
            for instrument, wish in zip((BTC, BTC_PERP, DOGE, DOGE_PERP), wishes, strict=True):
                h.bus.publish(
                    TargetExposure(ts_event=ts, ts_recv=ts, instrument=instrument, target=wish, policy="p")
                )
            assert watcher.breaches == []
            assert SEVERITY[h.risk.state] >= severity  # the risk state never relaxes on its own
            severity = SEVERITY[h.risk.state]
            if h.risk.state is RiskState.HALTED:
                assert h.portfolio.positions == {}  # the order manager flattened everything
    assert abs(h.portfolio.reconcile()) <= 1e-9
    assert h.bus.stats.handler_errors == 0
    assert watcher.checked_fills == sum(not r for r in watcher.reducing.values())
