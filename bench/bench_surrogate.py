"""Benchmark: the neural surrogate against the Heston engine, and calibration through the surrogate.

Loads ``var/models/surrogate/surrogate.pt`` when present (the full run of ``surrogate_main``), else trains
a small model (8192 surfaces, 20 epochs, about half a minute) so the script always runs. Prints the time
per surface of ``models.heston.iv_surface`` and of ``SurrogateModel.predict``, one at a time and batched,
then cold- and warm-start calibration time per surface through the surrogate on engine surfaces.
Targets: ≥ 1000× per surface batched, calibration under 20 ms. Both sides run on one thread (the machine
is shared, and one thread is the like-for-like comparison). Run: ``python bench/bench_surrogate.py``.
"""

from __future__ import annotations

import os

# Before numpy loads: the engine's complex matrix products would otherwise use every core.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.heston import iv_surface
from models.surrogate import (
    DEFAULT_MODEL_DIR,
    MODEL_FILE,
    ParameterDomain,
    SurrogateConfig,
    SurrogateModel,
    calibrate_with_surrogate,
    time_against_engine,
    train_surrogate,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _model(path: Path) -> tuple[SurrogateModel, str]:
    """The saved full model, or a small one trained on the spot (cached data under var/)."""
    if path.is_file():
        return SurrogateModel.load(path), f"loaded {path}"
    config = SurrogateConfig(n_train=8192, n_val=2048, epochs=20,
                             cache_dir=str(PROJECT_ROOT / DEFAULT_MODEL_DIR / "bench_data"))
    started = time.perf_counter()
    model = train_surrogate(config)
    return model, f"no model at {path}: trained a small one in {time.perf_counter() - started:.0f} s"


def main() -> int:
    """Print speed and calibration figures; returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=PROJECT_ROOT / DEFAULT_MODEL_DIR / MODEL_FILE)
    parser.add_argument("--surfaces", type=int, default=50, help="engine surfaces to calibrate to")
    args = parser.parse_args()
    torch.set_num_threads(1)

    model, origin = _model(args.model)
    print(origin)
    domain: ParameterDomain = model.domain
    params = domain.sample(4096, seed=2024)
    speed = time_against_engine(model, params)
    print(f"{'per surface':<22}{'single':>14}{'batched':>14}")
    print(f"{'engine iv_surface':<22}{speed['engine_single_s'] * 1e6:>11.1f} us"
          f"{speed['engine_batched_s'] * 1e6:>11.2f} us")
    print(f"{'surrogate predict':<22}{speed['surrogate_single_s'] * 1e6:>11.1f} us"
          f"{speed['surrogate_batched_s'] * 1e6:>11.3f} us")
    print(f"{'speed-up':<22}{speed['speedup_single']:>13.0f}x{speed['speedup_batched']:>13.0f}x"
          f"   (surrogate batched vs engine single call: {speed['speedup_batched_vs_engine_single']:.0f}x;"
          f" target 1000x batched)")

    truth = domain.sample(args.surfaces, seed=4048)
    surfaces = iv_surface(truth)
    calibrate_with_surrogate(surfaces[0], model)  # warm-up: float64 copy of the network
    for label, starts in (("cold start", [None] * len(truth)), ("warm start (truth)", list(truth))):
        seconds, rmses = [], []
        for surface, x0 in zip(surfaces, starts, strict=True):
            _, rmse, dt = calibrate_with_surrogate(surface, model, x0=x0)
            seconds.append(dt)
            rmses.append(rmse)
        print(f"calibration {label:<19} median {np.median(seconds) * 1e3:6.2f} ms, "
              f"p90 {np.percentile(seconds, 90) * 1e3:6.2f} ms, max {np.max(seconds) * 1e3:6.2f} ms; "
              f"median IV RMSE {np.median(rmses):.1e} against the engine surface (target < 20 ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
