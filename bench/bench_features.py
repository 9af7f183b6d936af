"""Benchmark: feature-engine cost per inbound event and per decision.

Feeds a recorded stretch of the embedded synthetic market (quotes, trades, marks,
surfaces; generated before timing) through an ``EventBus`` twice — with no
subscriber, then with the default feature engine — and reports events per second
and the engine's share per event. Then times, with full histories, one decision's
``FeatureEngine.vector`` and ``StateBuilder.update`` (what the decision loop does at
each tick). Best of a few repeats. Run: ``python bench/bench_features.py``.
"""

from __future__ import annotations

import itertools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapters.synthetic import SyntheticMarket, SyntheticMarketConfig
from bot.bus import EventBus
from bot.events import Event
from bot.features.engine import FeatureEngine, build_feature_engine
from bot.state import StateBuilder

N_EVENTS = 100_000
REPEATS = 3
DECISIONS = 500


def feed_seconds(events: list[Event], with_features: bool) -> tuple[float, EventBus, FeatureEngine | None]:
    """Fastest of ``REPEATS`` passes of the events through a fresh bus (and engine)."""
    best, bus, engine = float("inf"), EventBus(), None
    for _ in range(REPEATS):
        bus = EventBus()
        engine = build_feature_engine(bus) if with_features else None
        start = time.perf_counter()
        for event in events:
            bus.feed(event)
        best = min(best, time.perf_counter() - start)
    return best, bus, engine


def main() -> None:
    market = SyntheticMarket(SyntheticMarketConfig(seed=3))
    events = list(itertools.islice(market.events(), N_EVENTS))
    simulated_h = (events[-1].ts_recv - events[0].ts_recv) / 3.6e12
    print(f"{len(events):,} synthetic events ({simulated_h:.1f} simulated hours)")

    bare, _, _ = feed_seconds(events, with_features=False)
    loaded, bus, engine = feed_seconds(events, with_features=True)
    assert engine is not None
    print(f"bus only:                {len(events) / bare:>12,.0f} events/s")
    print(f"bus + feature engine:    {len(events) / loaded:>12,.0f} events/s")
    print(f"feature engine per event: {(loaded - bare) / len(events) * 1e6:>11.2f} µs")

    builder = StateBuilder(engine.dim)
    now = bus.clock.now_ns()
    vector_times, state_times = [], []
    for tick in range(DECISIONS):
        start = time.perf_counter()
        vector = engine.vector(now + tick)
        middle = time.perf_counter()
        builder.update(vector)
        vector_times.append(middle - start)
        state_times.append(time.perf_counter() - middle)
    vector_ms = statistics.median(vector_times) * 1e3
    state_ms = statistics.median(state_times) * 1e3
    print(f"decision ({engine.dim} features, window {builder.window}):")
    print(f"  vector(now):           {vector_ms:>12.3f} ms (median of {DECISIONS})")
    print(f"  state update:          {state_ms:>12.3f} ms")
    print(f"  total:                 {vector_ms + state_ms:>12.3f} ms")


if __name__ == "__main__":
    main()
