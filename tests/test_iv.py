"""Black–Scholes pricing, greeks and the vectorised Let's Be Rational implied-volatility inversion."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from models import grid
from models.iv import bs_greeks, bs_price, bs_vega, implied_vol

EPS = float(np.finfo(float).eps)
# A price "carries information" about σ to 1e-12 when a 1e-12 change of σ moves it by at least this
# many ulps (and it is a normal float): below that, rounding of the price itself hides the change.
INFORMATIVE_ULPS = 4.0


def _random_book(n: int, seed: int) -> dict[str, np.ndarray]:
    """Options with |ln(K/F)| <= 1, T from 1 day to 5 years, σ in [0.05, 2], calls and puts, r, q ≠ 0."""
    rng = np.random.default_rng(seed)
    maturities = np.exp(rng.uniform(np.log(1.0 / 365.0), np.log(5.0), n))
    r = rng.uniform(-0.02, 0.10, n)
    q = rng.uniform(-0.05, 0.10, n)
    spot = 100.0
    forward = spot * np.exp((r - q) * maturities)
    return {
        "spot": np.full(n, spot),
        "strikes": forward * np.exp(rng.uniform(-1.0, 1.0, n)),
        "maturities": maturities,
        "vol": rng.uniform(0.05, 2.0, n),
        "r": r,
        "q": q,
        "call": rng.random(n) < 0.5,
    }


def _informative(price: np.ndarray, vega: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return (price >= np.finfo(float).tiny) & (vega * 1e-12 >= INFORMATIVE_ULPS * EPS * price)


def test_round_trip_reaches_1e_12_wherever_the_price_carries_information() -> None:
    book = _random_book(60_000, seed=7)
    price = bs_price(**book)
    vol = implied_vol(
        price, book["spot"], book["strikes"], book["maturities"], book["r"], book["q"], book["call"]
    )
    informative = _informative(
        price, bs_vega(book["spot"], book["strikes"], book["maturities"], book["vol"], book["r"], book["q"])
    )
    # The criterion must not hollow the test out: most of the sampled book is informative.
    assert informative.mean() > 0.8
    assert informative[book["call"]].mean() > 0.8 and informative[~book["call"]].mean() > 0.8
    error = np.abs(vol[informative] - book["vol"][informative])
    assert np.all(np.isfinite(vol[informative]))
    assert error.max() <= 1e-12


def test_round_trip_on_the_corners_of_the_domain() -> None:
    """Exact ATM, |k| = 1, T = 1 day and 5 years, σ = 0.05 and 2 — every combination, both types."""
    k, t, v, c = np.meshgrid(
        [-1.0, -0.3, 0.0, 0.3, 1.0], [1.0 / 365.0, 0.25, 5.0], [0.05, 0.5, 2.0], [True, False], indexing="ij"
    )
    r, q, spot = 0.03, 0.01, 50.0
    strikes = spot * np.exp((r - q) * t) * np.exp(k)
    price = bs_price(spot, strikes, t, v, r, q, c)
    vol = implied_vol(price, spot, strikes, t, r, q, c)
    informative = _informative(price, bs_vega(spot, strikes, t, v, r, q))
    assert informative.sum() >= 0.6 * informative.size
    np.testing.assert_allclose(vol[informative], v[informative], rtol=0.0, atol=1e-12)


def test_agrees_with_the_scalar_reference_implementation() -> None:
    lbr = pytest.importorskip("py_lets_be_rational")
    book = {key: value[:400] for key, value in _random_book(400, seed=11).items()}
    price = bs_price(**book)
    vol = implied_vol(
        price, book["spot"], book["strikes"], book["maturities"], book["r"], book["q"], book["call"]
    )
    informative = _informative(
        price, bs_vega(book["spot"], book["strikes"], book["maturities"], book["vol"], book["r"], book["q"])
    )
    forward = book["spot"] * np.exp((book["r"] - book["q"]) * book["maturities"])
    discount = np.exp(-book["r"] * book["maturities"])
    reference = np.array(
        [
            lbr.implied_volatility_from_a_transformed_rational_guess(p / d, f, k, t, 1.0 if c else -1.0)
            for p, d, f, k, t, c in zip(
                price[informative],
                discount[informative],
                forward[informative],
                book["strikes"][informative],
                book["maturities"][informative],
                book["call"][informative],
                strict=True,
            )
        ]
    )
    np.testing.assert_allclose(vol[informative], reference, rtol=0.0, atol=1e-12)


def test_price_matches_high_precision_black_scholes() -> None:
    """Backward error: the computed price is the exact price of a σ a few ulps away (deep wings too)."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    book = {key: value[:300] for key, value in _random_book(300, seed=3).items()}
    price = bs_price(**book)
    vega = bs_vega(book["spot"], book["strikes"], book["maturities"], book["vol"], book["r"], book["q"])
    checked = 0
    for i in range(300):
        s, k, t, v = (mpmath.mpf(float(book[n][i])) for n in ("spot", "strikes", "maturities", "vol"))
        r, q = mpmath.mpf(float(book["r"][i])), mpmath.mpf(float(book["q"][i]))
        forward = s * mpmath.exp((r - q) * t)
        d1 = (mpmath.log(forward / k) + v * v * t / 2) / (v * mpmath.sqrt(t))
        d2 = d1 - v * mpmath.sqrt(t)
        sign = 1 if book["call"][i] else -1
        exact = mpmath.exp(-r * t) * sign * (forward * mpmath.ncdf(sign * d1) - k * mpmath.ncdf(sign * d2))
        if exact < mpmath.mpf(1e-300):
            continue
        checked += 1
        absolute_error = abs(mpmath.mpf(float(price[i])) - exact)
        # Allowed: a few ulps of the price, or the price change of a few-ulp relative change of σ.
        allowed = 8 * EPS * (float(exact) + float(vega[i]) * float(book["vol"][i]))
        assert float(absolute_error) <= allowed, (i, float(absolute_error), allowed)
    assert checked > 250


def test_out_of_bounds_inputs_give_nan_without_exceptions_or_warnings() -> None:
    spot, r, q = 100.0, 0.05, 0.02
    t = 0.5
    call_upper = spot * np.exp(-q * t)
    cases = [
        # (price, strike, maturity, is_call, expect_nan)
        (3.0, 80.0, t, True, True),  # below intrinsic
        (call_upper, 120.0, t, True, True),  # at the upper bound
        (call_upper * 1.5, 120.0, t, True, True),  # above the upper bound
        (100.0 * np.exp(-r * t) + 1.0, 100.0, t, False, True),  # put above K·e^{−rT}
        (-1.0, 100.0, t, True, True),  # negative price
        (5.0, 100.0, 0.0, True, True),  # zero maturity
        (5.0, 100.0, -1.0, True, True),  # negative maturity
        (5.0, 0.0, t, True, True),  # zero strike
        (5.0, -10.0, t, False, True),  # negative strike
        (np.nan, 100.0, t, True, True),
        (np.inf, 100.0, t, True, True),
        (5.0, np.nan, t, True, True),
        (8.0, 100.0, t, True, False),  # valid call
        (10.0, 110.0, t, False, False),  # valid in-the-money put
    ]
    price, strikes, maturities, is_call, expect_nan = (
        np.array(column) for column in zip(*cases, strict=True)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vol = implied_vol(price, spot, strikes, maturities, r, q, is_call)
    assert np.array_equal(np.isnan(vol), expect_nan)
    valid = ~expect_nan
    repriced = bs_price(spot, strikes[valid], maturities[valid], vol[valid], r, q, is_call[valid])
    np.testing.assert_allclose(repriced, price[valid], rtol=1e-13)


def test_pricing_and_greeks_give_nan_for_invalid_inputs_without_warnings() -> None:
    spot = [-1.0, np.nan, 100.0, 100.0, 100.0]
    strikes = [100.0, 100.0, -5.0, 100.0, 100.0]
    maturities = [1.0, 1.0, 1.0, -1.0, 1.0]
    vol = [0.2, 0.2, 0.2, 0.2, -0.2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.all(np.isnan(bs_price(spot, strikes, maturities, vol)))
        assert np.all(np.isnan(bs_vega(spot, strikes, maturities, vol)))
        assert all(np.all(np.isnan(g)) for g in bs_greeks(spot, strikes, maturities, vol))


def test_zero_time_value_gives_zero_vol_and_bad_spot_gives_nan() -> None:
    spot, r, q, t = 100.0, 0.01, 0.0, 1.0
    forward = spot * np.exp((r - q) * t)
    intrinsic_call = np.exp(-r * t) * (forward - 80.0)
    vol = implied_vol([0.0, intrinsic_call, 0.0], [spot, spot, -spot], [120.0, 80.0, 100.0], t, r, q, True)
    assert vol[0] == 0.0 and vol[1] == 0.0 and np.isnan(vol[2])


def test_broadcasts_over_a_surface_with_a_boolean_call_array() -> None:
    spot = 1.0
    strikes = np.exp(grid.LOG_MONEYNESS)[:, None]
    maturities = grid.MATURITIES[None, :]
    vol = 0.4 + 0.3 * grid.LOG_MONEYNESS[:, None] ** 2 + 0.1 * maturities
    is_call = strikes >= spot  # out-of-the-money options: puts below the forward, calls above
    price = bs_price(spot, strikes, maturities, vol, 0.0, 0.0, is_call)
    assert price.shape == grid.SHAPE
    recovered = implied_vol(price, spot, strikes, maturities, 0.0, 0.0, is_call)
    assert recovered.shape == grid.SHAPE
    np.testing.assert_allclose(recovered, np.broadcast_to(vol, grid.SHAPE), rtol=0.0, atol=1e-13)
    assert np.ndim(implied_vol(0.1, 1.0, 1.0, 1.0)) == 0


def test_put_call_parity_holds() -> None:
    book = _random_book(2000, seed=5)
    args = (book["spot"], book["strikes"], book["maturities"], book["vol"], book["r"], book["q"])
    call = bs_price(*args, call=True)
    put = bs_price(*args, call=False)
    parity = book["spot"] * np.exp(-book["q"] * book["maturities"]) - book["strikes"] * np.exp(
        -book["r"] * book["maturities"]
    )
    np.testing.assert_allclose(call - put, parity, rtol=0.0, atol=1e-11 * book["spot"][0])


@pytest.mark.parametrize("is_call", [True, False])
def test_greeks_match_finite_differences(is_call: bool) -> None:
    rng = np.random.default_rng(17)
    n = 400
    spot = 100.0
    strikes = spot * np.exp(rng.uniform(-0.5, 0.5, n))
    maturities = rng.uniform(0.05, 3.0, n)
    vol = rng.uniform(0.1, 1.2, n)
    r, q = 0.04, 0.015
    greeks = bs_greeks(spot, strikes, maturities, vol, r, q, is_call)

    def price(s: float | np.ndarray = spot, t: np.ndarray = maturities, v: np.ndarray = vol) -> np.ndarray:
        return bs_price(s, strikes, t, v, r, q, is_call)

    # Central differences; steps balance truncation (∝ h²) against rounding (∝ ε/h). Gamma is the
    # difference of the analytic delta, which the first assertion ties to the price itself.
    h_spot, h_vol, h_time = 1e-5 * spot, 1e-5, 1e-6
    delta_fd = (price(spot + h_spot) - price(spot - h_spot)) / (2 * h_spot)
    delta_up = bs_greeks(spot + h_spot, strikes, maturities, vol, r, q, is_call).delta
    delta_down = bs_greeks(spot - h_spot, strikes, maturities, vol, r, q, is_call).delta
    gamma_fd = (delta_up - delta_down) / (2 * h_spot)
    vega_fd = (price(v=vol + h_vol) - price(v=vol - h_vol)) / (2 * h_vol)
    theta_fd = -(price(t=maturities + h_time) - price(t=maturities - h_time)) / (2 * h_time)
    np.testing.assert_allclose(greeks.delta, delta_fd, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(greeks.gamma, gamma_fd, rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(greeks.vega, vega_fd, rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(greeks.theta, theta_fd, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(bs_vega(spot, strikes, maturities, vol, r, q), greeks.vega, rtol=1e-14)


def test_greeks_at_zero_volatility_are_the_intrinsic_limits() -> None:
    greeks = bs_greeks(100.0, [80.0, 120.0], 1.0, 0.0, 0.0, 0.0, True)
    np.testing.assert_array_equal(greeks.delta, [1.0, 0.0])
    np.testing.assert_array_equal(greeks.gamma, [0.0, 0.0])
    np.testing.assert_array_equal(greeks.vega, [0.0, 0.0])
    assert np.all(np.isnan(bs_greeks(-1.0, 100.0, 1.0, 0.2)))
