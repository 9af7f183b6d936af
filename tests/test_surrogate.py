"""Neural surrogate pricer: sampling, data, PCA, loss, training, persistence, metrics, calibration."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from models import grid
from models.heston import iv_surface
from models.surrogate import _BATCH_LAYOUT_ROWS as BATCH_LAYOUT_ROWS
from models.surrogate import (
    IV_FLOOR,
    ParameterDomain,
    SurfaceLoss,
    SurfacePCA,
    SurfaceSet,
    Surrogate,
    SurrogateConfig,
    SurrogateModel,
    bucket_masks,
    calibrate_with_surrogate,
    evaluate,
    expected_vol,
    generate_surfaces,
    surface_metrics,
    surrogate_main,
    train_surrogate,
    write_report,
)

DOMAIN = ParameterDomain()
TINY = SurrogateConfig(n_train=1024, n_val=256, seed=1, width=32, n_blocks=2, epochs=40, batch_size=64,
                       lr=5e-3, warmup_epochs=1, cache_dir=None, progress=False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """The machine is shared: one intra-op thread keeps the tests' cost (and results) predictable."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def engine_sets() -> tuple[SurfaceSet, SurfaceSet]:
    """1024 training and 256 validation surfaces priced by the engine (under a second)."""
    return (generate_surfaces(DOMAIN, 1024, seed=3, progress=False),
            generate_surfaces(DOMAIN, 256, seed=4, progress=False))


@pytest.fixture(scope="module")
def tiny_model(engine_sets: tuple[SurfaceSet, SurfaceSet]) -> SurrogateModel:
    train, val = engine_sets
    return train_surrogate(TINY, DOMAIN, train, val)


# ---------------------------------------------------------------------------------------------- domain


@pytest.mark.parametrize("method", ["sobol", "uniform"])
def test_domain_sampling_is_seeded_and_inside_the_box(method: str) -> None:
    first = DOMAIN.sample(1000, seed=7, method=method)
    again = DOMAIN.sample(1000, seed=7, method=method)
    other = DOMAIN.sample(1000, seed=8, method=method)
    assert first.shape == (1000, 5)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    assert DOMAIN.contains(first).all()
    # A longer draw extends a shorter one, which is what lets rejected points be topped up.
    np.testing.assert_array_equal(DOMAIN.sample(1500, seed=7, method=method)[:1000], first)
    # The box spans the whole range of every parameter and contains Feller violations on purpose.
    unit = DOMAIN.to_unit(first)
    assert (unit.min(axis=0) < -0.99).all() and (unit.max(axis=0) > 0.99).all()
    assert 0.1 < DOMAIN.feller_fraction(first) < 0.9


def test_domain_maps_round_trip_and_reject_bad_bounds() -> None:
    points = DOMAIN.sample(64, seed=1)
    np.testing.assert_allclose(DOMAIN.from_unit(DOMAIN.to_unit(points)), points, rtol=1e-14)
    np.testing.assert_allclose(DOMAIN.to_unit(DOMAIN.lo), -1.0)
    np.testing.assert_allclose(DOMAIN.to_unit(DOMAIN.hi), 1.0)
    assert not DOMAIN.contains(DOMAIN.hi * 1.01)[0]
    with pytest.raises(ValueError, match="lower < upper"):
        ParameterDomain(lower=(8.0, 0.01, 0.1, -0.9, 0.01), upper=(0.2, 1.0, 2.5, 0.2, 1.0))
    with pytest.raises(ValueError, match="rho"):
        ParameterDomain(lower=(0.2, 0.01, 0.1, -1.0, 0.01))


# ---------------------------------------------------------------------------------------------- data


def _flaky_pricer(calls: list[int]) -> object:
    """Engine stand-in: NaN where kappa > 6 and an IV of 0 where rho > 0.1, else a smooth fake surface."""

    def price(params: np.ndarray) -> np.ndarray:
        calls.append(params.shape[0])
        surfaces = np.sqrt(params[:, 1])[:, None, None] * np.ones((1, *grid.SHAPE))
        surfaces[params[:, 0] > 6.0] = np.nan
        surfaces[params[:, 3] > 0.1, 0, 0] = 0.0
        return surfaces

    return price


def test_generate_surfaces_replaces_rejected_points_and_counts_them(tmp_path: Path) -> None:
    calls: list[int] = []
    made = generate_surfaces(DOMAIN, 500, seed=5, batch_size=128, cache_dir=tmp_path, progress=False,
                             pricer=_flaky_pricer(calls))
    assert made.params.shape == (500, 5) and made.surfaces.shape == (500, *grid.SHAPE)
    assert np.isfinite(made.surfaces).all() and (made.surfaces > IV_FLOOR).all()
    assert (made.params[:, 0] <= 6.0).all() and (made.params[:, 3] <= 0.1).all()
    # The kept points are the first valid ones of the seeded sequence, in order; every invalid point
    # drawn before the last kept one is counted.
    drawn = DOMAIN.sample(4096, seed=5)
    valid = (drawn[:, 0] <= 6.0) & (drawn[:, 3] <= 0.1)
    last = np.flatnonzero(valid)[499]
    np.testing.assert_array_equal(made.params, drawn[: last + 1][valid[: last + 1]])
    assert made.n_rejected == int((~valid[: last + 1]).sum()) > 0
    assert not made.from_cache

    def must_not_price(params: np.ndarray) -> np.ndarray:
        raise AssertionError("a cached set was priced again")

    cached = generate_surfaces(DOMAIN, 500, seed=5, cache_dir=tmp_path, progress=False, pricer=must_not_price)
    assert cached.from_cache and cached.n_rejected == made.n_rejected
    np.testing.assert_array_equal(cached.surfaces, made.surfaces)
    # A different seed is a different set, not a cache hit.
    with pytest.raises(AssertionError, match="priced again"):
        generate_surfaces(DOMAIN, 500, seed=6, cache_dir=tmp_path, progress=False, pricer=must_not_price)


def test_engine_surfaces_are_valid(engine_sets: tuple[SurfaceSet, SurfaceSet]) -> None:
    train, _ = engine_sets
    assert train.surfaces.shape == (1024, *grid.SHAPE)
    assert np.isfinite(train.surfaces).all() and (train.surfaces > IV_FLOOR).all()


# ---------------------------------------------------------------------------------------------- PCA


@pytest.mark.parametrize("log", [False, True])
def test_pca_keeps_fewest_components_meeting_the_tolerance(
        engine_sets: tuple[SurfaceSet, SurfaceSet], log: bool) -> None:
    train, val = engine_sets
    pca = SurfacePCA.fit(train.surfaces, tolerance=1e-5, log=log)
    k = pca.n_components
    recon = pca.decode(pca.encode(train.surfaces))
    rmse = np.sqrt(np.mean((recon - train.surfaces) ** 2))
    assert rmse <= 1e-5
    assert rmse == pytest.approx(pca.recon_rmse[k - 1], rel=1e-6)
    assert pca.recon_rmse[k - 2] > 1e-5  # one component fewer would miss the tolerance
    assert k < 60  # the surfaces really are compressible
    # Held-out surfaces are not fitted, but the basis still carries them to a few 1e-5 of vol.
    held_out = np.sqrt(np.mean((pca.decode(pca.encode(val.surfaces)) - val.surfaces) ** 2))
    assert held_out < 1e-4


def test_pca_with_all_components_is_exact(engine_sets: tuple[SurfaceSet, SurfaceSet]) -> None:
    train, val = engine_sets
    pca = SurfacePCA.fit(train.surfaces, tolerance=0.0)
    assert pca.n_components == 60
    np.testing.assert_allclose(pca.decode(pca.encode(val.surfaces)), val.surfaces, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------- loss


def test_loss_weights_otm_puts_and_penalises_only_curved_errors() -> None:
    loss = SurfaceLoss(huber_delta=1.0, smoothness_weight=0.0, otm_put_weight=3.0)
    truth = torch.full((1, *grid.SHAPE), 0.5)
    assert float(loss(truth, truth)) == 0.0
    put_row = int(np.flatnonzero(grid.LOG_MONEYNESS < 0)[0])
    call_row = int(np.flatnonzero(grid.LOG_MONEYNESS > 0)[0])
    put_miss, call_miss = truth.clone(), truth.clone()
    put_miss[0, put_row, 0] *= 1.001  # 0.1 % off: inside the Huber quadratic zone
    call_miss[0, call_row, 0] *= 1.001
    assert float(loss(put_miss, truth)) == pytest.approx(3.0 * float(loss(call_miss, truth)), rel=1e-4)

    smooth = SurfaceLoss(huber_delta=1.0, smoothness_weight=1.0, otm_put_weight=1.0)
    plain = SurfaceLoss(huber_delta=1.0, smoothness_weight=0.0, otm_put_weight=1.0)
    i = torch.arange(grid.N_STRIKES, dtype=torch.float32)[:, None]
    j = torch.arange(grid.N_MATURITIES, dtype=torch.float32)[None, :]
    linear_error = truth * (1.0 + 1e-4 * (i + 2.0 * j))  # relative error linear in both grid indices
    curved_error = truth * (1.0 + 1e-4 * (i**2 + j**2))
    assert float(smooth(linear_error, truth)) == pytest.approx(float(plain(linear_error, truth)), rel=1e-4)
    assert float(smooth(curved_error, truth)) > float(plain(curved_error, truth)) + 1e-5


def test_absolute_loss_weighs_the_same_iv_miss_alike_at_any_level() -> None:
    relative = SurfaceLoss(huber_delta=1.0, smoothness_weight=0.0, otm_put_weight=1.0)
    absolute = SurfaceLoss(huber_delta=1.0, smoothness_weight=0.0, otm_put_weight=1.0,
                           error_units="absolute", reference_iv=0.5)
    low, high = torch.full((1, *grid.SHAPE), 0.2), torch.full((1, *grid.SHAPE), 0.8)
    # The same 0.001 IV miss everywhere: a quarter of the relative error on the high-vol surface, so a
    # sixteenth of the (quadratic) loss.
    low_loss = float(relative(low + 1e-3, low))
    assert float(relative(high + 1e-3, high)) == pytest.approx(low_loss / 16.0, rel=1e-3)
    assert float(absolute(high + 1e-3, high)) == pytest.approx(float(absolute(low + 1e-3, low)), rel=1e-3)
    # Against the 0.5 reference, a 0.001 miss is a 0.2 % error: Huber's quadratic zone, 0.5·0.2².
    assert float(absolute(low + 1e-3, low)) == pytest.approx(0.5 * 0.2**2, rel=1e-3)
    with pytest.raises(ValueError, match="error_units must be one of"):
        SurfaceLoss(1.0, 0.0, 1.0, error_units="percent")
    with pytest.raises(ValueError, match="error_units must be one of"):
        replace(TINY, error_units="percent")


# ---------------------------------------------------------------------------------------------- training


def test_tiny_training_beats_the_mean_surface_by_a_wide_margin(tiny_model: SurrogateModel) -> None:
    info = tiny_model.info
    assert info["best_val_loss"] < info["baseline_val_loss"] / 10.0
    assert tiny_model.history[-1]["val_rmse"] < info["baseline_val_rmse"] / 5.0
    assert tiny_model.history[-1]["val_loss"] < tiny_model.history[0]["val_loss"]
    assert info["epochs_run"] == TINY.epochs


def test_training_is_deterministic_for_a_seed(engine_sets: tuple[SurfaceSet, SurfaceSet],
                                               tiny_model: SurrogateModel) -> None:
    train, val = engine_sets
    short = replace(TINY, epochs=3)
    params = val.params[:32]
    first = train_surrogate(short, DOMAIN, train, val).predict(params)
    second = train_surrogate(short, DOMAIN, train, val).predict(params)
    other_seed = train_surrogate(replace(short, seed=2), DOMAIN, train, val).predict(params)
    np.testing.assert_array_equal(first, second)
    assert not np.allclose(first, other_seed)


def _assert_predicts_like_the_module(model: SurrogateModel, params: np.ndarray) -> None:
    """``predict`` against the module's own forward, in both layouts: few rows and many rows."""
    many = params[np.arange(BATCH_LAYOUT_ROWS) % params.shape[0]]
    for rows in (params, many, many[::-1]):  # reversed: a view with a negative stride
        with torch.no_grad():
            reference = model.net(torch.from_numpy(DOMAIN.to_unit(rows)).float()).numpy()
        predicted = model.predict(rows)
        np.testing.assert_allclose(predicted, reference, rtol=2e-5, atol=1e-6)
        assert predicted.dtype == np.float32 and predicted.shape == (rows.shape[0], *grid.SHAPE)
        # Chunked prediction writes each chunk in place: the same surfaces as one chunk.
        np.testing.assert_allclose(model.predict(rows, batch_size=7), predicted, rtol=1e-6, atol=1e-7)


def test_fast_predict_matches_the_module_forward(tiny_model: SurrogateModel,
                                                 engine_sets: tuple[SurfaceSet, SurfaceSet]) -> None:
    params = engine_sets[1].params
    assert params.shape[0] < BATCH_LAYOUT_ROWS
    _assert_predicts_like_the_module(tiny_model, params)
    # Many rows come back as a view of rows padded to 64 floats, the same surfaces as few rows give
    # up to float32 rounding (the two layouts sum in different orders).
    many = tiny_model.predict(params[np.arange(BATCH_LAYOUT_ROWS) % params.shape[0]])
    assert not many.flags.c_contiguous and many.strides[0] == 64 * many.itemsize
    np.testing.assert_allclose(many[: params.shape[0]], tiny_model.predict(params), rtol=1e-6, atol=2e-7)
    assert tiny_model.predict(params[0]).shape == grid.SHAPE
    with pytest.raises(ValueError, match="outside the surrogate's domain"):
        tiny_model.predict(DOMAIN.hi * 2.0)
    with pytest.raises(ValueError, match="outside the surrogate's domain"):
        tiny_model.predict(np.where(np.arange(5) == 2, DOMAIN.hi * (1 + 1e-7), DOMAIN.lo))
    with pytest.raises(ValueError, match="outside the surrogate's domain"):
        tiny_model.predict(np.where(np.arange(5) == 2, np.nan, DOMAIN.lo))
    assert tiny_model.predict(np.empty((0, 5))).shape == (0, *grid.SHAPE)
    # The same check in the many-rows layout: rows on the box's faces pass, one row outside fails.
    faces = np.stack([DOMAIN.lo, DOMAIN.hi])[np.arange(BATCH_LAYOUT_ROWS) % 2]
    assert np.isfinite(tiny_model.predict(faces)).all()
    # 1e-7 past a face is refused too: the float32 bound near a face is decided again in float64.
    outside = ((2, DOMAIN.hi[2] * 1.001), (0, DOMAIN.lo[0] * 0.999), (2, DOMAIN.hi[2] * (1 + 1e-7)),
               (4, np.nan))
    for column, wrong in outside:
        rows = faces.copy()
        rows[-1, column] = wrong
        with pytest.raises(ValueError, match="1 parameter row"):
            tiny_model.predict(rows)


def test_one_layer_blocks_predict_fast_and_round_trip(engine_sets: tuple[SurfaceSet, SurfaceSet],
                                                     tiny_model: SurrogateModel, tmp_path: Path) -> None:
    train, val = engine_sets
    model = train_surrogate(replace(TINY, epochs=3, block_layers=1), DOMAIN, train, val)
    blocks = model.net.blocks
    assert all(block.fc2 is None for block in blocks) and len(blocks) == TINY.n_blocks
    width = TINY.width
    assert model.info["n_weights"] == tiny_model.info["n_weights"] - TINY.n_blocks * (width * width + width)
    _assert_predicts_like_the_module(model, val.params)
    loaded = Surrogate.load(model.save(tmp_path / "one_layer.pt"))
    assert loaded.config.block_layers == 1
    np.testing.assert_array_equal(loaded.predict(val.params), model.predict(val.params))
    with pytest.raises(ValueError, match="block_layers must be 1 or 2"):
        replace(TINY, block_layers=3)


@pytest.mark.parametrize("options", [
    {"activation": "gelu", "log_inputs": False, "log_surface": True},
    {"activation": "tanh", "block_layers": 1, "expected_vol_base": True},
], ids=["gelu-log-surface", "tanh-expected-vol"])
def test_both_prediction_layouts_follow_every_network_option(engine_sets: tuple[SurfaceSet, SurfaceSet],
                                                             options: dict[str, object]) -> None:
    train, val = engine_sets
    model = train_surrogate(replace(TINY, epochs=1, **options), DOMAIN, train, val)
    _assert_predicts_like_the_module(model, val.params)


def test_expected_vol_is_the_engines_atm_vol_without_vol_of_vol() -> None:
    # Two parameter sets with σ → 0 (outside the training box, on purpose): the engine's ATM implied
    # vol is then √ of the expected mean variance, the smile level the network is given.
    params = np.array([[2.0, 0.09, 1e-3, -0.5, 0.36], [0.5, 0.5, 1e-3, 0.0, 0.04]])
    atm = int(np.flatnonzero(grid.LOG_MONEYNESS == 0.0)[0])
    engine_atm = iv_surface(params)[:, atm, :]
    level = expected_vol(torch.from_numpy(params), torch.tensor(grid.MATURITIES)).numpy()
    np.testing.assert_allclose(level, engine_atm, rtol=1e-4)
    # Against a direct quadrature of E[v_t] = θ + (v0 − θ)e^{−κt} over [0, T].
    kappa, theta, v0 = params[0, 0], params[0, 1], params[0, 4]
    maturity = float(grid.MATURITIES[-1])
    integral, _ = quad(lambda t: theta + (v0 - theta) * np.exp(-kappa * t), 0.0, maturity)
    np.testing.assert_allclose(level[0, -1] ** 2, integral / maturity, rtol=1e-12)


def test_expected_vol_base_predicts_fast_and_round_trip(engine_sets: tuple[SurfaceSet, SurfaceSet],
                                                        tmp_path: Path) -> None:
    train, val = engine_sets
    model = train_surrogate(replace(TINY, epochs=3, expected_vol_base=True), DOMAIN, train, val)
    n_inputs = 5 + 4 + grid.N_MATURITIES  # unit coordinates, logs, expected vol per maturity
    assert model.net.stem.in_features == n_inputs
    with torch.no_grad():
        unit = torch.from_numpy(DOMAIN.to_unit(val.params)).float()
        reference = model.net(unit).numpy()
        level = expected_vol(torch.from_numpy(val.params), torch.tensor(grid.MATURITIES)).numpy()
        residual = model.net.decode(model.net.coefficients(unit, torch.from_numpy(level).float())).numpy()
    # The output is the expected vol plus the decoded residual, and the fast path computes the same.
    np.testing.assert_allclose(reference, residual + level[:, None, :], rtol=1e-5, atol=1e-6)
    _assert_predicts_like_the_module(model, val.params)
    loaded = Surrogate.load(model.save(tmp_path / "expected_vol.pt"))
    assert loaded.config.expected_vol_base
    np.testing.assert_array_equal(loaded.predict(val.params), model.predict(val.params))
    # Calibration runs through the same fast path in float64: it refits the model's own surface.
    # L-BFGS differentiates through it with autograd; it needs more iterations than LM to get there.
    for method, iterations in (("lm", 50), ("lbfgs", 200)):
        surface = model.predict(val.params[0])
        fitted, rmse, _ = calibrate_with_surrogate(surface, model, method=method, max_iter=iterations)
        assert rmse < 1e-6 and DOMAIN.contains(fitted).all()
    with pytest.raises(ValueError, match="exclude each other"):
        replace(TINY, expected_vol_base=True, log_surface=True)


def test_surrogate_main_trains_a_preset_and_writes_model_and_report(tmp_path: Path) -> None:
    # The fast preset's architecture on a few surfaces and epochs: the command's whole path runs.
    small = [("n_train", 512), ("n_val", 128), ("epochs", 2), ("cache_dir", str(tmp_path / "data")),
             ("progress", False)]
    assert surrogate_main(tmp_path, seed=1, preset="surrogate-fast", n_test=256, overrides=small) == 0
    model = Surrogate.load(tmp_path / "surrogate.pt")
    assert (model.config.width, model.config.n_blocks, model.config.expected_vol_base) == (16, 1, True)
    assert model.config.n_train == 512 and model.config.error_units == "absolute"
    report = json.loads((tmp_path / "report.json").read_text())
    targets = {"mean_rel_error<=0.2%", "p99_rel_error<=1%", "rmse<=0.001", "speedup_batched>=1000x",
               "calibration<20ms"}
    assert set(report["metrics"]["targets_met"]) == targets
    assert report["metrics"]["speed"]["speedup_batched"] > 1.0
    with pytest.raises(ValueError, match="preset must be one of"):
        surrogate_main(tmp_path, preset="surrogate-huge")


# ---------------------------------------------------------------------------------------------- persistence


def test_save_load_round_trip_and_grid_guard(tiny_model: SurrogateModel, tmp_path: Path,
                                             engine_sets: tuple[SurfaceSet, SurfaceSet]) -> None:
    tiny_model.metrics = {"note": "kept"}
    path = tiny_model.save(tmp_path / "model.pt")
    loaded = Surrogate.load(path)  # the public API name
    assert isinstance(loaded, SurrogateModel)
    params = engine_sets[1].params
    np.testing.assert_array_equal(loaded.predict(params), tiny_model.predict(params))
    assert loaded.config == tiny_model.config and loaded.domain == tiny_model.domain
    assert loaded.pca.n_components == tiny_model.pca.n_components
    assert loaded.metrics == {"note": "kept"} and loaded.info["n_train"] == 1024

    payload = torch.load(path, weights_only=True)
    meta = json.loads(payload["meta"])
    meta["grid_hash"] = "0" * 64
    torch.save({**payload, "meta": json.dumps(meta)}, tmp_path / "tampered.pt")
    with pytest.raises(ValueError, match="does not match its own stored grid"):
        SurrogateModel.load(tmp_path / "tampered.pt")

    from models.surrogate import grid_hash

    meta = json.loads(payload["meta"])
    meta["grid"]["maturities"] = [t * 2.0 for t in meta["grid"]["maturities"]]
    meta["grid_hash"] = grid_hash(meta["grid"]["log_moneyness"], meta["grid"]["maturities"])
    torch.save({**payload, "meta": json.dumps(meta)}, tmp_path / "other_grid.pt")
    with pytest.raises(ValueError, match="trained on another grid"):
        SurrogateModel.load(tmp_path / "other_grid.pt")


# ---------------------------------------------------------------------------------------------- metrics


def _hand_made() -> tuple[np.ndarray, np.ndarray]:
    """truth = 0.4 + 0.01·i + 0.1·j; error +0.01 on OTM puts, 0 at k = 0, −0.002 at the 1.05 strike,
    −0.004 on the other OTM calls (strike rows 0-2 are puts, 3 is k = 0, 4 is k = ln 1.05)."""
    i = np.arange(grid.N_STRIKES)[:, None]
    j = np.arange(grid.N_MATURITIES)[None, :]
    truth = np.broadcast_to(0.4 + 0.01 * i + 0.1 * j, grid.SHAPE)
    row_error = np.array([0.01, 0.01, 0.01, 0.0, -0.002, -0.004, -0.004, -0.004, -0.004, -0.004])
    pred = truth + row_error[:, None]
    return pred[None].copy(), truth[None].copy()


def test_bucket_metrics_on_a_hand_made_case() -> None:
    pred, truth = _hand_made()
    m = surface_metrics(pred, truth)
    assert {name: v["n_points"] for name, v in m.items()} == {
        "overall": 60, "atm": 12, "otm_put": 18, "otm_call": 36, "short_tenor": 20, "long_tenor": 20}
    put, atm, call = m["otm_put"], m["atm"], m["otm_call"]
    assert put["rmse"] == pytest.approx(0.01) and put["mae"] == pytest.approx(0.01)
    assert put["max_abs"] == pytest.approx(0.01) and put["median_abs"] == pytest.approx(0.01)
    put_truth = 0.4 + 0.01 * np.arange(3)[:, None] + 0.1 * np.arange(6)[None, :]
    assert put["mean_rel"] == pytest.approx(np.mean(0.01 / put_truth))
    # ATM = k = 0 (error 0) and k = ln 1.05 ≈ 0.049 (error 0.002), six maturities each.
    assert atm["rmse"] == pytest.approx(np.sqrt(0.5 * 0.002**2)) and atm["mae"] == pytest.approx(0.001)
    assert atm["max_abs"] == pytest.approx(0.002) and atm["median_abs"] == pytest.approx(0.001)
    assert call["mae"] == pytest.approx((6 * 0.002 + 30 * 0.004) / 36)
    assert call["median_abs"] == pytest.approx(0.004)
    short, long = m["short_tenor"], m["long_tenor"]
    # Errors depend on the strike only, so both tenor buckets see the same absolute errors ...
    expected_rmse = np.sqrt((6 * 0.01**2 + 2 * 0.0 + 2 * 0.002**2 + 10 * 0.004**2) / 20)
    assert short["rmse"] == pytest.approx(expected_rmse) and long["rmse"] == pytest.approx(expected_rmse)
    # ... but the long tenors' higher vols make the same errors relatively smaller.
    assert long["mean_rel"] < short["mean_rel"]
    overall = m["overall"]
    t = truth.ravel()
    assert overall["r2"] == pytest.approx(1.0 - np.sum((pred - truth) ** 2) / np.sum((t - t.mean()) ** 2))
    assert overall["max_abs"] == pytest.approx(0.01)
    assert put["p99_rel"] == pytest.approx(0.01 / 0.4, rel=0.05)  # the largest relative miss, 0.01 at 0.4 vol


def test_atm_bucket_falls_back_to_the_closest_strikes() -> None:
    masks = bucket_masks(np.array([-0.2, -0.1, 0.1, 0.3]), np.array([0.1, 0.5, 1.0]))
    np.testing.assert_array_equal(masks["atm"][:, 0], [False, True, True, False])
    np.testing.assert_array_equal(masks["short_tenor"][0], [True, True, False])
    np.testing.assert_array_equal(masks["long_tenor"][0], [False, True, True])


def test_evaluate_reports_the_predictor_errors() -> None:
    pred, truth = _hand_made()

    class Fixed:
        def predict(self, params: np.ndarray) -> np.ndarray:
            return pred

    result = evaluate(Fixed(), np.zeros((1, 5)), truth, timing=False)
    assert result["n_surfaces"] == 1 and "speed" not in result
    assert result["buckets"] == surface_metrics(pred, truth)


def test_report_writes_json_and_histogram(tiny_model: SurrogateModel, tmp_path: Path,
                                          engine_sets: tuple[SurfaceSet, SurfaceSet]) -> None:
    _, val = engine_sets
    path = write_report(tmp_path / "report", tiny_model, val.params, val.surfaces)
    report = json.loads(path.read_text())
    assert report["metrics"]["n_surfaces"] == 256
    assert report["config"]["width"] == TINY.width and report["info"]["pca_components"] > 0
    assert (tmp_path / "report" / "residuals.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------- calibration


def test_calibration_recovers_parameters_of_surrogate_surfaces(tiny_model: SurrogateModel) -> None:
    # The target is the surrogate's own output, so this checks the optimiser, not the surrogate.
    for truth in DOMAIN.from_unit(0.8 * DOMAIN.to_unit(DOMAIN.sample(6, seed=99))):  # inner 80 % of the box
        surface = tiny_model.predict(truth)
        fitted, rmse, seconds = calibrate_with_surrogate(surface, tiny_model)
        assert rmse < 1e-6
        np.testing.assert_allclose(DOMAIN.to_unit(fitted), DOMAIN.to_unit(truth), atol=1e-4)
        assert seconds > 0.0
        warm, warm_rmse, _ = calibrate_with_surrogate(surface, tiny_model, x0=DOMAIN.from_unit(
            np.clip(DOMAIN.to_unit(truth) + 0.2, -0.95, 0.95)), method="lm")
        assert warm_rmse < 1e-6
        np.testing.assert_allclose(DOMAIN.to_unit(warm), DOMAIN.to_unit(truth), atol=1e-4)


def test_calibration_ignores_nan_quotes_and_stays_in_the_domain(tiny_model: SurrogateModel) -> None:
    truth = DOMAIN.from_unit(np.array([0.1, -0.2, 0.3, 0.0, -0.1]))
    surface = tiny_model.predict(truth)
    surface[0, :] = np.nan  # a missing wing
    fitted, rmse, _ = calibrate_with_surrogate(surface, tiny_model)
    assert rmse < 1e-6 and np.isfinite(fitted).all()
    # Vols no parameter in the box can reach: the fit ends on the boundary, never outside it.
    fitted, rmse, _ = calibrate_with_surrogate(np.full(grid.SHAPE, 3.0), tiny_model)
    assert DOMAIN.contains(fitted).all() and rmse > 0.5
    with pytest.raises(ValueError, match="no finite"):
        calibrate_with_surrogate(np.full(grid.SHAPE, np.nan), tiny_model)
