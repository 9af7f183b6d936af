"""Heston calibration: exact recovery, fits at the noise level, warm starts, masks, rates, Jacobian."""

from __future__ import annotations

import numpy as np
import pytest

from models import grid
from models.calibration import PARAM_UPPER, CalibrationResult, _SurfaceProblem, calibrate
from models.heston import HestonParams, call_prices, iv_surface
from models.iv import implied_vol

STRIKES = np.exp(grid.LOG_MONEYNESS)
FELLER_OK = HestonParams(kappa=2.0, theta=0.25, sigma=0.8, rho=-0.6, v0=0.36)
FELLER_VIOLATED = HestonParams(kappa=1.0, theta=0.3, sigma=1.5, rho=-0.3, v0=0.5)
NOISE_VOL = 0.005


def _assert_recovered(result: CalibrationResult, truth: HestonParams) -> None:
    assert result.success, result.message
    assert result.rmse_iv < 1e-5
    np.testing.assert_allclose(result.params.to_array(), truth.to_array(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("truth", [FELLER_OK, FELLER_VIOLATED], ids=["feller", "feller-violated"])
def test_cold_start_recovers_parameters_from_noiseless_grid_surface(truth: HestonParams) -> None:
    surface = iv_surface(truth)
    result = calibrate(surface, 1.0, STRIKES, grid.MATURITIES)
    assert truth.feller() is (truth is FELLER_OK)
    _assert_recovered(result, truth)
    assert result.iterations > 0 and result.seconds > 0.0


@pytest.fixture(scope="module")
def noisy_fits() -> tuple[np.ndarray, np.ndarray, CalibrationResult, CalibrationResult]:
    clean = iv_surface(FELLER_OK)
    noisy = clean + NOISE_VOL * np.random.default_rng(11).standard_normal(clean.shape)
    cold = calibrate(noisy, 1.0, STRIKES, grid.MATURITIES)
    warm = calibrate(noisy, 1.0, STRIKES, grid.MATURITIES, x0=FELLER_OK)
    return clean, noisy, cold, warm


def test_noisy_surface_is_fitted_at_the_noise_level(noisy_fits) -> None:
    clean, noisy, cold, _ = noisy_fits
    noise_rms = np.sqrt(np.mean((noisy - clean) ** 2))
    # The generating parameters are feasible, so the optimum can only beat their RMSE (the noise);
    # five parameters against 60 quotes can absorb only a small part of it.
    assert cold.success, cold.message
    assert 0.85 * noise_rms < cold.rmse_iv <= noise_rms
    # The fit denoises: its surface is much closer to the clean one than the quotes are.
    fitted_error = np.sqrt(np.mean((iv_surface(cold.params) - clean) ** 2))
    assert fitted_error < 0.5 * noise_rms


def test_warm_start_needs_fewer_iterations_and_finds_the_same_optimum(noisy_fits) -> None:
    _, _, cold, warm = noisy_fits
    assert warm.success, warm.message
    assert warm.iterations < cold.iterations
    assert warm.rmse_iv == pytest.approx(cold.rmse_iv, abs=1e-9)
    np.testing.assert_allclose(warm.params.to_array(), cold.params.to_array(), rtol=1e-3)


def test_warm_start_accepts_an_array_and_is_used_alone() -> None:
    surface = iv_surface(FELLER_VIOLATED)
    start = FELLER_VIOLATED.to_array() * np.array([1.2, 0.9, 0.8, 1.1, 1.05])
    from_array = calibrate(surface, 1.0, STRIKES, grid.MATURITIES, x0=start)
    from_params = calibrate(surface, 1.0, STRIKES, grid.MATURITIES, x0=HestonParams.from_array(start))
    _assert_recovered(from_array, FELLER_VIOLATED)
    assert from_array.iterations == from_params.iterations
    np.testing.assert_array_equal(from_array.params.to_array(), from_params.params.to_array())


def test_nan_quotes_and_zero_weights_are_ignored() -> None:
    surface = iv_surface(FELLER_OK)
    surface[::3, 1] = np.nan
    surface[9, 0] = np.nan
    surface[2, 4] += 0.2  # a bad quote that only a zero weight keeps out of the fit
    weights = np.ones_like(surface)
    weights[2, 4] = 0.0
    _assert_recovered(calibrate(surface, 1.0, STRIKES, grid.MATURITIES, weights=weights), FELLER_OK)
    counted = calibrate(surface, 1.0, STRIKES, grid.MATURITIES, x0=FELLER_OK)
    assert counted.rmse_iv > 1e-3
    assert not np.allclose(counted.params.to_array(), FELLER_OK.to_array(), rtol=1e-2)


def test_weights_scale_the_pull_of_each_quote() -> None:
    clean = iv_surface(FELLER_OK)
    shifted = clean.copy()
    shifted[:, 0] += 0.01  # a shortest tenor inconsistent with the rest
    heavy = np.ones_like(clean)
    heavy[:, 0] = 100.0
    light = calibrate(shifted, 1.0, STRIKES, grid.MATURITIES, x0=FELLER_OK)
    weighted = calibrate(shifted, 1.0, STRIKES, grid.MATURITIES, weights=heavy, x0=FELLER_OK)
    short_error = np.abs(iv_surface(light.params)[:, 0] - shifted[:, 0]).mean()
    short_error_weighted = np.abs(iv_surface(weighted.params)[:, 0] - shifted[:, 0]).mean()
    assert short_error_weighted < 0.5 * short_error


def test_recovers_parameters_with_rates_yield_and_spot_strikes() -> None:
    spot, r, q = 100.0, 0.05, 0.02
    strikes = spot * STRIKES
    prices = call_prices(FELLER_VIOLATED, spot, strikes, grid.MATURITIES, r, q)
    surface = implied_vol(prices, spot, strikes[:, None], grid.MATURITIES[None, :], r, q)
    assert np.isfinite(surface).all()
    _assert_recovered(calibrate(surface, spot, strikes, grid.MATURITIES, r=r, q=q), FELLER_VIOLATED)


def test_analytic_jacobian_matches_finite_differences_of_the_residuals() -> None:
    surface = iv_surface(FELLER_OK) + 0.01
    weights = np.linspace(0.5, 2.0, surface.size).reshape(surface.shape)
    problem = _SurfaceProblem(surface, 1.0, STRIKES, grid.MATURITIES, 0.01, 0.0, weights)
    x = FELLER_VIOLATED.to_array()
    jacobian = problem.jacobian(x)
    steps = 1e-5 * np.abs(x)
    numeric = np.column_stack(
        [(problem.residuals(x + step) - problem.residuals(x - step)) / (2 * step[k])
         for k, step in enumerate(np.diag(steps))]
    )
    np.testing.assert_allclose(jacobian, numeric, rtol=1e-5, atol=1e-7 * np.abs(numeric).max())


def test_warm_start_outside_the_bounds_is_pulled_inside() -> None:
    start = HestonParams(kappa=2.0 * PARAM_UPPER[0], theta=0.25, sigma=0.8, rho=-0.6, v0=0.36)
    assert not (start.to_array() <= PARAM_UPPER).all()
    _assert_recovered(calibrate(iv_surface(FELLER_OK), 1.0, STRIKES, grid.MATURITIES, x0=start), FELLER_OK)


@pytest.mark.parametrize(
    ("surface", "weights", "x0", "match"),
    [
        (np.full((3, 6), 0.5), None, None, "shape"),
        (np.full(grid.SHAPE, 0.5), np.ones((6, 10)), None, "weights"),
        (np.full(grid.SHAPE, 0.5), -np.ones(grid.SHAPE), None, "non-negative"),
        (np.full(grid.SHAPE, np.nan), None, None, "no finite"),
        (np.full(grid.SHAPE, 0.5), None, np.array([1.0, 0.2, 0.5, 1.5, 0.2]), "rho"),
    ],
)
def test_rejects_malformed_input(surface, weights, x0, match) -> None:
    with pytest.raises(ValueError, match=match):
        calibrate(surface, 1.0, STRIKES, grid.MATURITIES, weights=weights, x0=x0)
