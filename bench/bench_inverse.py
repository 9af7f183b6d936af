"""Benchmark: the inverse Heston network's prediction time and its value as a calibration warm start.

Loads ``var/models/inverse/inverse.pt`` when present (the full run of ``inverse_main``), else trains a small
model (8192 surfaces, 20 epochs, under a minute) so the script always runs. Prints the time per surface of
``InverseModel.predict`` one at a time and batched, then calibrates noisy held-out engine surfaces
(0.5 vol-point noise) with ``models.calibration.calibrate`` cold and from the network's guess. Target:
the warm start at least halves the median calibration time at the same fit RMSE. One thread throughout.
Run: ``python bench/bench_inverse.py [--n 20]``.
"""

from __future__ import annotations

import os

# Before numpy loads: the engine's complex matrix products would otherwise use every core.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.inverse import (
    DEFAULT_MODEL_DIR,
    MODEL_FILE,
    InverseConfig,
    InverseModel,
    load_surfaces,
    train_inverse,
    warm_start_benchmark,
)
from models.surrogate import ParameterDomain

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CACHE = PROJECT_ROOT / "var/models/surrogate/data"


def _model() -> tuple[InverseModel, str]:
    """The saved full model, or a small one trained on the spot."""
    path = PROJECT_ROOT / DEFAULT_MODEL_DIR / MODEL_FILE
    if path.is_file():
        return InverseModel.load(path), f"saved model {path.relative_to(PROJECT_ROOT)}"
    config = InverseConfig(n_train=8192, n_val=1024, epochs=20, cache_dir=str(CACHE), progress=False)
    return train_inverse(config), "small model trained now (8192 surfaces, 20 epochs)"


def _per_surface(run: object, n: int, repeats: int = 3) -> float:
    """Best-of-``repeats`` wall time of ``run()`` divided by ``n``."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()  # type: ignore[operator]
        best = min(best, time.perf_counter() - started)
    return best / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="surfaces in the warm-start benchmark")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, origin = _model()
    print(f"inverse model: {origin}")
    test = load_surfaces(ParameterDomain(), 16384, 2_000_003, cache_dir=CACHE, progress=False)
    surfaces = test.surfaces
    model.predict(surfaces[:256])
    single = _per_surface(lambda: [model.predict(s) for s in surfaces[:50]], 50)
    batched = _per_surface(lambda: model.predict(surfaces), surfaces.shape[0])
    print(f"predict per surface: {single * 1e6:.0f} us one at a time, {batched * 1e6:.2f} us batched "
          f"({surfaces.shape[0]} surfaces)")
    result = warm_start_benchmark(model, surfaces, n=args.n, seed=0)
    print(f"warm start on {result['n']} noisy surfaces (noise {result['noise_vol']} vol):")
    print(f"  cold: median {result['cold_median_seconds'] * 1e3:.0f} ms, "
          f"{result['cold_median_iterations']:.0f} LM iterations, RMSE {result['cold_median_rmse']:.5f}")
    print(f"  warm: median {result['warm_median_seconds'] * 1e3:.0f} ms (predict "
          f"{result['predict_median_seconds'] * 1e3:.2f} ms), {result['warm_median_iterations']:.0f} LM "
          f"iterations, RMSE {result['warm_median_rmse']:.5f}")
    print(f"  ratio cold/warm x{result['time_ratio']:.2f} (target >= 2); same RMSE on "
          f"{100 * result['fraction_same_rmse']:.0f} % (max excess {result['max_rmse_excess']:.1e})")
    ratio = result["warm_median_rmse"] / result["noise_vol"]
    print(f"  median warm-start fit RMSE / noise level: {ratio:.2f}")


if __name__ == "__main__":
    main()
