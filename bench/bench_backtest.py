"""Backtest replay throughput: events per second through the strategy and benchmark engines.

    python bench/bench_backtest.py [--days 0.25] [--seed 7] [--policy trend] [--policy ppo:PATH]

Writes ``days`` of the synthetic market to a temporary journal, then times
:func:`backtest.engine.run_backtest` replaying it once per ``--policy`` (default: the
trend rule; add ``--policy ppo:var/models/<model>.zip`` for a trained PPO policy). Each
event goes through two engines — the strategy's and the buy-and-hold benchmark's — so the
figure per engine is about twice the one printed. Also times a synthetic backtest of the
same span, which includes generating the market.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from adapters.synthetic import SyntheticMarket
from backtest.engine import BacktestError, run_backtest
from bot.journal import JournalWriter
from bot.logs import close_logging, configure_logging
from config.settings import load_settings

NANOS_PER_DAY = 86_400 * 1_000_000_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=float, default=0.25, help="simulated days to replay")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--policy", action="append", help="policy spec NAME[:PATH]; repeat to compare (default: trend)"
    )
    args = parser.parse_args()
    policies = args.policy or ["trend"]
    seeds = {"seed": args.seed}
    settings = load_settings(overrides={"run": seeds, "market": seeds, "venue": seeds})

    with tempfile.TemporaryDirectory() as folder:
        configure_logging(Path(folder), "bench", level="ERROR", console=False, json_file=False)
        journal = Path(folder) / "bench.jsonl"
        end = settings.market.start_ns + round(args.days * NANOS_PER_DAY)
        market = SyntheticMarket(settings.market.model_copy(update={"until_ns": end}))
        writer = JournalWriter(
            journal, "bench", meta={"mode": "paper", "seed": args.seed, "feed": "synthetic"}
        )
        t0 = time.perf_counter()
        for event in market.events():
            writer.write(event)
        writer.close()
        print(
            f"journal: {writer.count:,} events ({args.days:g} simulated days) written in "
            f"{time.perf_counter() - t0:.1f} s, {journal.stat().st_size / 1e6:.1f} MB"
        )

        for spec in policies:
            t0 = time.perf_counter()
            try:
                result = run_backtest(settings, events_path=journal, policy=spec, progress=False)
            except BacktestError as exc:
                print(f"{spec}: skipped ({exc})")
                continue
            elapsed = time.perf_counter() - t0
            print(
                f"replay {spec}: {result.events / elapsed:,.0f} events/s through strategy + benchmark "
                f"({elapsed:.2f} s, {len(result.fills)} fills, {result.strategy.decisions} decisions)"
            )

        t0 = time.perf_counter()
        result = run_backtest(
            settings, synthetic_seed=args.seed, days=args.days, policy=policies[0], progress=False
        )
        elapsed = time.perf_counter() - t0
        print(
            f"synthetic {policies[0]} (market generated on the fly): "
            f"{result.events / elapsed:,.0f} events/s ({elapsed:.2f} s)"
        )
        close_logging()


if __name__ == "__main__":
    main()
