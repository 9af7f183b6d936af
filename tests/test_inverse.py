"""Inverse Heston network: training regimes, prediction, persistence, evaluation and warm starts."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.typing import ArrayLike

from models import grid
from models.heston import iv_surface
from models.inverse import (
    InverseConfig,
    InverseModel,
    evaluate_inverse,
    load_surfaces,
    train_inverse,
    warm_start_benchmark,
)
from models.surrogate import (
    ParameterDomain,
    SurfacePCA,
    SurfaceSet,
    SurrogateConfig,
    SurrogateModel,
    SurrogateNet,
    generate_surfaces,
    grid_hash,
)

DOMAIN = ParameterDomain()
TINY = InverseConfig(n_train=4096, n_val=512, seed=3, epochs=15, batch_size=128, lr=3e-3,
                     cache_dir=None, progress=False)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sets() -> tuple[SurfaceSet, SurfaceSet]:
    """Labelled engine surfaces: a train and an independent validation set."""
    train = generate_surfaces(DOMAIN, TINY.n_train, 101, progress=False)
    val = generate_surfaces(DOMAIN, TINY.n_val, 202, progress=False)
    return train, val


@pytest.fixture(scope="module")
def tiny(sets: tuple[SurfaceSet, SurfaceSet]) -> InverseModel:
    """A synthetic-regime model trained for a few seconds."""
    return train_inverse(TINY, DOMAIN, *sets)


@pytest.fixture(scope="module")
def random_surrogate(sets: tuple[SurfaceSet, SurfaceSet]) -> SurrogateModel:
    """An untrained (random) surrogate: enough to exercise the re-pricing consistency gradient."""
    pca = SurfacePCA.fit(sets[0].surfaces, tolerance=1e-3)
    torch.manual_seed(0)
    net = SurrogateNet(16, 1, "silu", pca, DOMAIN)
    return SurrogateModel(net, DOMAIN, pca, SurrogateConfig(width=16, n_blocks=1, cache_dir=None))


class _Oracle:
    """Answers the parameters of the nearest known surface (so noisy copies still get their truth)."""

    def __init__(self, params: np.ndarray, surfaces: np.ndarray) -> None:
        self.params, self.flat = params, surfaces.reshape(surfaces.shape[0], -1)

    def predict(self, surfaces: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        s = np.asarray(surfaces)
        flat = s.reshape(-1, self.flat.shape[1])
        nearest = np.argmin(((flat[:, None, :] - self.flat[None]) ** 2).sum(axis=2), axis=1)
        params = self.params[nearest]
        return (params[0], s) if s.ndim == 2 else (params, s)


def test_tiny_training_beats_the_mean_predictor(tiny: InverseModel,
                                                sets: tuple[SurfaceSet, SurfaceSet]) -> None:
    val = sets[1]
    metrics = evaluate_inverse(tiny, val.surfaces, val.params, DOMAIN)
    baseline = tiny.info["baseline_val_param_mse"]
    assert 0.25 < baseline < 0.45  # uniform labels on [-1, 1]: variance 1/3
    assert metrics["unit_mse"] < baseline / 4.0
    assert tiny.info["epochs_run"] == TINY.epochs
    # The surface head reconstructs the input far better than the mean surface would.
    mean_rmse = np.sqrt(np.mean((val.surfaces - sets[0].surfaces.mean(axis=0)) ** 2))
    assert metrics["recon_rmse_median"] < mean_rmse / 5.0


def test_predict_shapes_and_domain_bounds(tiny: InverseModel, sets: tuple[SurfaceSet, SurfaceSet]) -> None:
    surfaces = sets[1].surfaces[:7]
    params, recon = tiny.predict(surfaces)
    assert params.shape == (7, 5) and recon.shape == (7, *grid.SHAPE)
    one_p, one_r = tiny.predict(surfaces[0])
    assert one_p.shape == (5,) and one_r.shape == grid.SHAPE
    # One surface is a batch of one: the same network, but oneDNN may sum a batch of 1 in another
    # order than a batch of 7, so float32 outputs agree to rounding (a few ulp in unit space,
    # where every parameter spans [-1, 1]), not bit for bit; rtol failed on a rho near zero.
    np.testing.assert_allclose(DOMAIN.to_unit(one_p), DOMAIN.to_unit(params[0]), rtol=0, atol=1e-6)
    # Even absurd inputs map inside the box (sigmoid heads).
    wild = np.concatenate([np.full((1, *grid.SHAPE), 5.0), np.full((1, *grid.SHAPE), 1e-3), surfaces])
    wild_params, _ = tiny.predict(wild)
    assert DOMAIN.contains(wild_params, slack=0.0).all()
    with pytest.raises(ValueError, match="shape"):
        tiny.predict(np.ones((3, 6, 10)))
    with pytest.raises(ValueError, match="finite"):
        tiny.predict(np.full(grid.SHAPE, np.nan))


def test_save_load_round_trip_and_grid_guard(tiny: InverseModel, sets: tuple[SurfaceSet, SurfaceSet],
                                            tmp_path: Path) -> None:
    tiny.metrics = {"note": "kept"}
    path = tiny.save(tmp_path / "inverse.pt")
    loaded = InverseModel.load(path)
    a, b = tiny.predict(sets[1].surfaces), loaded.predict(sets[1].surfaces)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert loaded.config == tiny.config and loaded.metrics == {"note": "kept"}
    assert loaded.domain == tiny.domain and loaded.info["n_train"] == TINY.n_train

    payload = torch.load(path, weights_only=True)
    meta = json.loads(payload["meta"])
    tampered = dict(meta, grid_hash="0" * 64)
    torch.save({"meta": json.dumps(tampered), "state_dict": payload["state_dict"]}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="corrupt or was edited"):
        InverseModel.load(tmp_path / "bad.pt")
    other_k = (grid.LOG_MONEYNESS * 1.1).tolist()
    other = dict(meta, grid={"log_moneyness": other_k, "maturities": meta["grid"]["maturities"]},
                 grid_hash=grid_hash(other_k, meta["grid"]["maturities"]))
    torch.save({"meta": json.dumps(other), "state_dict": payload["state_dict"]}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="another grid"):
        InverseModel.load(tmp_path / "other.pt")


def test_evaluate_inverse_on_a_hand_made_case(sets: tuple[SurfaceSet, SurfaceSet]) -> None:
    truth = sets[1].params[:40]
    surfaces = sets[1].surfaces[:40]
    exact = evaluate_inverse(_Oracle(truth, surfaces), surfaces, truth, DOMAIN)
    assert exact["repriced_fraction_ok"] == 1.0 and exact["repriced_rmse_median"] < 1e-9
    assert all(m["mae"] == 0.0 for m in exact["params"].values())

    wrong = truth.copy()
    wrong[::2, 0] += 0.1  # kappa off by exactly 0.1 on half the rows
    wrong[::4, 4] = np.minimum(wrong[::4, 4] * 1.5 + 0.02, DOMAIN.hi[4])  # v0 far off on a quarter
    result = evaluate_inverse(_Oracle(wrong, surfaces), surfaces, truth, DOMAIN)
    rmse = np.sqrt(np.mean((iv_surface(wrong) - surfaces).reshape(40, -1) ** 2, axis=1))
    assert result["repriced_fraction_ok"] == pytest.approx(np.mean(rmse <= 0.005))
    assert 0.0 < result["repriced_fraction_ok"] < 1.0
    assert result["params"]["kappa"]["mae"] == pytest.approx(0.05)
    assert result["params"]["kappa"]["mae_rel_width"] == pytest.approx(0.05 / (DOMAIN.hi[0] - DOMAIN.lo[0]))
    assert result["params"]["rho"]["mae"] == 0.0


def test_self_supervised_with_frozen_heads_keeps_them(tiny: InverseModel, sets: tuple[SurfaceSet, SurfaceSet],
                                                      random_surrogate: SurrogateModel) -> None:
    rng = np.random.default_rng(0)
    unlabelled = sets[1].surfaces + 0.003 * rng.standard_normal(sets[1].surfaces.shape)
    config = replace(TINY, regime="self_supervised", epochs=2, consistency_weight=1.0,
                     freeze_param_heads=True)

    def heads(model: InverseModel) -> list[torch.Tensor]:
        return [p.detach().clone() for p in model.net.param_heads.parameters()]

    frozen = train_inverse(config, DOMAIN, val_set=sets[1], unlabelled=unlabelled, surrogate=random_surrogate,
                           init=tiny)
    assert all(torch.equal(a, b) for a, b in zip(heads(frozen), heads(tiny), strict=True))
    trunk_changed = any(not torch.equal(a, b) for a, b in
                        zip(frozen.net.trunk.parameters(), tiny.net.trunk.parameters(), strict=True))
    assert trunk_changed
    assert "val_param" not in frozen.history[-1] and "val_consistency" in frozen.history[-1]
    # Control: the same run without freezing moves the heads (the consistency term reaches them).
    free = train_inverse(replace(config, freeze_param_heads=False), DOMAIN, val_set=sets[1],
                         unlabelled=unlabelled, surrogate=random_surrogate, init=tiny)
    assert any(not torch.equal(a, b) for a, b in zip(heads(free), heads(tiny), strict=True))
    # The starting model itself is untouched.
    assert all(p.requires_grad for p in tiny.net.parameters())


def test_mixed_regime_trains_on_both_kinds(sets: tuple[SurfaceSet, SurfaceSet]) -> None:
    train, val = sets
    unlabelled = train.surfaces[:1024] + 0.002
    config = replace(TINY, regime="mixed", epochs=2, labelled_fraction=0.75)
    model = train_inverse(config, DOMAIN, train, val, unlabelled=unlabelled)
    assert model.info["n_train"] == train.params.shape[0] + 1024
    assert model.info["n_labelled"] == train.params.shape[0]
    assert "val_param" in model.history[-1]
    with pytest.raises(ValueError, match="mixed"):
        train_inverse(config, DOMAIN, train, val)


def test_seeded_training_is_reproducible(sets: tuple[SurfaceSet, SurfaceSet]) -> None:
    short = replace(TINY, epochs=2, noise_vol=0.003)
    a = train_inverse(short, DOMAIN, *sets).net.state_dict()
    b = train_inverse(short, DOMAIN, *sets).net.state_dict()
    c = train_inverse(replace(short, seed=4), DOMAIN, *sets).net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="regime"):
        InverseConfig(regime="reinforced")
    with pytest.raises(ValueError, match="labelled_fraction"):
        InverseConfig(labelled_fraction=1.0)


def test_load_surfaces_slices_a_larger_cached_set(tmp_path: Path) -> None:
    big = generate_surfaces(DOMAIN, 200, 77, cache_dir=tmp_path, progress=False)
    small = load_surfaces(DOMAIN, 120, 77, cache_dir=tmp_path, progress=False)
    assert small.from_cache and np.array_equal(small.params, big.params[:120])
    fresh = generate_surfaces(DOMAIN, 120, 77, progress=False)
    assert np.array_equal(fresh.params, small.params)
    # Another domain does not match the cached file, so it is priced afresh.
    other = ParameterDomain(upper=(8.0, 1.0, 2.5, 0.2, 0.9))
    assert not load_surfaces(other, 50, 77, cache_dir=tmp_path, progress=False).from_cache


def test_warm_start_from_the_truth_is_no_slower(sets: tuple[SurfaceSet, SurfaceSet]) -> None:
    truth = sets[1].params
    result = warm_start_benchmark(_Oracle(truth, sets[1].surfaces), sets[1].surfaces, n=1, seed=1)
    assert result["n"] == 1
    assert result["warm_median_iterations"] <= result["cold_median_iterations"]
    assert result["fraction_same_rmse"] == 1.0
    ratio = result["cold_median_seconds"] / result["warm_median_seconds"]
    assert result["time_ratio"] == pytest.approx(ratio)
