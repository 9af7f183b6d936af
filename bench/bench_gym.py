"""Benchmark: raw gym environment throughput with random actions, in one process and vectorised.

Times :class:`backtest.gym_env.TradingEnv` on the synthetic market with the training
environment's configuration: reset (warm-up included), then agent steps with uniformly
random actions, episodes restarting as they end. Each step generates and replays about a
decision interval of market events through the whole engine. Then the same through SB3's
``SubprocVecEnv`` with ``--workers`` processes, which is how training runs it.
Run: ``python bench/bench_gym.py [--steps 2000] [--workers 2]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backtest.gym_env import TradingEnv
from backtest.train import default_training_env, make_vec_env, quiet_logging
from config.settings import load_settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="agent steps to time")
    parser.add_argument("--workers", type=int, default=2, help="SubprocVecEnv processes (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    quiet_logging()
    settings = load_settings()
    config = default_training_env()
    rng = np.random.default_rng(args.seed)

    env = TradingEnv(settings, config)
    started = time.perf_counter()
    env.reset(seed=args.seed)
    reset_s = time.perf_counter() - started
    print(
        f"reset: {reset_s:.2f} s ({config.warmup_decisions} warm-up decisions, "
        f"observation {env.observation_space.shape}, {len(env.instruments)} actions)"
    )
    events_before, episodes = env.events_fed, 0
    events = 0
    started = time.perf_counter()
    for _ in range(args.steps):
        _, _, terminated, truncated, _ = env.step(rng.uniform(-1.0, 1.0, size=len(env.instruments)))
        if terminated or truncated:
            events += env.events_fed - events_before
            env.reset()
            events_before, episodes = env.events_fed, episodes + 1
    elapsed = time.perf_counter() - started
    events += env.events_fed - events_before
    print(
        f"one process: {args.steps / elapsed:,.1f} steps/s ({elapsed:.1f} s for {args.steps} steps, "
        f"{episodes} resets included; {events / args.steps:,.0f} events/step, "
        f"{events / elapsed:,.0f} events/s)"
    )

    if args.workers > 0:
        vec_env = make_vec_env(settings, config, args.workers)
        try:
            vec_env.seed(args.seed)
            vec_env.reset()
            rounds = max(1, args.steps // args.workers)
            started = time.perf_counter()
            for _ in range(rounds):
                vec_env.step(
                    rng.uniform(-1.0, 1.0, size=(args.workers, len(env.instruments))).astype(np.float32)
                )
            elapsed = time.perf_counter() - started
        finally:
            vec_env.close()
        steps = rounds * args.workers
        rate = steps / elapsed
        print(f"SubprocVecEnv x{args.workers}: {rate:,.1f} steps/s ({elapsed:.1f} s for {steps} steps)")


if __name__ == "__main__":
    main()
