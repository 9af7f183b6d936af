"""Replay throughput of the full engine and latency from a market event to an order intent.

    python bench/bench_pipeline.py [--hours 6] [--seed 7]

Pre-generates a synthetic market session, then replays it (as fast as possible, on
the simulated clock) twice: through bus → features → state builder only, and
through the whole engine built by ``bot.app.build_engine``. Latency is wall time
from the start of ``Engine.feed(event)`` to each ``OrderIntent`` it causes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from adapters.synthetic import SyntheticMarket
from bot.app import build_engine
from bot.bus import EventBus
from bot.events import OrderIntent
from bot.features.engine import build_feature_engine
from bot.logs import configure_logging
from bot.state import StateBuilder
from config.settings import load_settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=6.0, help="simulated hours to replay")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    # Errors only: the figures are the engine's, not the console's (paper runs log to a file).
    configure_logging(Path(tempfile.gettempdir()), "bench", level="ERROR", console=False, json_file=False)

    settings = load_settings(overrides={"market": {"seed": args.seed}, "venue": {"seed": args.seed}})
    market = SyntheticMarket(settings.market)
    end = settings.market.start_ns + int(args.hours * 3600e9)
    t0 = time.perf_counter()
    events = []
    for event in market.events():
        if event.ts_recv > end:
            break
        events.append(event)
    generation_s = time.perf_counter() - t0
    print(f"generated {len(events):,} events ({args.hours:g} simulated hours) in {generation_s:.1f} s")

    # bus -> features -> state builder, decisions every minute of event time
    bus = EventBus()
    features = build_feature_engine(bus, settings.features)
    builder = StateBuilder(
        len(features.feature_names), window=settings.state.window, clip=settings.state.clip
    )
    bus.clock.set_timer(
        "decision",
        int(settings.run.decision_interval_s * 1e9),
        lambda now: builder.update(features.vector(now)),
    )
    t0 = time.perf_counter()
    for event in events:
        bus.feed(event)
    elapsed = time.perf_counter() - t0
    print(f"bus -> features -> state: {len(events) / elapsed:,.0f} events/s ({elapsed:.2f} s)")

    engine = build_engine(settings, market.instruments())
    latencies: list[int] = []
    started = 0
    engine.bus.subscribe(OrderIntent, lambda _: latencies.append(time.perf_counter_ns() - started))
    t0 = time.perf_counter()
    for event in events:
        started = time.perf_counter_ns()
        engine.feed(event)
    elapsed = time.perf_counter() - t0
    print(
        f"full engine (policy {engine.policy.name}): {len(events) / elapsed:,.0f} events/s ({elapsed:.2f} s)"
    )
    if latencies:
        micros = np.array(latencies) / 1e3
        print(
            f"market event -> order intent: n={micros.size}, p50 {np.percentile(micros, 50):.0f} us, "
            f"p99 {np.percentile(micros, 99):.0f} us"
        )
    else:
        print("market event -> order intent: no intents in this session")
    print(f"fills {engine.fingerprint.fill_count}, equity {engine.portfolio.equity():,.2f}")


if __name__ == "__main__":
    main()
