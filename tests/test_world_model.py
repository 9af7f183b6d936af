"""World model: regime-switching surface sequences, β-VAE, latent dynamics, SSIM, energy, counterfactuals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models import grid
from models.surrogate import grid_hash
from models.world_model import (
    ATM_ROW,
    WorldModel,
    WorldModelConfig,
    fill_invalid,
    hallucinate,
    latent_energy,
    ssim,
    stationary_distribution,
    surface_sequences,
    train_world_model,
)

TINY = WorldModelConfig(n_paths=24, steps=16, latent_dim=4, channels=8, hidden=64, vae_epochs=40,
                        vae_batch=32, dyn_hidden=16, dyn_epochs=15, dyn_batch=8, seed=7, max_seconds=60.0)


@pytest.fixture(scope="module")
def data():
    """Small seeded sequences (the tiny model's training set)."""
    return surface_sequences(TINY.n_paths, TINY.steps, TINY.dt, seed=3)


@pytest.fixture(scope="module")
def model(data) -> WorldModel:
    """One tiny world model shared by the tests (a second or two on one thread)."""
    return train_world_model(TINY, data)


def test_sequences_shapes_labels_and_determinism(data) -> None:
    assert data.surfaces.shape == (TINY.n_paths, TINY.steps, *grid.SHAPE)
    assert data.labels.shape == data.variance.shape == (TINY.n_paths, TINY.steps)
    assert set(np.unique(data.labels)) <= {0, 1}
    assert np.isfinite(data.surfaces).all() and (data.surfaces > 1e-4).all()
    again = surface_sequences(TINY.n_paths, TINY.steps, TINY.dt, seed=3)
    np.testing.assert_array_equal(again.surfaces, data.surfaces)
    np.testing.assert_array_equal(again.labels, data.labels)
    other = surface_sequences(TINY.n_paths, TINY.steps, TINY.dt, seed=4)
    assert not np.array_equal(other.surfaces, data.surfaces)


def test_crash_steps_have_higher_atm_iv(data) -> None:
    atm = data.surfaces[..., ATM_ROW, 0]
    assert (data.labels == 1).sum() >= 10 and (data.labels == 0).sum() >= 10
    assert atm[data.labels == 1].mean() > 1.2 * atm[data.labels == 0].mean()


def test_stationary_law_and_entry_jump() -> None:
    np.testing.assert_allclose(stationary_distribution([4.0, 26.0]), [26.0 / 30.0, 4.0 / 30.0], atol=1e-12)
    # Crash entries jump the variance up to the crash's θ = 0.16: a bull step is never followed by a
    # crash step with variance below it.
    seqs = surface_sequences(64, 12, seed=11)
    entered = (seqs.labels[:, 1:] == 1) & (seqs.labels[:, :-1] == 0)
    assert entered.any()
    assert (seqs.variance[:, 1:][entered] >= 0.16 - 1e-12).all()


def test_sequence_cache_round_trip(tmp_path: Path) -> None:
    first = surface_sequences(4, 5, seed=1, cache_dir=tmp_path)
    second = surface_sequences(4, 5, seed=1, cache_dir=tmp_path)
    assert not first.from_cache and second.from_cache
    np.testing.assert_array_equal(first.surfaces, second.surfaces)
    np.testing.assert_array_equal(first.labels, second.labels)


def test_fill_invalid_uses_nearest_valid_strike() -> None:
    surface = np.full(grid.SHAPE, 0.3)
    surface[:, 2] = np.linspace(0.2, 0.5, grid.N_STRIKES)
    surface[0, 2], surface[-1, 2], surface[-2, 2] = np.nan, 0.0, np.nan
    filled, n = fill_invalid(surface)
    assert n == 3
    assert filled[0, 2] == surface[1, 2] and filled[-1, 2] == filled[-2, 2] == surface[-3, 2]
    np.testing.assert_array_equal(np.delete(filled, 2, axis=1), np.delete(surface, 2, axis=1))


def test_vae_beats_mean_surface(model: WorldModel, data) -> None:
    flat = data.surfaces.reshape(-1, *grid.SHAPE)
    recon = model.decode(model.encode(flat))
    vae_mse = np.mean((recon - flat) ** 2)
    mean_mse = np.mean((flat.mean(axis=0) - flat) ** 2)
    assert vae_mse < mean_mse / 20.0


def test_rollout_and_predict_shapes(model: WorldModel, data) -> None:
    latents = model.encode(data.surfaces[:3, :8])
    d = TINY.latent_dim
    assert latents.shape == (3, 8, d)
    assert model.rollout(latents[0], 5).shape == (5, d)
    assert model.rollout(latents, 5).shape == (3, 5, d)
    assert model.predict_next(latents[0]).shape == (d,)
    raw = model.rollout(latents[0], 3, reencode=False)
    np.testing.assert_allclose(model.predict_next(latents[0]), raw[0], atol=1e-6)
    # Re-encoding keeps a long free run near the training latents (energy of order the latent size).
    long_run = model.rollout(latents[0], 40)
    assert np.isfinite(long_run).all() and model.energy(long_run).max() < 50.0 * TINY.latent_dim
    shocked = model.rollout(latents[0], 5, shock=np.full(d, 2.0))
    assert not np.allclose(shocked, model.rollout(latents[0], 5))
    assert model.decode(model.rollout(latents, 4)).shape == (3, 4, *grid.SHAPE)


def test_latent_energy_is_mahalanobis(model: WorldModel, data) -> None:
    z = model.encode(data.surfaces.reshape(-1, *grid.SHAPE))
    energy = model.energy(z)
    assert abs(energy.mean() - TINY.latent_dim) < 0.05 * TINY.latent_dim
    np.testing.assert_allclose(latent_energy(np.ones(2), np.zeros(2), np.diag([1.0, 4.0])), 5.0)


def test_save_load_round_trip_and_grid_refusal(model: WorldModel, data, tmp_path: Path) -> None:
    path = model.save(tmp_path / "wm.pt")
    loaded = WorldModel.load(path)
    latents = model.encode(data.surfaces[0])
    np.testing.assert_array_equal(loaded.encode(data.surfaces[0]), latents)
    np.testing.assert_array_equal(loaded.decode(latents), model.decode(latents))
    np.testing.assert_array_equal(loaded.rollout(latents, 4), model.rollout(latents, 4))
    np.testing.assert_array_equal(loaded.latent_precision, model.latent_precision)
    assert loaded.config == model.config and loaded.centroids == model.centroids

    payload = torch.load(path, weights_only=True)
    meta = json.loads(payload["meta"])
    other_k = (grid.LOG_MONEYNESS * 1.1).tolist()
    meta["grid"]["log_moneyness"] = other_k
    meta["grid_hash"] = grid_hash(other_k, grid.MATURITIES)
    payload["meta"] = json.dumps(meta)
    torch.save(payload, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="another grid"):
        WorldModel.load(tmp_path / "other.pt")


def test_ssim_identity_and_noise() -> None:
    rng = np.random.default_rng(0)
    x = 0.4 + 0.05 * np.add.outer(np.linspace(-1, 1, 10) ** 2, np.linspace(0, 1, 6))
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    noise = rng.standard_normal(x.shape)
    small, large = ssim(x, x + 0.002 * noise), ssim(x, x + 0.02 * noise)
    assert 1.0 > small > large
    batch = np.stack([x, x + 0.02 * noise])
    np.testing.assert_allclose(ssim(batch, batch), [1.0, 1.0], atol=1e-12)


def test_hallucinate_shock_raises_energy(model: WorldModel, data) -> None:
    calm = np.flatnonzero((data.labels == 0).all(axis=1))
    assert calm.size
    history = data.surfaces[calm[0], :8]
    result = hallucinate(model, history, shock_scale=1.5, steps=6)
    assert result.surfaces.shape == (7, *grid.SHAPE)
    assert result.latents.shape == (7, TINY.latent_dim) and result.energy.shape == (7,)
    assert result.energy[0] > result.start_energy
    assert result.surfaces[0, ATM_ROW, 0] > model.decode(model.encode(history[-1]))[ATM_ROW, 0]
