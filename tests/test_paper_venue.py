"""The paper venue: fill timing and prices, fees, slippage, resting limits, cancels, reduce-only, funding."""

from __future__ import annotations

import math

import numpy as np
import pytest

from adapters.paper import PaperVenue, PaperVenueConfig
from bot.bus import EventBus
from bot.events import (
    CancelOrder,
    Event,
    Fill,
    FundingPayment,
    Liquidity,
    MarkPrice,
    OrderIntent,
    OrderStatus,
    OrderType,
    OrderUpdate,
    Quote,
    Side,
    SubmitOrder,
)
from bot.instruments import InstrumentKind, InstrumentSpec

SPOT = "SYNTH:BTCUSDT"
PERP = "SYNTH:BTCUSDT-PERP"
T0 = 1_767_225_600_000_000_000
MS = 1_000_000
SPECS = [
    InstrumentSpec(
        instrument=SPOT,
        kind=InstrumentKind.SPOT,
        base="BTC",
        tick_size=0.01,
        lot_size=0.00001,
        min_notional=5,
    ),
    InstrumentSpec(
        instrument=PERP, kind=InstrumentKind.PERP, base="BTC", tick_size=0.1, lot_size=0.001, min_notional=5
    ),
]
NO_SLIPPAGE = {"impact_bps": 0.0, "impact_noise_bps": 0.0}


class Harness:
    """A bus with a paper venue and a recorder of everything the venue publishes."""

    def __init__(self, **config: float) -> None:
        self.bus = EventBus()
        self.venue = PaperVenue(self.bus, SPECS, PaperVenueConfig(**config))
        self.events: list[Event] = []
        for kind in (OrderUpdate, Fill, FundingPayment):
            self.bus.subscribe(kind, self.events.append)
        self._order_number = 0

    def quote(self, ts: int, bid: float, ask: float, instrument: str = PERP, size: float = 2.0) -> None:
        self.bus.feed(
            Quote(
                ts_event=ts, ts_recv=ts, instrument=instrument, bid=bid, bid_size=size, ask=ask, ask_size=size
            )
        )

    def mark(self, ts: int, mark_price: float, funding_rate: float, next_funding_ts: int) -> None:
        self.bus.feed(
            MarkPrice(
                ts_event=ts,
                ts_recv=ts,
                instrument=PERP,
                mark_price=mark_price,
                index_price=mark_price,
                funding_rate=funding_rate,
                next_funding_ts=next_funding_ts,
            )
        )

    def submit(
        self,
        side: Side,
        quantity: float,
        instrument: str = PERP,
        limit: float | None = None,
        reduce_only: bool = False,
    ) -> str:
        self._order_number += 1
        client_order_id = f"O-{self._order_number}"
        now = self.bus.clock.now_ns()
        intent = OrderIntent(
            ts_event=now,
            ts_recv=now,
            client_order_id=client_order_id,
            instrument=instrument,
            side=side,
            quantity=quantity,
            order_type=OrderType.MARKET if limit is None else OrderType.LIMIT,
            limit_price=limit,
            reduce_only=reduce_only,
        )
        self.bus.publish(SubmitOrder(ts_event=now, ts_recv=now, intent=intent))
        return client_order_id

    def of(self, kind: type[Event]) -> list:
        return [event for event in self.events if isinstance(event, kind)]

    def statuses(self, client_order_id: str) -> list[OrderStatus]:
        return [u.status for u in self.of(OrderUpdate) if u.client_order_id == client_order_id]


def test_market_orders_fill_at_the_touch_after_the_latency_with_the_taker_fee() -> None:
    h = Harness(latency_ms=50.0, latency_jitter_ms=0.0, **NO_SLIPPAGE)
    h.quote(T0, 60_000.0, 60_000.1)
    buy = h.submit(Side.BUY, 0.5)
    assert h.statuses(buy) == [OrderStatus.ACCEPTED]
    h.quote(T0 + 49 * MS, 60_010.0, 60_010.1)  # before the order reaches the venue
    assert h.of(Fill) == []
    h.quote(T0 + 50 * MS, 60_020.0, 60_020.1)
    (fill,) = h.of(Fill)
    assert (fill.side, fill.quantity, fill.price) == (Side.BUY, 0.5, 60_020.1)
    assert fill.liquidity is Liquidity.TAKER and fill.ts_event == T0 + 50 * MS
    assert fill.fee == pytest.approx(0.0005 * 0.5 * 60_020.1, rel=1e-12)
    final = h.of(OrderUpdate)[-1]
    assert (final.status, final.filled_qty, final.avg_price) == (OrderStatus.FILLED, 0.5, 60_020.1)
    assert h.venue.position(PERP) == 0.5

    h.quote(T0 + MS * 100, 60_000.0, 60_000.01, instrument=SPOT)
    h.venue.restore_positions({SPOT: 1.0})
    sell = h.submit(Side.SELL, 0.25, instrument=SPOT)
    h.quote(T0 + MS * 200, 59_990.0, 59_990.01, instrument=SPOT)
    spot_fill = h.of(Fill)[-1]
    assert (spot_fill.client_order_id, spot_fill.price) == (sell, 59_990.0)
    assert spot_fill.fee == pytest.approx(0.001 * 0.25 * 59_990.0, rel=1e-12)
    assert h.venue.position(SPOT) == pytest.approx(0.75)


def test_latency_jitter_stays_within_its_bounds() -> None:
    h = Harness(latency_ms=20.0, latency_jitter_ms=30.0, **NO_SLIPPAGE)
    h.quote(T0, 100.0, 100.1)
    fill_delays = []
    for step in range(40):
        start = h.bus.clock.now_ns()
        h.submit(Side.BUY, 0.1)
        ts = start
        while not any(f.ts_event > start for f in h.of(Fill)) and ts < start + 100 * MS:
            ts += MS
            h.quote(ts, 100.0 + step, 100.1 + step)
        fill_delays.append(h.of(Fill)[-1].ts_event - start)
    assert min(fill_delays) >= 20 * MS and max(fill_delays) <= 50 * MS
    assert len(set(fill_delays)) > 5  # the jitter is drawn, not constant


def _fill_price(quantity: float, seed: int) -> float:
    h = Harness(latency_ms=0.0, latency_jitter_ms=0.0, impact_bps=4.0, impact_noise_bps=1.0, seed=seed)
    h.quote(T0, 60_000.0, 60_000.1, size=2.0)
    h.submit(Side.BUY, quantity)
    h.quote(T0 + MS, 60_000.0, 60_000.1, size=2.0)
    return h.of(Fill)[-1].price


def test_slippage_is_adverse_and_grows_like_the_square_root_of_size() -> None:
    sizes = [0.002, 0.5, 2.0, 8.0]
    prices = [_fill_price(q, seed=7) for q in sizes]
    assert all(p > 60_000.1 for p in prices)
    assert prices == sorted(prices) and len(set(prices)) == len(prices)
    # Same seed, same draw: the price differences are exactly the square-root impact term.
    for q, p in zip(sizes[1:], prices[1:], strict=True):
        expected = 60_000.1 * 4.0e-4 * (math.sqrt(q / 2.0) - math.sqrt(sizes[0] / 2.0))
        assert p - prices[0] == pytest.approx(expected, rel=1e-6)
    assert _fill_price(0.5, seed=8) != prices[1]


def _scripted_run(seed: int) -> list[Event]:
    """A pseudo-random order flow over random quotes, identical for every call."""
    script = np.random.default_rng(123)
    h = Harness(seed=seed)
    h.venue.restore_positions({SPOT: 5.0})
    ts = T0
    for _ in range(300):
        ts += int(script.integers(1, 200)) * MS
        instrument = SPOT if script.random() < 0.5 else PERP
        mid = 60_000.0 + float(script.normal(0.0, 30.0))
        tick = 0.01 if instrument == SPOT else 0.1
        h.quote(ts, round(mid - tick, 2), round(mid + tick, 2), instrument=instrument)
        if script.random() < 0.3:
            side = Side.BUY if script.random() < 0.5 else Side.SELL
            limit = round(mid + float(script.normal(0.0, 20.0)), 1) if script.random() < 0.4 else None
            h.submit(side, round(float(script.uniform(0.001, 0.1)), 3), instrument=instrument, limit=limit)
    return h.events


def test_same_seed_and_events_reproduce_every_fill() -> None:
    first, second = _scripted_run(seed=3), _scripted_run(seed=3)
    assert first == second
    assert sum(isinstance(e, Fill) for e in first) > 30
    other = _scripted_run(seed=4)
    assert [f.price for f in first if isinstance(f, Fill)] != [f.price for f in other if isinstance(f, Fill)]


def test_limit_orders_rest_then_fill_as_maker_when_a_quote_trades_through() -> None:
    h = Harness(latency_ms=10.0, latency_jitter_ms=0.0, impact_bps=3.0, impact_noise_bps=0.0)
    h.quote(T0, 60_000.0, 60_000.1)
    buy = h.submit(Side.BUY, 0.2, limit=59_950.0)
    h.quote(T0 + 20 * MS, 59_990.0, 59_990.1)
    h.quote(T0 + 30 * MS, 59_950.0, 59_950.1)  # bid at the limit: not traded through yet
    assert h.of(Fill) == [] and h.venue.open_orders == [buy]
    h.quote(T0 + 40 * MS, 59_939.9, 59_940.0)
    (fill,) = h.of(Fill)
    assert (fill.price, fill.liquidity) == (59_950.0, Liquidity.MAKER)
    assert fill.fee == pytest.approx(0.0002 * 0.2 * 59_950.0, rel=1e-12)
    assert h.statuses(buy) == [OrderStatus.ACCEPTED, OrderStatus.FILLED]

    # A marketable limit takes liquidity but never pays beyond its limit.
    sell = h.submit(Side.SELL, 1.0, limit=59_939.0)
    h.quote(T0 + 60 * MS, 59_939.9, 59_940.0)
    taker = h.of(Fill)[-1]
    assert taker.client_order_id == sell and taker.liquidity is Liquidity.TAKER
    assert taker.price == 59_939.0  # the impact would push it to 59_939.9 · (1 − 3 bps · sqrt(0.5))
    assert taker.fee == pytest.approx(0.0005 * 1.0 * 59_939.0, rel=1e-12)


def test_cancel_removes_an_open_order_and_rejects_an_unknown_one() -> None:
    h = Harness(latency_ms=10.0, latency_jitter_ms=0.0)
    h.quote(T0, 60_000.0, 60_000.1)
    buy = h.submit(Side.BUY, 0.2, limit=59_000.0)
    h.quote(T0 + 20 * MS, 59_990.0, 59_990.1)
    h.bus.publish(
        CancelOrder(ts_event=T0 + 20 * MS, ts_recv=T0 + 20 * MS, client_order_id=buy, instrument=PERP)
    )
    h.quote(T0 + 40 * MS, 58_000.0, 58_000.1)  # would have filled the resting buy
    assert h.of(Fill) == [] and h.venue.open_orders == []
    assert h.statuses(buy) == [OrderStatus.ACCEPTED, OrderStatus.CANCELLED]
    h.bus.publish(
        CancelOrder(ts_event=T0 + 40 * MS, ts_recv=T0 + 40 * MS, client_order_id="nope", instrument=PERP)
    )
    rejected = h.of(OrderUpdate)[-1]
    assert (rejected.client_order_id, rejected.status) == ("nope", OrderStatus.REJECTED)
    assert rejected.reason


def test_reduce_only_orders_are_clipped_to_the_position_or_rejected() -> None:
    h = Harness(latency_ms=0.0, latency_jitter_ms=0.0, **NO_SLIPPAGE)
    h.quote(T0, 60_000.0, 60_000.1)
    flat = h.submit(Side.SELL, 1.0, reduce_only=True)
    assert h.statuses(flat) == [OrderStatus.REJECTED]

    h.venue.restore_positions({PERP: 0.5})
    wrong_way = h.submit(Side.BUY, 0.1, reduce_only=True)
    assert h.statuses(wrong_way) == [OrderStatus.REJECTED]
    clipped = h.submit(Side.SELL, 1.0, reduce_only=True)
    h.quote(T0 + MS, 60_000.0, 60_000.1)
    (fill,) = h.of(Fill)
    assert (fill.client_order_id, fill.quantity, fill.side) == (clipped, 0.5, Side.SELL)
    assert h.venue.position(PERP) == 0.0


def test_spot_cannot_be_sold_short() -> None:
    h = Harness(latency_ms=0.0, latency_jitter_ms=0.0)
    h.quote(T0, 60_000.0, 60_000.01, instrument=SPOT)
    short = h.submit(Side.SELL, 0.01, instrument=SPOT)
    assert h.statuses(short) == [OrderStatus.REJECTED]
    assert h.of(OrderUpdate)[-1].reason == "insufficient_spot_balance"


def test_funding_is_settled_on_the_venue_position_at_the_funding_time() -> None:
    h = Harness(latency_ms=0.0, latency_jitter_ms=0.0, **NO_SLIPPAGE)
    funding_ts = T0 + 8 * 3600 * 10**9
    h.quote(T0, 60_000.0, 60_000.1)
    h.mark(T0, 60_000.0, 0.0001, funding_ts)
    h.submit(Side.BUY, 2.0)
    h.quote(T0 + MS, 60_000.0, 60_000.1)
    h.mark(funding_ts - 10**9, 60_100.0, 0.0003, funding_ts)
    assert h.of(FundingPayment) == []
    h.mark(funding_ts, 60_200.0, 0.00005, funding_ts + 8 * 3600 * 10**9)
    (payment,) = h.of(FundingPayment)
    assert (payment.position_qty, payment.funding_rate, payment.mark_price) == (2.0, 0.0003, 60_200.0)
    assert payment.amount == pytest.approx(-2.0 * 60_200.0 * 0.0003, rel=1e-12)
    assert payment.amount < 0  # a long pays a positive rate
    h.mark(funding_ts + 10**9, 60_200.0, 0.00005, funding_ts + 8 * 3600 * 10**9)
    assert len(h.of(FundingPayment)) == 1  # once per funding time

    h.venue.restore_positions({PERP: -1.5})
    next_ts = funding_ts + 8 * 3600 * 10**9
    h.mark(next_ts + 5 * 10**9, 61_000.0, 0.0001, next_ts + 8 * 3600 * 10**9)
    short_payment = h.of(FundingPayment)[-1]
    assert (
        short_payment.amount == pytest.approx(1.5 * 61_000.0 * 0.00005, rel=1e-12)
        and short_payment.amount > 0
    )


def test_no_funding_on_a_flat_account() -> None:
    h = Harness()
    funding_ts = T0 + 10**9
    h.mark(T0, 60_000.0, 0.0001, funding_ts)
    h.mark(funding_ts, 60_000.0, 0.0001, funding_ts + 8 * 3600 * 10**9)
    assert h.of(FundingPayment) == []
