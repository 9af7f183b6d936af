"""Heston pricer accuracy: everything downstream (IV surfaces, calibration, the gym) trusts these prices.

The arbiters are independent of ``models.heston``: QuantLib's AnalyticHestonEngine with the
optimal control variate and an adaptive exp-sinh quadrature (QuantLib's default 144-point
Gauss–Laguerre rule is off by up to 3e-3 at spot 100 for 1-day to 1-week options with v0 = 1e-4),
a 30-digit mpmath quadrature of the plain Lewis integral (no control variate) where QuantLib is least
trusted, and the published COS-paper value. Then the structural checks: put–call parity, batch = loop, the
torch pricer and its reverse- and forward-mode derivatives, and input validation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch.autograd import forward_ad

from models import grid
from models.heston import HestonParams, call_prices, put_prices
from models.heston_torch import call_prices_torch

SPOT = 100.0
# Deep ITM to deep OTM (K/S from 0.22 to 4.5), and 1 week to 5 years as whole Actual/365 days.
STRIKES = SPOT * np.exp(np.linspace(-1.5, 1.5, 9))
DAYS = np.array([7, 30, 91, 365, 730, 1826])
MATURITIES = DAYS / 365.0
# Agreement with an arbiter: relative, or absolute for tiny prices (spot 100).
REL_TOL, ABS_TOL = 1e-8, 1e-9

NORMAL = HestonParams(kappa=3.0, theta=0.09, sigma=0.4, rho=-0.6, v0=0.06)
FELLER_VIOLATED = HestonParams(kappa=0.5, theta=0.04, sigma=1.0, rho=-0.7, v0=0.04)
RHO_PLUS = HestonParams(kappa=1.2, theta=0.25, sigma=0.8, rho=0.95, v0=0.36)
RHO_MINUS = HestonParams(kappa=2.0, theta=0.3, sigma=1.5, rho=-0.95, v0=0.5)
TINY_SIGMA = HestonParams(kappa=1.0, theta=0.05, sigma=0.01, rho=-0.3, v0=0.04)
COS_PAPER = HestonParams(kappa=1.5768, theta=0.0398, sigma=0.5751, rho=-0.5711, v0=0.0175)

# (params, r, q): rates nonzero, of either sign of carry, in three of the five cases.
CASES: dict[str, tuple[HestonParams, float, float]] = {
    "normal": (NORMAL, 0.03, 0.01),
    "feller-violated": (FELLER_VIOLATED, 0.0, 0.0),
    "rho+0.95": (RHO_PLUS, 0.05, 0.0),
    "rho-0.95": (RHO_MINUS, 0.0, 0.02),
    "sigma-0.01": (TINY_SIGMA, 0.02, 0.04),
}


def _assert_close_to_arbiter(ours: np.ndarray, reference: np.ndarray, label: str) -> None:
    """Each price within REL_TOL relative or ABS_TOL absolute of the reference."""
    error = np.abs(ours - reference)
    bad = error > np.maximum(REL_TOL * np.abs(reference), ABS_TOL)
    assert not bad.any(), (
        f"{label}: {int(bad.sum())} prices off; worst at {np.unravel_index(np.argmax(error), error.shape)}: "
        f"ours {ours.flat[np.argmax(error)]!r} vs {reference.flat[np.argmax(error)]!r}"
    )


# ---------------------------------------------------------------------------------------------
# Arbiter 1: QuantLib


@pytest.fixture(scope="module")
def ql() -> Iterator[Any]:
    """QuantLib with a fixed evaluation date, restored afterwards (other tests share the singleton)."""
    quantlib = pytest.importorskip("QuantLib")
    settings = quantlib.Settings.instance()
    previous = settings.evaluationDate
    settings.evaluationDate = quantlib.Date(2, 1, 2024)
    yield quantlib
    settings.evaluationDate = previous


def _quantlib_prices(ql: Any, params: HestonParams, r: float, q: float) -> tuple[np.ndarray, np.ndarray]:
    """QuantLib calls and puts on STRIKES × DAYS, each (nK, nT)."""
    today = ql.Settings.instance().evaluationDate
    day_count = ql.Actual365Fixed()  # so that DAYS / 365 are exactly the year fractions
    rates = ql.YieldTermStructureHandle(ql.FlatForward(today, r, day_count))
    dividends = ql.YieldTermStructureHandle(ql.FlatForward(today, q, day_count))
    process = ql.HestonProcess(
        rates, dividends, ql.QuoteHandle(ql.SimpleQuote(SPOT)),
        params.v0, params.kappa, params.theta, params.sigma, params.rho,
    )  # fmt: skip
    engine = ql.AnalyticHestonEngine(
        ql.HestonModel(process), ql.AnalyticHestonEngine.OptimalCV, ql.FourierIntegration.expSinh(1e-14)
    )
    out = {kind: np.empty((STRIKES.size, DAYS.size)) for kind in (ql.Option.Call, ql.Option.Put)}
    for kind, prices in out.items():
        for i, strike in enumerate(STRIKES):
            for j, days in enumerate(DAYS):
                option = ql.EuropeanOption(
                    ql.PlainVanillaPayoff(kind, float(strike)), ql.EuropeanExercise(today + int(days))
                )
                option.setPricingEngine(engine)
                prices[i, j] = option.NPV()
    return out[ql.Option.Call], out[ql.Option.Put]


@pytest.mark.parametrize("case", list(CASES))
def test_prices_match_quantlib_from_deep_itm_to_deep_otm(ql: Any, case: str) -> None:
    params, r, q = CASES[case]
    assert params.feller() is (case in ("normal", "sigma-0.01"))
    ql_calls, ql_puts = _quantlib_prices(ql, params, r, q)
    _assert_close_to_arbiter(call_prices(params, SPOT, STRIKES, MATURITIES, r, q), ql_calls, f"{case} calls")
    _assert_close_to_arbiter(put_prices(params, SPOT, STRIKES, MATURITIES, r, q), ql_puts, f"{case} puts")


# ---------------------------------------------------------------------------------------------
# Arbiter 2: mpmath, 30 digits, the plain Lewis integral


def _lewis_reference_call(
    params: HestonParams, spot: float, strike: float, t: float, r: float = 0.0, q: float = 0.0
) -> tuple[float, float]:
    """Heston call by Lewis's formula in 30-digit arithmetic, and the quadrature's error estimate.

    C = e^{-rT} F [1 − e^{y/2}/π ∫_0^∞ Re(e^{−iuy} φ(u − i/2)) / (u² + ¼) du],  y = ln(K/F),
    with φ the characteristic function of ln(S_T/F) in the little-trap form. No control variate:
    the integral runs to where the integrand is below 1e-25 (doubling the cut-off), on panels that
    resolve both the scale near u = 0 (powers of two) and each half-oscillation of the integrand.
    """
    mp = pytest.importorskip("mpmath").mp
    with mp.workdps(30):
        kappa, theta, sigma, rho, v0 = (mp.mpf(float(x)) for x in params.to_array())
        t_mp, r_mp, q_mp = mp.mpf(float(t)), mp.mpf(float(r)), mp.mpf(float(q))
        forward = mp.mpf(float(spot)) * mp.exp((r_mp - q_mp) * t_mp)
        y = mp.log(mp.mpf(float(strike)) / forward)

        def log_charfn(z: Any) -> Any:
            iz = 1j * z
            b = kappa - rho * sigma * iz
            d = mp.sqrt(b * b + sigma**2 * (iz + z * z))
            g = (b - d) / (b + d)
            decay = mp.exp(-d * t_mp)
            c = kappa * theta / sigma**2 * ((b - d) * t_mp - 2 * mp.log((1 - g * decay) / (1 - g)))
            return c + v0 * (b - d) / sigma**2 * (1 - decay) / (1 - g * decay)

        def integrand(u: Any) -> Any:
            return mp.re(mp.exp(log_charfn(u - 0.5j) - 1j * u * y)) / (u * u + 0.25)

        cutoff = mp.mpf(1)
        while mp.exp(mp.re(log_charfn(cutoff - 0.5j))) / cutoff**2 > mp.mpf(10) ** -25:
            cutoff *= 2
        frequency = abs(y) + abs(mp.im(log_charfn(cutoff - 0.5j))) / cutoff
        half_periods = int(mp.ceil(cutoff * frequency / mp.pi))
        points = {mp.mpf(0), cutoff}
        points.update(mp.mpf(2) ** k for k in range(-4, int(mp.log(cutoff, 2))))
        points.update(mp.linspace(0, cutoff, half_periods + 1) if half_periods > 1 else [])
        integral, error = mp.quad(integrand, sorted(points), method="gauss-legendre", error=True)
        price = mp.exp(-r_mp * t_mp) * forward * (1 - mp.exp(y / 2) / mp.pi * integral)
        scale = mp.exp(-r_mp * t_mp) * forward * mp.exp(y / 2) / mp.pi
        return float(price), float(scale * error)


def test_mpmath_reference_reproduces_quantlib_on_a_plain_case(ql: Any) -> None:
    """The 30-digit arbiter itself agrees with QuantLib where QuantLib is comfortable."""
    params, r, q = CASES["normal"]
    ql_calls, _ = _quantlib_prices(ql, params, r, q)
    i, j = 4, 3  # at the money, one year
    reference, error = _lewis_reference_call(params, SPOT, float(STRIKES[i]), float(MATURITIES[j]), r, q)
    assert error < 1e-15
    assert abs(reference - ql_calls[i, j]) < REL_TOL * 1e-3 * ql_calls[i, j]


# Very short maturities with a tiny spot variance (1% vol): the Fourier integrand decays slowly and
# oscillates for a long way, which is where quadratures (QuantLib's default one included) struggle.
TINY_V0 = HestonParams(kappa=1.5, theta=0.04, sigma=0.5, rho=-0.7, v0=1e-4)
SHORT_OPTIONS = [(1, 99.5), (1, 100.0), (1, 100.5), (7, 99.0), (7, 100.0), (7, 101.0)]


@pytest.mark.parametrize(("r", "q"), [(0.0, 0.0), (0.04, 0.01)], ids=["r=q=0", "r=4%,q=1%"])
def test_short_maturity_tiny_v0_matches_30_digit_lewis_integral(r: float, q: float) -> None:
    ours_calls, ours_puts, references = [], [], []
    for days, strike in SHORT_OPTIONS:
        t = days / 365.0
        reference, error = _lewis_reference_call(TINY_V0, SPOT, strike, t, r, q)
        assert error < 1e-15
        references.append(reference)
        ours_calls.append(call_prices(TINY_V0, SPOT, np.array([strike]), np.array([t]), r, q)[0, 0])
        ours_puts.append(put_prices(TINY_V0, SPOT, np.array([strike]), np.array([t]), r, q)[0, 0])
    calls = np.array(references)
    days, strikes = (np.array(column, dtype=np.float64) for column in zip(*SHORT_OPTIONS, strict=True))
    t = days / 365.0
    puts = calls - SPOT * np.exp(-q * t) + strikes * np.exp(-r * t)
    assert calls.min() > 1e-12  # every option has time value worth testing (the OTM ones are tiny)
    _assert_close_to_arbiter(np.array(ours_calls), calls, "short calls")
    _assert_close_to_arbiter(np.array(ours_puts), puts, "short puts")


# ---------------------------------------------------------------------------------------------
# Arbiter 3: the published value


def test_cos_paper_case() -> None:
    """Fang & Oosterlee (2008), Heston test: S0 = K = 100, T = 1, r = 0 prices 5.785155434."""
    expected = 5.7851554344
    price = call_prices(COS_PAPER, 100.0, np.array([100.0]), np.array([1.0]))
    assert price.shape == (1, 1)
    assert abs(price[0, 0] - expected) < 1e-9
    reference, _ = _lewis_reference_call(COS_PAPER, 100.0, 100.0, 1.0)
    assert abs(reference - expected) < 1e-9


# ---------------------------------------------------------------------------------------------
# Structure: parity, batching


@pytest.mark.parametrize("case", list(CASES))
def test_put_call_parity(case: str) -> None:
    params, r, q = CASES[case]
    for rate, dividend in ((r, q), (-0.01, 0.05)):
        calls = call_prices(params, SPOT, STRIKES, MATURITIES, rate, dividend)
        puts = put_prices(params, SPOT, STRIKES, MATURITIES, rate, dividend)
        forward_value = SPOT * np.exp(-dividend * MATURITIES)[None, :] - STRIKES[:, None] * np.exp(
            -rate * MATURITIES
        )[None, :]
        error = np.abs(calls - puts - forward_value)
        assert (error <= 1e-12 * np.maximum(calls, puts)).all(), error.max()


def test_batch_equals_one_parameter_set_at_a_time() -> None:
    sets = [params for params, _, _ in CASES.values()] + [COS_PAPER]
    batch = np.stack([params.to_array() for params in sets])
    for r, q in ((0.0, 0.0), (0.03, 0.01)):
        calls = call_prices(batch, SPOT, STRIKES, MATURITIES, r, q)
        puts = put_prices(batch, SPOT, STRIKES, MATURITIES, r, q)
        assert calls.shape == puts.shape == (len(sets), STRIKES.size, MATURITIES.size)
        for k, params in enumerate(sets):
            # Equal up to rounding: the batch groups quadrature work differently (matrix products).
            np.testing.assert_allclose(
                calls[k], call_prices(params, SPOT, STRIKES, MATURITIES, r, q), rtol=1e-13, atol=1e-14 * SPOT
            )
            np.testing.assert_allclose(
                puts[k], put_prices(params, SPOT, STRIKES, MATURITIES, r, q), rtol=1e-13, atol=1e-14 * SPOT
            )
    # A (5,) array is one parameter set, like HestonParams, not a batch of one.
    assert call_prices(NORMAL.to_array(), SPOT, STRIKES, MATURITIES).shape == (STRIKES.size, MATURITIES.size)
    assert call_prices(batch[:1], SPOT, STRIKES, MATURITIES).shape == (1, STRIKES.size, MATURITIES.size)


# ---------------------------------------------------------------------------------------------
# Torch pricer and its derivatives, on the project grid

GRID_STRIKES = SPOT * np.exp(grid.LOG_MONEYNESS)
TORCH_CASES = {"normal": (NORMAL, 0.03, 0.01), "feller-violated": (FELLER_VIOLATED, 0.0, 0.0)}


def _torch_prices(params: torch.Tensor, r: float, q: float) -> torch.Tensor:
    return call_prices_torch(
        params, SPOT, torch.tensor(GRID_STRIKES, dtype=torch.float64),
        torch.tensor(grid.MATURITIES, dtype=torch.float64), r, q,
    )  # fmt: skip


def test_torch_pricer_agrees_with_numpy() -> None:
    sets = [params for params, _, _ in CASES.values()] + [COS_PAPER]
    batch = np.stack([params.to_array() for params in sets])
    for r, q in ((0.0, 0.0), (0.03, 0.01)):
        expected = call_prices(batch, SPOT, GRID_STRIKES, grid.MATURITIES, r, q)
        batched = _torch_prices(torch.tensor(batch, dtype=torch.float64), r, q).numpy()
        assert batched.shape == expected.shape
        np.testing.assert_allclose(batched, expected, rtol=1e-12, atol=1e-12)
        for k, params in enumerate(sets):
            single = _torch_prices(torch.tensor(params.to_array(), dtype=torch.float64), r, q).numpy()
            np.testing.assert_allclose(single, expected[k], rtol=1e-12, atol=1e-12)


def _finite_difference_jacobian(params: HestonParams, r: float, q: float) -> np.ndarray:
    """d price / d parameter, (nK, nT, 5), by the fourth-order central difference of the numpy pricer.

    Steps are 1e-3 of each parameter (1e-3 absolute for rho): the truncation error is O(h⁴), about
    1e-12 relative, while the prices' rounding noise (~1e-14 absolute) divided by h stays near 1e-10.
    """
    x = params.to_array()
    jacobian = np.empty((GRID_STRIKES.size, grid.MATURITIES.size, x.size))
    for k in range(x.size):
        h = 1e-3 * (1.0 if k == 3 else x[k])

        def shifted(steps: int, k: int = k, h: float = h) -> np.ndarray:
            return call_prices(x + steps * h * np.eye(x.size)[k], SPOT, GRID_STRIKES, grid.MATURITIES, r, q)

        jacobian[..., k] = (shifted(-2) - 8.0 * shifted(-1) + 8.0 * shifted(1) - shifted(2)) / (12.0 * h)
    return jacobian


def _reverse_mode_jacobian(params: HestonParams, r: float, q: float) -> np.ndarray:
    """One ``backward`` per price of the surface."""
    leaf = torch.tensor(params.to_array(), dtype=torch.float64, requires_grad=True)
    prices = _torch_prices(leaf, r, q)
    rows = []
    for price in prices.reshape(-1):
        leaf.grad = None
        price.backward(retain_graph=True)
        assert leaf.grad is not None
        rows.append(leaf.grad.numpy().copy())
    return np.array(rows).reshape(*prices.shape, 5)


def _forward_mode_jacobian(params: HestonParams, r: float, q: float) -> np.ndarray:
    """One forward-mode pass per parameter, with a unit tangent."""
    primal = torch.tensor(params.to_array(), dtype=torch.float64)
    columns = []
    with forward_ad.dual_level():
        for k in range(5):
            dual = forward_ad.make_dual(primal, torch.eye(5, dtype=torch.float64)[k])
            tangent = forward_ad.unpack_dual(_torch_prices(dual, r, q)).tangent
            assert tangent is not None
            columns.append(tangent.numpy().copy())
    return np.stack(columns, axis=-1)


@pytest.mark.parametrize("case", list(TORCH_CASES))
@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_torch_gradients_match_finite_differences(case: str, mode: str) -> None:
    params, r, q = TORCH_CASES[case]
    assert params.feller() is (case == "normal")
    jacobian_of: Callable[[HestonParams, float, float], np.ndarray] = (
        _reverse_mode_jacobian if mode == "reverse" else _forward_mode_jacobian
    )
    ad = jacobian_of(params, r, q)
    fd = _finite_difference_jacobian(params, r, q)
    assert ad.shape == fd.shape == (*grid.SHAPE, 5)
    # 1e-6 relative per entry; entries near zero (far-OTM short options) are held to 1e-9 of that
    # parameter's largest sensitivity on the surface, as the difference quotient's noise allows.
    scale = np.abs(fd).max(axis=(0, 1))
    assert (scale > 0.1).all()
    error = np.abs(ad - fd)
    bound = 1e-6 * np.abs(fd) + 1e-9 * scale
    assert (error <= bound).all(), f"worst error/bound {(error / bound).max():.3g}"


# ---------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    "values",
    [
        {"rho": 1.0},
        {"rho": -1.0},
        {"rho": 1.5},
        {"kappa": -1.0},
        {"kappa": 0.0},
        {"theta": -0.04},
        {"sigma": 0.0},
        {"v0": -0.01},
        {"v0": math.nan},
    ],
    ids=lambda values: ",".join(f"{k}={v}" for k, v in values.items()),
)
def test_invalid_parameters_raise(values: dict[str, float]) -> None:
    fields = {"kappa": 1.0, "theta": 0.04, "sigma": 0.5, "rho": -0.5, "v0": 0.04} | values
    with pytest.raises(ValueError):
        HestonParams(**fields)
    row = np.array([fields[name] for name in ("kappa", "theta", "sigma", "rho", "v0")])
    for pricer in (call_prices, put_prices):
        with pytest.raises(ValueError):
            pricer(row, SPOT, STRIKES, MATURITIES)
        with pytest.raises(ValueError):
            pricer(np.stack([NORMAL.to_array(), row]), SPOT, STRIKES, MATURITIES)


@pytest.mark.parametrize(
    ("strikes", "maturities"),
    [
        (np.array([90.0, 0.0]), MATURITIES),
        (np.array([90.0, -100.0]), MATURITIES),
        (STRIKES, np.array([0.5, 0.0])),
        (STRIKES, np.array([-0.25])),
        (np.array([np.nan]), MATURITIES),
    ],
    ids=["zero-strike", "negative-strike", "zero-maturity", "negative-maturity", "nan-strike"],
)
def test_invalid_strikes_and_maturities_raise(strikes: np.ndarray, maturities: np.ndarray) -> None:
    for pricer in (call_prices, put_prices):
        with pytest.raises(ValueError):
            pricer(NORMAL, SPOT, strikes, maturities)


@pytest.mark.parametrize("spot", [0.0, -100.0, math.inf])
def test_invalid_spot_raises(spot: float) -> None:
    for pricer in (call_prices, put_prices):
        with pytest.raises(ValueError):
            pricer(NORMAL, spot, STRIKES, MATURITIES)
