"""The event bus: publish/subscribe by event type, one deterministic dispatcher for every mode.

Dispatch is synchronous and first-in first-out: an event published by a handler is
delivered after every handler of the current event has run. Inbound events (market
data, feed status, heartbeats) enter through :meth:`EventBus.feed`, which first
advances the event clock to the event's ``ts_recv`` (firing due timers) and then
dispatches. Paper, live and replay runs all call ``feed`` with the same events in
the same order, so they reach the same state.

Live mode puts an :class:`InboundQueue` in front of ``feed``: adapters push into it
from their own tasks, one pump task drains it into the bus.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from bot.clock import SimulatedClock
from bot.events import Bar, Event, MarketData, Trade

E = TypeVar("E", bound=Event)
Handler = Callable[[Any], None]

log = structlog.get_logger("bot.bus")


@dataclass
class BusStats:
    published: int = 0
    inbound: int = 0
    handler_errors: int = 0
    by_type: dict[str, int] = field(default_factory=dict)


class EventBus:
    """Deterministic in-process publish/subscribe.

    A handler subscribed to a base class (``MarketData``, ``Event``) receives every
    subclass. Handler exceptions are logged with the event and counted; they never
    stop the dispatch of the event to other handlers, nor the bus.
    """

    def __init__(self, clock: SimulatedClock | None = None) -> None:
        self.clock = clock if clock is not None else SimulatedClock()
        self._handlers: dict[type[Event], list[Handler]] = {}
        self._resolved: dict[type[Event], tuple[Handler, ...]] = {}
        self._pending: deque[Event] = deque()
        self._dispatching = False
        self._inbound_hooks: list[Handler] = []
        self.stats = BusStats()

    def subscribe(self, event_type: type[E], handler: Callable[[E], None]) -> None:
        self._handlers.setdefault(event_type, []).append(handler)
        self._resolved.clear()

    def on_inbound(self, hook: Callable[[Event], None]) -> None:
        """Call ``hook`` with every inbound event before it is dispatched (the journal uses this)."""
        self._inbound_hooks.append(hook)

    def publish(self, event: Event) -> None:
        self._pending.append(event)
        if not self._dispatching:
            self._drain()

    def feed(self, event: Event) -> None:
        """Process one inbound event: advance event time, run timers, journal, dispatch."""
        self.stats.inbound += 1
        self.clock.advance_to(event.ts_recv)
        for hook in self._inbound_hooks:
            hook(event)
        self.publish(event)

    def _handlers_for(self, event_type: type[Event]) -> tuple[Handler, ...]:
        handlers = self._resolved.get(event_type)
        if handlers is None:
            collected: list[Handler] = []
            for klass in reversed(event_type.__mro__):
                collected.extend(self._handlers.get(klass, ()))
            handlers = tuple(collected)
            self._resolved[event_type] = handlers
        return handlers

    def _drain(self) -> None:
        self._dispatching = True
        try:
            while self._pending:
                event = self._pending.popleft()
                event_type = type(event)
                self.stats.published += 1
                name = event_type.__name__
                self.stats.by_type[name] = self.stats.by_type.get(name, 0) + 1
                for handler in self._handlers_for(event_type):
                    try:
                        handler(event)
                    except Exception:
                        self.stats.handler_errors += 1
                        log.exception(
                            "handler_failed",
                            handler=getattr(handler, "__qualname__", repr(handler)),
                            event_type=name,
                            instrument=getattr(event, "instrument", None),
                            client_order_id=getattr(event, "client_order_id", None),
                        )
        finally:
            self._dispatching = False


def _conflation_key(event: Event) -> tuple[str, str] | None:
    """Market data whose latest value supersedes earlier ones; trades and closed bars are not."""
    if isinstance(event, Trade) or (isinstance(event, Bar) and event.closed):
        return None
    if isinstance(event, MarketData):
        return (type(event).__name__, event.instrument)
    return None


class InboundQueue:
    """Bounded inbound buffer for live mode, with a stated overflow policy.

    - Control events (feed status, heartbeats, venue order updates and fills) go to an
      unbounded lane and are never dropped; they are taken before pending market data.
    - Market data goes to a lane bounded by ``capacity``. When it is full, an incoming
      quote/mark/option mark supersedes the most recent pending event of the same kind
      and instrument (conflation: it is removed, the new one queued last, so order is
      kept); anything else evicts the oldest pending market-data event (``dropped``).
    """

    def __init__(self, capacity: int = 10_000) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._control: deque[Event] = deque()
        self._market: OrderedDict[int, Event] = OrderedDict()
        self._latest: dict[tuple[str, str], int] = {}
        self._sequence = 0
        self._ready = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self.conflated = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._control) + len(self._market)

    def put_nowait(self, event: Event) -> None:
        if not isinstance(event, MarketData):
            self._control.append(event)
            self._ready.set()
            return
        key = _conflation_key(event)
        if len(self._market) >= self.capacity:
            superseded = self._latest.get(key) if key is not None else None
            if superseded is not None and superseded in self._market:
                del self._market[superseded]
                self.conflated += 1
            else:
                self._market.popitem(last=False)
                self.dropped += 1
        self._sequence += 1
        self._market[self._sequence] = event
        if key is not None:
            self._latest[key] = self._sequence
        self._ready.set()

    async def put(self, event: Event) -> None:
        """Queue with backpressure: a source that can wait (synthetic feed, replay) never loses data."""
        while isinstance(event, MarketData) and len(self._market) >= self.capacity:
            self._space.clear()
            await self._space.wait()
        self.put_nowait(event)

    def get_nowait(self) -> Event | None:
        if self._control:
            return self._control.popleft()
        if self._market:
            event = self._market.popitem(last=False)[1]
            self._space.set()
            return event
        self._ready.clear()
        return None

    async def get(self) -> Event:
        while True:
            event = self.get_nowait()
            if event is not None:
                return event
            await self._ready.wait()
