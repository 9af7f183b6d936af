"""Benchmark: what the world model costs a hedger per decision (encode, forecast, hallucinate) on one thread.

Loads ``var/models/world_model/world_model.pt`` when present (the full run of ``world_model_main``), else
trains a small model (128 paths × 32 weekly steps, a few seconds) so the script always runs. Prints the
time of sequence generation per surface, encode/decode one at a time and batched, ``predict_next``, a
26-step ``rollout`` and a ``hallucinate`` call.
Run: ``python bench/bench_world_model.py``.
"""

from __future__ import annotations

import os

# Before numpy loads: the pricer's complex matrix products would otherwise use every core.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.world_model import (
    DEFAULT_MODEL_DIR,
    MODEL_FILE,
    WorldModel,
    WorldModelConfig,
    hallucinate,
    surface_sequences,
    train_world_model,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _model() -> tuple[WorldModel, str]:
    """The saved full model, or a small one trained on the spot."""
    path = PROJECT_ROOT / DEFAULT_MODEL_DIR / MODEL_FILE
    if path.is_file():
        return WorldModel.load(path), f"saved model {path.relative_to(PROJECT_ROOT)}"
    config = WorldModelConfig(n_paths=128, steps=32, vae_epochs=10, dyn_epochs=10)
    return train_world_model(config), "small model trained now (128 paths × 32 steps)"


def _best(run: Callable[[], object], repeats: int = 5) -> float:
    """Best wall time of ``repeats`` calls (the least disturbed by the other process on the machine)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    """Print the timing table."""
    torch.set_num_threads(1)
    model, source = _model()
    print(f"world model: {source}")
    t0 = time.perf_counter()
    data = surface_sequences(64, model.config.steps, model.config.dt, seed=123)
    gen = time.perf_counter() - t0
    n = data.surfaces.shape[0] * data.surfaces.shape[1]
    flat = data.surfaces.reshape(-1, *data.surfaces.shape[2:])
    history = model.encode(data.surfaces[0, :26])
    latents = model.encode(flat)
    rows = [
        ("generate sequences (per surface)", gen / n),
        ("encode one surface", _best(lambda: model.encode(flat[:1]))),
        ("encode batched (per surface)", _best(lambda: model.encode(flat)) / n),
        ("decode one latent", _best(lambda: model.decode(latents[:1]))),
        ("decode batched (per surface)", _best(lambda: model.decode(latents)) / n),
        ("predict_next (26-step history)", _best(lambda: model.predict_next(history))),
        ("rollout 26 steps", _best(lambda: model.rollout(history, 26))),
        ("hallucinate 26 steps + decode", _best(lambda: hallucinate(model, history, 1.5, 26))),
    ]
    for name, seconds in rows:
        print(f"{name:<36}{seconds * 1e6:>12.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
