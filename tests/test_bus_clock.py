"""Event bus, clocks and the live inbound queue."""

from __future__ import annotations

import asyncio

import pytest

from bot.bus import EventBus, InboundQueue
from bot.clock import LiveClock, SimulatedClock
from bot.events import (
    AggressorSide,
    Event,
    FeedState,
    FeedStatus,
    Fill,
    Heartbeat,
    MarketData,
    Quote,
    Side,
    Trade,
)

SECOND = 1_000_000_000


def quote(ts: int, instrument: str = "SYNTH:BTCUSDT", bid: float = 100.0) -> Quote:
    return Quote(
        ts_event=ts, ts_recv=ts, instrument=instrument, bid=bid, bid_size=1.0, ask=bid + 1, ask_size=1.0
    )


def trade(ts: int, trade_id: str) -> Trade:
    return Trade(
        ts_event=ts,
        ts_recv=ts,
        instrument="SYNTH:BTCUSDT",
        price=100.0,
        size=1.0,
        aggressor_side=AggressorSide.BUY,
        trade_id=trade_id,
    )


def test_dispatch_is_fifo_and_reaches_base_class_subscribers() -> None:
    bus = EventBus()
    seen: list[str] = []
    bus.subscribe(MarketData, lambda e: seen.append(f"md:{type(e).__name__}"))
    bus.subscribe(Event, lambda e: seen.append(f"any:{type(e).__name__}"))

    def on_quote(event: Quote) -> None:
        seen.append("quote")
        bus.publish(Heartbeat(ts_event=event.ts_event, ts_recv=event.ts_recv))

    bus.subscribe(Quote, on_quote)
    bus.feed(quote(SECOND))
    # base-class handlers first (MRO from Event down), the nested publish after all quote handlers
    assert seen == ["any:Quote", "md:Quote", "quote", "any:Heartbeat"]


def test_handler_exception_is_isolated() -> None:
    bus = EventBus()
    delivered: list[int] = []

    def broken(_: Quote) -> None:
        raise RuntimeError("boom")

    bus.subscribe(Quote, broken)
    bus.subscribe(Quote, lambda e: delivered.append(e.ts_event))
    bus.feed(quote(SECOND))
    bus.feed(quote(2 * SECOND))
    assert delivered == [SECOND, 2 * SECOND]
    assert bus.stats.handler_errors == 2


def test_feed_advances_clock_and_fires_aligned_timers_before_dispatch() -> None:
    bus = EventBus()
    order: list[tuple[str, int]] = []
    bus.clock.set_timer("decide", 60 * SECOND, lambda ts: order.append(("timer", ts)))
    bus.subscribe(Quote, lambda e: order.append(("quote", bus.clock.now_ns())))
    start = 1_000 * 60 * SECOND + 5 * SECOND  # 5 s past a minute boundary
    bus.feed(quote(start))
    bus.feed(quote(start + 150 * SECOND))
    minute = 60 * SECOND
    first_boundary = (start // minute + 1) * minute
    assert order == [
        ("quote", start),
        ("timer", first_boundary),
        ("timer", first_boundary + minute),
        ("quote", start + 150 * SECOND),
    ]


def test_simulated_clock_never_goes_backwards_and_cancel_works() -> None:
    clock = SimulatedClock()
    fired: list[int] = []
    clock.set_timer("t", 10, fired.append)
    clock.advance_to(100)
    clock.advance_to(50)
    assert clock.now_ns() == 100
    clock.advance_to(125)
    assert fired == [110, 120]
    clock.cancel_timer("t")
    clock.advance_to(1_000)
    assert fired == [110, 120]
    with pytest.raises(ValueError):
        clock.set_timer("bad", 0, fired.append)


def test_unstarted_clock_refuses_now() -> None:
    with pytest.raises(RuntimeError):
        SimulatedClock().now_ns()


def test_same_events_give_same_dispatch_sequence() -> None:
    def run() -> list[tuple[str, int]]:
        bus = EventBus()
        log: list[tuple[str, int]] = []
        bus.clock.set_timer("t", 7 * SECOND, lambda ts: log.append(("timer", ts)))
        bus.subscribe(Event, lambda e: log.append((type(e).__name__, e.ts_recv)))
        for i in range(50):
            bus.feed(quote(1_700_000_000 * SECOND + i * 3 * SECOND))
        return log

    assert run() == run()


async def test_inbound_queue_never_drops_control_events_and_conflates_quotes() -> None:
    queue = InboundQueue(capacity=2)
    queue.put_nowait(quote(1, "SYNTH:A"))
    queue.put_nowait(quote(2, "SYNTH:B"))
    queue.put_nowait(quote(3, "SYNTH:A", bid=200.0))  # full: supersedes the pending A quote
    queue.put_nowait(trade(4, "t1"))  # full, trades are not conflatable: evicts the oldest
    for i in range(100):
        queue.put_nowait(FeedStatus(ts_event=i, ts_recv=i, feed="synthetic", status=FeedState.CONNECTED))
    assert queue.conflated == 1
    assert queue.dropped == 1
    drained = [await queue.get() for _ in range(len(queue))]
    statuses = [e for e in drained if isinstance(e, FeedStatus)]
    market = [e for e in drained if isinstance(e, MarketData)]
    assert len(statuses) == 100
    assert drained[:100] == statuses  # control lane first
    assert [(type(e).__name__, e.ts_recv) for e in market] == [("Quote", 3), ("Trade", 4)]
    assert market[0].bid == 200.0


async def test_inbound_queue_get_waits_for_producer() -> None:
    queue = InboundQueue()
    fill = Fill(
        ts_event=1,
        ts_recv=1,
        client_order_id="c",
        instrument="SYNTH:X",
        side=Side.BUY,
        quantity=1,
        price=1,
        fee=0,
    )
    consumer = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    assert not consumer.done()
    queue.put_nowait(fill)
    assert await asyncio.wait_for(consumer, 1) == fill


async def test_live_clock_timer_fires_on_wall_time() -> None:
    clock = LiveClock()
    fired: list[int] = []
    clock.set_timer("fast", 10_000_000, fired.append)  # 10 ms
    await asyncio.sleep(0.08)
    clock.cancel_all()
    assert len(fired) >= 3
    assert all(ts % 10_000_000 == 0 for ts in fired)
    assert abs(clock.now_ns() - fired[-1]) < 1_000_000_000


async def test_inbound_queue_put_waits_for_space_instead_of_dropping() -> None:
    queue = InboundQueue(capacity=3)
    produced = [trade(i, f"t{i}") for i in range(20)]

    async def producer() -> None:
        for event in produced:
            await queue.put(event)

    task = asyncio.create_task(producer())
    consumed = []
    while len(consumed) < len(produced):
        consumed.append(await queue.get())
        assert len(queue) <= 3
        await asyncio.sleep(0)
    await task
    assert consumed == produced
    assert queue.dropped == 0
