"""Order manager: target sizing, ids, idempotence, lifecycle, halt flattening and persistence."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from bot.bus import EventBus
from bot.clock import NANOS_PER_SECOND, SimulatedClock
from bot.events import (
    CancelOrder,
    Event,
    Fill,
    OrderIntent,
    OrderStatus,
    OrderType,
    OrderUpdate,
    Quote,
    RiskDecision,
    RiskState,
    RiskStateChanged,
    Side,
    TargetExposure,
)
from bot.instruments import InstrumentKind, InstrumentRegistry, InstrumentSpec
from bot.orders import CLIENT_ORDER_ID_PATTERN, OrderManager, OrderManagerConfig, client_order_id
from bot.portfolio import Portfolio

T0 = 1_700_000_000 * NANOS_PER_SECOND
BTC = "SYNTH:BTCUSDT"
BTC_PERP = "SYNTH:BTCUSDT-PERP"
DOGE = "SYNTH:DOGEUSDT"


def registry() -> InstrumentRegistry:
    return InstrumentRegistry(
        [
            InstrumentSpec(
                instrument=BTC,
                kind=InstrumentKind.SPOT,
                base="BTC",
                tick_size=0.01,
                lot_size=0.0001,
                min_qty=0.0001,
                min_notional=10.0,
            ),
            InstrumentSpec(
                instrument=BTC_PERP,
                kind=InstrumentKind.PERP,
                base="BTC",
                tick_size=0.1,
                lot_size=0.001,
                min_qty=0.001,
                min_notional=5.0,
            ),
            InstrumentSpec(
                instrument=DOGE,
                kind=InstrumentKind.SPOT,
                base="DOGE",
                tick_size=0.00001,
                lot_size=1.0,
                min_qty=1.0,
            ),
        ]
    )


class Harness:
    """Bus, portfolio and order manager, with every intent and cancel the manager publishes."""

    def __init__(self, config: OrderManagerConfig | None = None, cash: float = 100_000.0) -> None:
        self.bus = EventBus(SimulatedClock())
        self.instruments = registry()
        self.portfolio = Portfolio(self.bus, self.instruments, cash)
        self.orders = OrderManager(self.bus, self.instruments, self.portfolio, config)
        self.intents: list[OrderIntent] = []
        self.cancels: list[CancelOrder] = []
        self.bus.subscribe(OrderIntent, self.intents.append)
        self.bus.subscribe(CancelOrder, self.cancels.append)
        self.quote(BTC, 50_000.0, ts=T0)
        self.quote(BTC_PERP, 50_000.0)
        self.quote(DOGE, 0.1)

    @property
    def now(self) -> int:
        return self.bus.clock.now_ns()

    def quote(self, instrument: str, mid: float, ts: int | None = None) -> None:
        ts = self.now if ts is None else ts
        self.bus.feed(
            Quote(
                ts_event=ts,
                ts_recv=ts,
                instrument=instrument,
                bid=mid * 0.9999,
                bid_size=10.0,
                ask=mid * 1.0001,
                ask_size=10.0,
            )
        )

    def target(self, instrument: str, target: float, ts: int | None = None) -> None:
        ts = self.now if ts is None else ts
        self.bus.publish(
            TargetExposure(ts_event=ts, ts_recv=ts, instrument=instrument, target=target, policy="t")
        )

    def publish(self, event_type: type[Event], **fields: object) -> None:
        self.bus.publish(event_type(ts_event=self.now, ts_recv=self.now, **fields))

    def fill(self, cid: str, instrument: str, side: Side, quantity: float, price: float) -> None:
        self.publish(
            Fill,
            client_order_id=cid,
            instrument=instrument,
            side=side,
            quantity=quantity,
            price=price,
            fee=0.0,
        )

    def update(self, cid: str, instrument: str, status: OrderStatus) -> None:
        self.publish(OrderUpdate, client_order_id=cid, instrument=instrument, status=status)


def test_target_is_sized_from_equity_and_mark_and_rounded_down_to_the_lot() -> None:
    h = Harness()
    h.target(BTC_PERP, 0.33337)  # 0.33337 · 100000 / 50000 = 0.66674 → 0.666
    (intent,) = h.intents
    assert intent.side is Side.BUY
    assert intent.quantity == 0.666
    assert intent.order_type is OrderType.MARKET
    assert intent.limit_price is None
    assert not intent.reduce_only
    assert intent.ts_event == h.now

    # The opposite wish while the buy is still working: cancel it rather than trade against it.
    h.target(BTC_PERP, -0.5, ts=h.now + 1)
    assert len(h.intents) == 1
    assert [c.client_order_id for c in h.cancels] == [intent.client_order_id]
    h.target(BTC_PERP, -0.5, ts=h.now + 2)  # the cancel is asked for once
    assert len(h.cancels) == 1
    h.update(intent.client_order_id, BTC_PERP, OrderStatus.CANCELLED)
    h.target(BTC_PERP, -0.5, ts=h.now + 3)
    assert h.intents[-1].side is Side.SELL
    assert h.intents[-1].quantity == 1.0


def test_target_accounts_for_the_position() -> None:
    h = Harness()
    h.fill("external", BTC_PERP, Side.BUY, 0.4, 50_000.0)
    h.target(BTC_PERP, 0.5)  # target 1.0, holding 0.4
    assert h.intents[-1].side is Side.BUY
    assert h.intents[-1].quantity == 0.6


def test_spot_short_target_is_clipped_to_zero() -> None:
    h = Harness()
    h.target(BTC, -0.7)
    assert h.intents == []  # flat spot cannot be sold short
    h.fill("external", BTC, Side.BUY, 0.2, 50_000.0)
    h.target(BTC, -0.7, ts=h.now + 1)
    (intent,) = h.intents
    assert intent.side is Side.SELL
    assert intent.quantity == 0.2  # sells what is held and no more


def test_targets_are_clamped_to_unit_range() -> None:
    h = Harness()
    h.target(BTC_PERP, 3.0)
    assert h.intents[-1].quantity == 2.0  # as for target 1.0: equity / mark


def test_small_adjustments_and_minimums_are_skipped() -> None:
    h = Harness(OrderManagerConfig(rebalance_threshold=0.02))
    h.target(BTC_PERP, 0.019)  # 1.9 % of equity: below the threshold
    assert h.intents == []
    h.target(BTC_PERP, 0.021, ts=h.now + 1)
    assert h.intents[-1].quantity == pytest.approx(0.042)

    no_threshold = Harness(OrderManagerConfig(rebalance_threshold=0.0))
    no_threshold.target(BTC, 0.00008)  # 8 USDT: below the spot min notional of 10
    assert no_threshold.intents == []
    no_threshold.target(BTC, 0.00012, ts=no_threshold.now + 1)  # 12 USDT → 0.0002 BTC after rounding
    assert no_threshold.intents[-1].quantity == 0.0002


def test_no_mark_or_unknown_instrument_sends_nothing() -> None:
    h = Harness()
    h.target("SYNTH:DOGEUSDT-PERP", 0.5)  # known id shape, but not in the registry
    h.target("SYNTH:ETHUSDT", 0.5)
    h.instruments.add(
        InstrumentSpec(
            instrument="SYNTH:ETHUSDT", kind=InstrumentKind.SPOT, base="ETH", tick_size=0.01, lot_size=0.001
        )
    )
    h.target("SYNTH:ETHUSDT", 0.5, ts=h.now + 1)  # known now, but never quoted
    h.target(BTC_PERP, float("nan"))
    assert h.intents == []


def test_limit_orders_are_priced_through_the_mark_on_the_tick() -> None:
    h = Harness(OrderManagerConfig(order_type=OrderType.LIMIT, limit_offset_bps=10.0))
    h.target(BTC_PERP, 0.5)
    intent = h.intents[-1]
    assert intent.order_type is OrderType.LIMIT
    assert intent.limit_price == 50_050.0
    h.fill(intent.client_order_id, BTC_PERP, Side.BUY, 1.0, 50_000.0)
    h.target(BTC_PERP, -0.5, ts=h.now + 1)
    assert h.intents[-1].quantity == 2.0
    assert h.intents[-1].limit_price == 49_950.0


def test_client_order_ids_are_deterministic_unique_and_venue_safe() -> None:
    def run() -> list[str]:
        h = Harness()
        for step in range(3):
            ts = T0 + step * NANOS_PER_SECOND
            h.quote(BTC_PERP, 50_000.0 + 1_000 * step, ts=ts)
            h.target(BTC_PERP, [0.3, -0.2, 0.4][step], ts=ts)
            h.target(BTC, [0.2, 0.5, 0.1][step], ts=ts)
            h.target(DOGE, [0.1, 0.0, 0.3][step], ts=ts)
        return [i.client_order_id for i in h.intents] + [c.client_order_id for c in h.cancels]

    first, second = run(), run()
    assert first == second
    assert len(first) == 10  # 6 orders, and 4 cancels of working orders a later target opposed
    assert len(set(first[:6])) == 6
    for cid in first:
        assert CLIENT_ORDER_ID_PATTERN.match(cid)
        assert len(cid) <= 36
        assert cid.startswith("vb-")
    assert client_order_id("abcdefgh", 2**63 - 1, BTC_PERP, 4095) == client_order_id(
        "abcdefgh", 2**63 - 1, BTC_PERP, 4095
    )
    assert len(client_order_id("abcdefgh", 2**63 - 1, BTC_PERP, 4095)) <= 36


def test_resent_target_with_same_time_does_not_send_a_second_order() -> None:
    h = Harness()
    ts = h.now
    h.target(BTC_PERP, 0.5, ts=ts)
    h.target(BTC_PERP, 0.5, ts=ts)
    h.target(BTC_PERP, 0.9, ts=ts)  # same decision, same instrument: a resend, whatever it says
    assert len(h.intents) == 1
    h.target(BTC_PERP, -0.5, ts=ts - 1)  # older than the latest decision: stale
    assert len(h.intents) == 1
    h.target(BTC, 0.5, ts=ts)  # another instrument of the same decision is new
    assert len(h.intents) == 2


def test_lifecycle_new_accepted_partial_filled() -> None:
    h = Harness()
    h.target(BTC_PERP, 0.5)
    cid = h.intents[-1].client_order_id
    assert h.orders.order(cid).status is OrderStatus.NEW
    h.publish(RiskDecision, client_order_id=cid, instrument=BTC_PERP, approved=True, reason="APPROVED")
    assert h.orders.order(cid).status is OrderStatus.NEW
    h.update(cid, BTC_PERP, OrderStatus.ACCEPTED)
    assert h.orders.order(cid).status is OrderStatus.ACCEPTED

    h.fill(cid, BTC_PERP, Side.BUY, 0.4, 50_000.0)
    order = h.orders.order(cid)
    assert order.status is OrderStatus.PARTIALLY_FILLED
    assert order.filled_qty == 0.4
    assert h.orders.pending_quantity(BTC_PERP) == pytest.approx(0.6)

    h.fill(cid, BTC_PERP, Side.BUY, 0.6, 51_000.0)
    order = h.orders.order(cid)
    assert order.status is OrderStatus.FILLED
    assert order.avg_fill_price == pytest.approx(50_600.0)
    assert h.orders.open_orders() == []

    h.update(cid, BTC_PERP, OrderStatus.ACCEPTED)  # illegal after FILLED: ignored
    h.update(cid, BTC_PERP, OrderStatus.FILLED)  # the venue's own FILLED: a repeat
    assert h.orders.order(cid).status is OrderStatus.FILLED


def test_lifecycle_rejections_and_cancels() -> None:
    h = Harness()
    h.target(BTC_PERP, 0.5)
    rejected = h.intents[-1].client_order_id
    h.publish(RiskDecision, client_order_id=rejected, instrument=BTC_PERP, approved=False, reason="LEVERAGE")
    order = h.orders.order(rejected)
    assert order.status is OrderStatus.REJECTED
    assert order.reason == "LEVERAGE"
    assert h.orders.pending_quantity(BTC_PERP) == 0.0

    h.target(BTC_PERP, 0.5, ts=h.now + 1)
    cancelled = h.intents[-1].client_order_id
    h.update(cancelled, BTC_PERP, OrderStatus.ACCEPTED)
    h.update(cancelled, BTC_PERP, OrderStatus.NEW)  # backwards: illegal, ignored
    assert h.orders.order(cancelled).status is OrderStatus.ACCEPTED
    h.update(cancelled, BTC_PERP, OrderStatus.CANCELLED)
    assert h.orders.order(cancelled).status is OrderStatus.CANCELLED
    h.update(cancelled, BTC_PERP, OrderStatus.PARTIALLY_FILLED)  # nothing leaves a terminal state
    assert h.orders.order(cancelled).status is OrderStatus.CANCELLED

    h.target(BTC_PERP, 0.5, ts=h.now + 2)
    refused = h.intents[-1].client_order_id
    h.update(refused, BTC_PERP, OrderStatus.ACCEPTED)
    h.update(refused, BTC_PERP, OrderStatus.REJECTED)  # a venue may refuse an accepted order at fill time
    assert h.orders.order(refused).status is OrderStatus.REJECTED
    assert h.orders.open_orders() == []


def test_halt_cancels_open_orders_and_flattens_every_position() -> None:
    h = Harness()
    h.fill("external-1", BTC_PERP, Side.SELL, 0.25, 50_000.0)
    h.fill("external-2", BTC, Side.BUY, 0.1, 50_000.0)
    h.target(DOGE, 0.2)
    open_cid = h.intents[-1].client_order_id
    h.publish(
        RiskStateChanged,
        previous=RiskState.REDUCING,
        current=RiskState.HALTED,
        reason="max_drawdown",
        drawdown=0.2,
    )
    assert [c.client_order_id for c in h.cancels] == [open_cid]
    flatten = {i.instrument: i for i in h.intents[1:]}
    assert set(flatten) == {BTC_PERP, BTC}
    assert flatten[BTC_PERP].side is Side.BUY and flatten[BTC_PERP].quantity == 0.25
    assert flatten[BTC].side is Side.SELL and flatten[BTC].quantity == 0.1
    assert all(i.reduce_only and i.order_type is OrderType.MARKET for i in flatten.values())
    assert h.orders.risk_state is RiskState.HALTED

    # While halted every target means flat: nothing new opens, and nothing is sent twice.
    h.target(DOGE, 0.5, ts=h.now + 1)
    h.target(BTC_PERP, 0.5, ts=h.now + 1)
    assert len(h.intents) == 3


def test_open_orders_survive_a_restart() -> None:
    h = Harness()
    h.target(BTC_PERP, 0.5)
    cid = h.intents[-1].client_order_id
    decision_ts = h.intents[-1].ts_event
    h.update(cid, BTC_PERP, OrderStatus.ACCEPTED)
    h.fill(cid, BTC_PERP, Side.BUY, 0.3, 50_000.0)
    state = json.loads(json.dumps(h.orders.state_dict()))

    restarted = Harness()
    restarted.orders.load_state_dict(state)
    assert restarted.orders.open_orders() == h.orders.open_orders()
    assert restarted.orders.pending_quantity(BTC_PERP) == pytest.approx(0.7)
    restarted.target(BTC_PERP, 0.5, ts=decision_ts)  # the resend of a decision made before the restart
    assert restarted.intents == []
    restarted.fill(cid, BTC_PERP, Side.BUY, 0.7, 50_000.0)
    assert restarted.orders.order(cid).status is OrderStatus.FILLED


def test_config_validation() -> None:
    with pytest.raises(ValidationError):
        OrderManagerConfig(client_id_prefix="has-dash")
    with pytest.raises(ValidationError):
        OrderManagerConfig(client_id_prefix="waytoolongprefix")
    with pytest.raises(ValidationError):
        OrderManagerConfig(rebalance_threshold=-0.1)
    with pytest.raises(ValidationError):
        OrderManagerConfig(unknown=1)
