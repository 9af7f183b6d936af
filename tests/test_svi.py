"""Raw-SVI surface fitting: recovery, Heston smiles, arbitrage flags, resampling and a real Deribit chain."""

from __future__ import annotations

import ast
import csv
import math
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import least_squares

from models import grid
from models.iv import bs_price, implied_vol
from models.svi import EXPIRY_TOLERANCE_YEARS, SurfaceFit, SVISlice, fit_surface

# Calendar-ordered, arbitrage-free raw SVI slices: (maturity, (a, b, rho, m, sigma)).
TRUE_SLICES = (
    (0.1, (0.01, 0.05, -0.4, 0.05, 0.15)),
    (0.5, (0.04, 0.10, -0.3, 0.10, 0.25)),
    (1.5, (0.10, 0.12, -0.2, 0.10, 0.40)),
)
# Axel Vogt's raw SVI slice (T = 1), quoted by Gatheral & Jacquier (2014): every parameter
# constraint holds, yet g(k) < 0 near k ≈ 1, i.e. a negative density (butterfly arbitrage).
VOGT = (-0.0410, 0.1331, 0.3060, 0.3586, 0.4153)


def _quotes(slices: tuple[tuple[float, tuple[float, ...]], ...], k: np.ndarray) -> tuple[np.ndarray, ...]:
    maturities, log_moneyness, ivs = [], [], []
    for maturity, params in slices:
        maturities.append(np.full(k.size, maturity))
        log_moneyness.append(k)
        ivs.append(SVISlice(maturity, *params).iv(k))
    return np.concatenate(maturities), np.concatenate(log_moneyness), np.concatenate(ivs)


def test_recovers_synthetic_svi_slices() -> None:
    maturities, k, ivs = _quotes(TRUE_SLICES, np.linspace(-0.8, 0.8, 25))
    fit = fit_surface(maturities, k, ivs)
    assert fit.rmse_iv < 1e-10
    assert fit.butterfly_free and fit.calendar_free
    np.testing.assert_allclose(fit.expiries, [t for t, _ in TRUE_SLICES], rtol=1e-15)
    for fitted, (_, params) in zip(fit.slices, TRUE_SLICES, strict=True):
        np.testing.assert_allclose(fitted.params, params, rtol=0.0, atol=1e-8)


def _heston_ivs(log_moneyness: np.ndarray, days: np.ndarray) -> np.ndarray:
    """Heston implied vols (F = 1, r = q = 0) from QuantLib's analytic engine, via OTM options."""
    ql = pytest.importorskip("QuantLib")
    today = ql.Date(2, 1, 2024)
    ql.Settings.instance().evaluationDate = today
    flat = ql.YieldTermStructureHandle(ql.FlatForward(today, 0.0, ql.Actual365Fixed()))
    # Crypto-like Heston: 60% spot vol, strong vol of vol, negative spot–vol correlation.
    process = ql.HestonProcess(flat, flat, ql.QuoteHandle(ql.SimpleQuote(1.0)), 0.36, 3.0, 0.42, 1.2, -0.4)
    engine = ql.AnalyticHestonEngine(ql.HestonModel(process))
    prices = []
    for k, d in zip(log_moneyness, days, strict=True):
        strike = float(np.exp(k))
        kind = ql.Option.Call if strike >= 1.0 else ql.Option.Put
        option = ql.EuropeanOption(ql.PlainVanillaPayoff(kind, strike), ql.EuropeanExercise(today + int(d)))
        option.setPricingEngine(engine)
        prices.append(option.NPV())
    return implied_vol(np.array(prices), 1.0, np.exp(log_moneyness), days / 365.0, call=log_moneyness >= 0.0)


def test_heston_smiles_are_fitted_within_a_tenth_of_a_vol_point() -> None:
    k, days = (g.ravel() for g in np.meshgrid(np.linspace(-0.5, 0.6, 23), grid.TENOR_DAYS))
    ivs = _heston_ivs(k, days)
    assert np.all(np.isfinite(ivs))
    fit = fit_surface(days / 365.0, k, ivs)
    assert fit.rmse_iv < 1e-3
    assert fit.butterfly_free and fit.calendar_free
    # Between the quoted strikes the resampled grid still matches Heston (the tenors coincide).
    grid_k, grid_days = (g.ravel() for g in np.meshgrid(grid.LOG_MONEYNESS, grid.TENOR_DAYS, indexing="ij"))
    expected = _heston_ivs(grid_k, grid_days).reshape(grid.SHAPE)
    np.testing.assert_allclose(fit.iv_grid, expected, rtol=0.0, atol=1e-3)


def test_butterfly_flag_detects_a_negative_density_and_enforcement_repairs_it() -> None:
    vogt = SVISlice(1.0, *VOGT)
    k = np.linspace(-1.5, 1.5, 41)
    assert vogt.density_condition(k).min() < 0.0  # the construction really is arbitrageable
    maturities, log_moneyness, ivs = _quotes(((1.0, VOGT),), k)
    fit = fit_surface(maturities, log_moneyness, ivs)
    assert fit.rmse_iv < 1e-6  # the slice is recovered ...
    assert not fit.butterfly_free  # ... and its arbitrage reported
    assert fit.calendar_free
    repaired = fit_surface(maturities, log_moneyness, ivs, enforce_no_arbitrage=True)
    assert repaired.butterfly_free and repaired.calendar_free
    assert np.all(repaired.slices[0].density_condition(repaired.check_log_moneyness) >= 0.0)
    assert repaired.rmse_iv < 0.01


def test_calendar_flag_detects_crossing_total_variance_and_enforcement_repairs_it() -> None:
    k = np.linspace(-0.5, 0.5, 21)
    # A 3-month smile at 60% vol over a 6-month one at 40%: w = 0.09 > 0.08, money for nothing.
    short = (0.25, (0.36 * 0.25 - 0.02 * 0.1, 0.1, 0.0, 0.0, 0.1))
    long = (0.5, (0.16 * 0.5 - 0.02 * 0.1, 0.1, 0.0, 0.0, 0.1))
    maturities, log_moneyness, ivs = _quotes((short, long), k)
    fit = fit_surface(maturities, log_moneyness, ivs)
    assert fit.rmse_iv < 1e-6
    assert fit.butterfly_free
    assert not fit.calendar_free
    repaired = fit_surface(maturities, log_moneyness, ivs, enforce_no_arbitrage=True)
    assert repaired.calendar_free and repaired.butterfly_free
    check = repaired.check_log_moneyness
    assert np.all(repaired.slices[1].total_variance(check) >= repaired.slices[0].total_variance(check))


def test_resampling_interpolates_total_variance_in_time_and_holds_vol_beyond_the_expiries() -> None:
    maturities, k, ivs = _quotes(TRUE_SLICES, np.linspace(-0.8, 0.8, 25))
    fit = fit_surface(maturities, k, ivs)
    (t1, _), (t2, _), (t3, _) = TRUE_SLICES
    probe = np.linspace(-0.6, 0.6, 7)
    w1, w2, w3 = (SVISlice(t, *p).total_variance(probe) for t, p in TRUE_SLICES)
    middle = 0.3
    alpha = (middle - t1) / (t2 - t1)
    np.testing.assert_allclose(fit.total_variance(probe, middle), (1 - alpha) * w1 + alpha * w2, rtol=1e-9)
    np.testing.assert_allclose(fit.iv(probe, t3), np.sqrt(w3 / t3), rtol=1e-9)
    np.testing.assert_allclose(fit.iv(probe, 4.0), np.sqrt(w3 / t3), rtol=1e-9)  # flat vol after
    np.testing.assert_allclose(fit.iv(probe, 0.02), np.sqrt(w1 / t1), rtol=1e-9)  # and before
    assert np.all(np.isnan(fit.iv(probe, 0.0))) and np.all(np.isnan(fit.iv(probe, -1.0)))
    assert fit.iv_grid.shape == grid.SHAPE
    np.testing.assert_allclose(
        fit.iv_grid, fit.iv(grid.LOG_MONEYNESS[:, None], grid.MATURITIES[None, :]), rtol=1e-15
    )
    assert fit.iv(probe[:, None, None], np.array([0.2, 0.7])[None, :, None]).shape == (7, 2, 1)


def test_weights_weight_the_squared_iv_residuals() -> None:
    """Two quote sets at the same strikes, 4 vol points apart: weights 3:1 put the fit a quarter of the
    way from the heavier set, equal weights halfway."""
    maturities, k, ivs = _quotes(TRUE_SLICES[1:2], np.linspace(-0.6, 0.6, 15))
    both_t, both_k, both_iv = (np.concatenate([a, a]) for a in (maturities, k, ivs))
    both_iv[k.size :] += 0.04
    weighted = fit_surface(both_t, both_k, both_iv, weights=np.repeat([3.0, 1.0], k.size))
    equal = fit_surface(both_t, both_k, both_iv)
    np.testing.assert_allclose(weighted.slices[0].iv(k), ivs + 0.01, atol=1e-3)
    np.testing.assert_allclose(equal.slices[0].iv(k), ivs + 0.02, atol=1e-3)


def test_groups_a_snapshot_into_expiries_and_ignores_unusable_quotes() -> None:
    maturities, k, ivs = _quotes(TRUE_SLICES, np.linspace(-0.8, 0.8, 25))
    # A snapshot taken over 2.5 minutes: maturities of one expiry differ by less than the tolerance.
    jitter = np.random.default_rng(0).uniform(0.0, 2.5 / (60 * 24 * 365), maturities.size)
    assert jitter.max() < EXPIRY_TOLERANCE_YEARS
    bad = np.array([np.nan, 0.5, 0.5, -0.1, 0.5])
    fit = fit_surface(
        np.concatenate([maturities + jitter, bad]),
        np.concatenate([k, [0.0, np.nan, 0.1, 0.0, 0.2]]),
        np.concatenate([ivs, [0.5, 0.5, -0.3, 0.5, np.inf]]),
    )
    assert len(fit.slices) == len(TRUE_SLICES)
    assert fit.rmse_iv < 1e-4
    with pytest.raises(ValueError, match="same length"):
        fit_surface([0.1, 0.2], [0.0], [0.5])
    with pytest.raises(ValueError, match="no usable"):
        fit_surface([0.1], [0.0], [np.nan])


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    level=st.floats(0.2, 1.5),
    skew=st.floats(-0.5, 0.5),
    noise=st.floats(0.0, 0.05),
)
def test_every_fitted_slice_satisfies_the_parameter_constraints(
    seed: int, level: float, skew: float, noise: float
) -> None:
    """Whatever the quotes, the parametrisation keeps b >= 0, |ρ| < 1, σ > 0, min variance >= 0, Lee."""
    rng = np.random.default_rng(seed)
    k = np.sort(rng.uniform(-0.7, 0.7, 30))
    maturities = np.repeat([0.05, 0.4], 15)
    ivs = level * (1.0 + skew * k + 0.5 * k * k) * np.exp(noise * rng.standard_normal(30))
    fit = fit_surface(maturities, k, np.abs(ivs))
    for s in fit.slices:
        assert s.b >= 0.0 and abs(s.rho) < 1.0 and s.sigma > 0.0
        assert s.a + s.b * s.sigma * math.sqrt(1.0 - s.rho**2) >= 0.0
        assert s.b * (1.0 + abs(s.rho)) <= 2.0 + 1e-12
    assert np.isfinite(fit.rmse_iv) and np.all(np.isfinite(fit.iv_grid))


# ---------------------------------------------------------------------------------------------
# The real Deribit BTC chain of 2020-05-14.
# ---------------------------------------------------------------------------------------------

CHAIN = Path("deribit_chains") / "btc_options_snapshot_2020-05-14.csv"


class DeribitFit(NamedTuple):
    fit: SurfaceFit
    maturities: np.ndarray
    log_moneyness: np.ndarray
    ivs: np.ndarray


def _traded_range_quotes(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Out-of-the-money mark IVs inside each expiry's traded range.

    An expiry's traded range is the strike span of its out-of-the-money options with a live
    two-sided market (a bid and an ask, both with an IV); beyond it Deribit's marks are
    extrapolations nobody can trade on. k = ln(K/F) with F the row's ``underlying_price``
    (that expiry's forward), T = expiry − quote time, IVs from percent to decimals.
    """
    by_expiry: dict[str, list[tuple[float, float, float, bool]]] = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            k = math.log(float(row["strike"]) / float(row["underlying_price"]))
            if (row["option_type"] == "call") != (k >= 0.0):
                continue
            two_sided = (
                float(row["bid_iv"]) > 0.0
                and float(row["ask_iv"]) > 0.0
                and bool(ast.literal_eval(row["bids"]))
            )
            maturity = (int(row["expiration_timestamp"]) - int(row["timestamp"])) / 1000.0 / 86400.0 / 365.0
            by_expiry.setdefault(row["expiration_timestamp"], []).append(
                (maturity, k, float(row["mark_iv"]) / 100.0, two_sided)
            )
    quotes = []
    for rows in by_expiry.values():
        live = [k for _, k, _, two_sided in rows if two_sided]
        quotes += [(t, k, iv) for t, k, iv, _ in rows if min(live) <= k <= max(live)]
    return tuple(np.array(column) for column in zip(*quotes, strict=True))  # type: ignore[return-value]


@pytest.fixture(scope="module")
def deribit_fit(shared_data: Path) -> DeribitFit:
    path = shared_data / CHAIN
    if not path.is_file():
        pytest.skip(f"Deribit chain snapshot not found at {path}")
    maturities, k, ivs = _traded_range_quotes(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit = fit_surface(maturities, k, ivs)
    return DeribitFit(fit, maturities, k, ivs)


def _one_day(maturities: np.ndarray) -> np.ndarray:
    return (maturities > 0.5 / 365.0) & (maturities < 2.0 / 365.0)


def test_deribit_chain_is_fitted_within_one_vol_point_apart_from_the_one_day_expiry(
    deribit_fit: DeribitFit,
) -> None:
    fit, maturities, k, ivs = deribit_fit
    assert len(fit.slices) == 7 and maturities.size > 120
    kept = ~_one_day(maturities)
    assert kept.sum() > 110
    error = fit.iv(k[kept], maturities[kept]) - ivs[kept]
    assert np.sqrt(np.mean(error**2)) < 0.01


def test_deribit_one_day_smile_is_beyond_any_svi_slice(deribit_fit: DeribitFit) -> None:
    """Why the 1-day expiry is left out of the 1-vol-point bar: even raw SVI with every no-arbitrage
    constraint dropped (only b >= 0, |ρ| <= 1, σ > 0), from many random starts, misses its marks by
    more than 2 vol points RMS; fit_surface's constrained slice is as good as that relaxed optimum."""
    fit, maturities, k, ivs = deribit_fit
    day = _one_day(maturities)
    kk, iv, t = k[day], ivs[day], float(maturities[day].mean())

    def misfit(params: np.ndarray) -> np.ndarray:
        a, b, rho, m, sigma = params
        w = a + b * (rho * (kk - m) + np.sqrt((kk - m) ** 2 + sigma**2))
        return np.sqrt(np.maximum(w, 1e-12) / t) - iv

    rng = np.random.default_rng(0)
    lower, upper = [-np.inf, 0.0, -1.0, -np.inf, 1e-6], [np.inf, np.inf, 1.0, np.inf, np.inf]
    best = min(
        np.sqrt(np.mean(least_squares(misfit, start, bounds=(lower, upper)).fun ** 2))
        for start in np.column_stack(
            [
                rng.uniform(-0.01, 0.01, 40),
                rng.uniform(0.0, 0.3, 40),
                rng.uniform(-0.9, 0.9, 40),
                rng.uniform(-0.2, 0.2, 40),
                rng.uniform(0.01, 0.5, 40),
            ]
        )
    )
    assert best > 0.02
    one_day_slice = next(s for s in fit.slices if 0.5 / 365.0 < s.maturity < 2.0 / 365.0)
    assert np.sqrt(np.mean((one_day_slice.iv(kk) - iv) ** 2)) < best + 1e-3


def test_deribit_surface_is_arbitrage_free_on_the_project_grid(deribit_fit: DeribitFit) -> None:
    fit = deribit_fit[0]
    assert fit.butterfly_free and fit.calendar_free
    assert fit.iv_grid.shape == grid.SHAPE and np.all(np.isfinite(fit.iv_grid))
    # Independent discrete check on the grid itself: forward-normalised call prices decrease and are
    # convex in strike at every tenor, and total variance does not decrease with tenor at any strike.
    strikes = np.exp(grid.LOG_MONEYNESS)
    calls = bs_price(1.0, strikes[:, None], grid.MATURITIES[None, :], fit.iv_grid)
    slopes = np.diff(calls, axis=0) / np.diff(strikes)[:, None]
    assert np.all(slopes < 0.0)
    assert np.all(np.diff(slopes, axis=0) > 0.0)
    assert np.all(np.diff(fit.iv_grid**2 * grid.MATURITIES[None, :], axis=1) >= 0.0)
