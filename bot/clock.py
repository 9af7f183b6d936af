"""Clocks: one interface for event time (simulated) and wall time (live), timers included.

The engine's decisions always run on a :class:`SimulatedClock` advanced by the
``ts_recv`` of the inbound events it processes, in paper, live and replay modes
alike: that is what makes a replay of a journal reproduce a live run's decisions
exactly. :class:`LiveClock` is wall time, used at the edges (stamping receive
times, pacing the synthetic feed, heartbeats, status lines).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

TimerCallback = Callable[[int], None]

NANOS_PER_SECOND = 1_000_000_000


class Clock(Protocol):
    """What components may ask of time."""

    def now_ns(self) -> int: ...

    def set_timer(self, name: str, interval_ns: int, callback: TimerCallback) -> None:
        """Call ``callback(deadline_ns)`` at every multiple of ``interval_ns`` (epoch-aligned)."""
        ...

    def cancel_timer(self, name: str) -> None: ...


@dataclass(order=True)
class _Deadline:
    deadline_ns: int
    sequence: int
    name: str = field(compare=False)


class SimulatedClock:
    """Event-time clock; time moves only through :meth:`advance_to`.

    Timers are aligned to multiples of their interval since the epoch, so they fire at
    the same instants whatever time a run starts, and a replay fires them identically.
    Until the first :meth:`advance_to`, the clock has no time and timers wait.
    """

    def __init__(self, start_ns: int | None = None) -> None:
        self._now: int | None = start_ns
        self._timers: dict[str, tuple[int, TimerCallback]] = {}
        self._heap: list[_Deadline] = []
        self._sequence = itertools.count()

    @property
    def started(self) -> bool:
        return self._now is not None

    def now_ns(self) -> int:
        if self._now is None:
            raise RuntimeError("the simulated clock has not been advanced yet")
        return self._now

    def set_timer(self, name: str, interval_ns: int, callback: TimerCallback) -> None:
        if interval_ns <= 0:
            raise ValueError(f"timer {name!r} needs a positive interval, got {interval_ns}")
        self._timers[name] = (interval_ns, callback)
        if self._now is not None:
            self._schedule(name, interval_ns, self._now)

    def cancel_timer(self, name: str) -> None:
        self._timers.pop(name, None)

    def _schedule(self, name: str, interval_ns: int, after_ns: int) -> None:
        deadline = (after_ns // interval_ns + 1) * interval_ns
        heapq.heappush(self._heap, _Deadline(deadline, next(self._sequence), name))

    def advance_to(self, ts_ns: int) -> None:
        """Move time forward to ``ts_ns`` (never backwards), firing due timers in deadline order."""
        if self._now is None:
            self._now = ts_ns
            for name, (interval, _) in self._timers.items():
                self._schedule(name, interval, ts_ns)
            return
        while self._heap and self._heap[0].deadline_ns <= ts_ns:
            due = heapq.heappop(self._heap)
            timer = self._timers.get(due.name)
            if timer is None:  # cancelled
                continue
            interval, callback = timer
            self._now = max(self._now, due.deadline_ns)
            self._schedule(due.name, interval, due.deadline_ns)
            callback(due.deadline_ns)
        if ts_ns > self._now:
            self._now = ts_ns


class LiveClock:
    """Wall-clock time; timers run as asyncio tasks on the running loop."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def now_ns(self) -> int:
        return time.time_ns()

    def set_timer(self, name: str, interval_ns: int, callback: TimerCallback) -> None:
        if interval_ns <= 0:
            raise ValueError(f"timer {name!r} needs a positive interval, got {interval_ns}")
        self.cancel_timer(name)
        self._tasks[name] = asyncio.get_running_loop().create_task(self._run(interval_ns, callback))

    def cancel_timer(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()

    def cancel_all(self) -> None:
        for name in list(self._tasks):
            self.cancel_timer(name)

    async def _run(self, interval_ns: int, callback: TimerCallback) -> None:
        while True:
            now = time.time_ns()
            deadline = (now // interval_ns + 1) * interval_ns
            await asyncio.sleep((deadline - now) / NANOS_PER_SECOND)
            callback(deadline)
