"""Benchmark: Heston path simulation throughput, in path·steps per second.

Times ``simulate`` with the QE and Euler full-truncation schemes on 10,000 paths × 252 daily
steps, the Markov regime-switching simulator on the same grid (paths switch independently, so
each step splits the paths by regime), and the streaming cost of one ``step`` call on a small
batch (how the synthetic market advances a handful of assets). Best of a few repeats, so the
figures are the machine's speed, not its noise. Run: ``python bench/bench_simulation.py``.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.heston import HestonParams
from models.simulation import BULL, CRASH, simulate, simulate_regimes, step

PARAMS = HestonParams(kappa=2.0, theta=0.04, sigma=0.5, rho=-0.7, v0=0.04)
N_PATHS = 10_000
STEPS = 252
REPEATS = 3
STREAM_ASSETS = 8
STREAM_CALLS = 5_000


def best_seconds(run: Callable[[], object], repeats: int = REPEATS) -> float:
    """Fastest wall time of ``repeats`` runs, after one warm-up run."""
    run()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        timings.append(time.perf_counter() - start)
    return min(timings)


def main() -> None:
    path_steps = N_PATHS * STEPS
    print(f"Heston simulation, {N_PATHS:,} paths × {STEPS} steps (best of {REPEATS})")
    for scheme in ("qe", "euler"):
        seconds = best_seconds(
            lambda s=scheme: simulate(PARAMS, 100.0, 1.0, STEPS, N_PATHS, scheme=s, seed=0)
        )
        rate = path_steps / seconds / 1e6
        print(f"  simulate {scheme:<5}         {seconds * 1e3:7.1f} ms   {rate:6.1f} M path·steps/s")
    seconds = best_seconds(
        lambda: simulate_regimes(
            (BULL, CRASH), 100.0, 1.0, STEPS, N_PATHS, intensities=[[0.0, 1.0], [4.0, 0.0]], seed=0
        )
    )
    print(
        f"  regimes (Markov, QE) {seconds * 1e3:7.1f} ms   {path_steps / seconds / 1e6:6.1f} M path·steps/s"
    )

    rng = np.random.default_rng(0)
    normals = rng.standard_normal((STREAM_CALLS, 2, STREAM_ASSETS))

    def stream() -> None:
        log_s, v = np.full(STREAM_ASSETS, math.log(100.0)), np.full(STREAM_ASSETS, PARAMS.v0)
        for z in normals:
            log_s, v = step(log_s, v, PARAMS, 0.0, 1.0 / 365.0, z[0], z[1])

    seconds = best_seconds(stream)
    print(f"  streaming step (QE, {STREAM_ASSETS} assets)  {seconds / STREAM_CALLS * 1e6:6.1f} µs per call")


if __name__ == "__main__":
    main()
