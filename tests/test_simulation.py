"""Heston path simulation: QE accuracy against exact prices, martingale drift, regime switching."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.integrate import simpson
from scipy.linalg import expm, logm
from scipy.special import ndtr

from models.heston import HestonParams
from models.simulation import (
    BULL,
    CRASH,
    PSI_CRITICAL,
    MarkovRegimeChain,
    Regime,
    generator_matrix,
    simulate,
    simulate_regimes,
    step,
    transition_matrix,
)

FELLER_BREAKER = HestonParams(kappa=0.5, theta=0.04, sigma=1.0, rho=-0.9, v0=0.04)  # Andersen's case I
POSITIVE_RHO = HestonParams(kappa=2.0, theta=0.04, sigma=0.5, rho=0.6, v0=0.04)
SCHEMES = ("qe", "euler")


# --- basic properties ---------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_shapes_start_values_and_non_negative_variance(scheme: str) -> None:
    S, V = simulate(FELLER_BREAKER, 50.0, 2.0, 40, 300, mu=0.1, scheme=scheme, seed=3)
    assert S.shape == V.shape == (41, 300)
    assert np.all(S[0] == 50.0) and np.all(V[0] == FELLER_BREAKER.v0)
    assert np.isfinite(S).all() and (S > 0).all()
    assert (V >= 0.0).all()
    # Feller fails badly here, so a correct scheme must actually reach zero variance.
    assert (V == 0.0).any()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_reproducible_by_seed(scheme: str) -> None:
    first = simulate(POSITIVE_RHO, 100.0, 1.0, 20, 50, scheme=scheme, seed=11)
    again = simulate(POSITIVE_RHO, 100.0, 1.0, 20, 50, scheme=scheme, seed=11)
    other = simulate(POSITIVE_RHO, 100.0, 1.0, 20, 50, scheme=scheme, seed=12)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_simulate_is_the_documented_loop_over_step(scheme: str) -> None:
    """simulate = default_rng(seed), one (2, n) normal draw per step, fed to step: the streaming contract."""
    steps, n_paths, T, mu = 15, 40, 1.5, 0.2
    S, V = simulate(FELLER_BREAKER, 80.0, T, steps, n_paths, mu=mu, scheme=scheme, seed=5)
    rng = np.random.default_rng(5)
    log_s, v = np.full(n_paths, math.log(80.0)), np.full(n_paths, FELLER_BREAKER.v0)
    for k in range(steps):
        z = rng.standard_normal((2, n_paths))
        log_s, v = step(log_s, v, FELLER_BREAKER, mu, T / steps, z[0], z[1], scheme)
        np.testing.assert_allclose(S[k + 1], np.exp(log_s), rtol=1e-13)
        np.testing.assert_array_equal(V[k + 1], np.maximum(v, 0.0))


def test_step_broadcasts_scalars_and_keeps_shape() -> None:
    log_s, v = step(math.log(100.0), 0.04, POSITIVE_RHO, 0.0, 1 / 252, 0.3, -1.2)
    assert np.shape(log_s) == () and np.shape(v) == ()
    grid_log_s, grid_v = step(
        np.full((3, 4), math.log(100.0)), 0.04, POSITIVE_RHO, 0.0, 1 / 252, np.full((3, 4), 0.3), -1.2
    )
    assert grid_log_s.shape == grid_v.shape == (3, 4)
    np.testing.assert_allclose(grid_log_s, log_s, rtol=1e-14)
    np.testing.assert_allclose(grid_v, v, rtol=1e-14)


def test_euler_state_can_go_negative_but_reported_variance_cannot() -> None:
    """Full truncation carries the raw state below zero; simulate reports max(state, 0)."""
    z_v = np.array([-4.0])
    _, state = step(np.zeros(1), np.array([0.001]), FELLER_BREAKER, 0.0, 0.25, z_v, np.zeros(1), "euler")
    assert state[0] < 0.0
    _, next_state = step(np.zeros(1), state, FELLER_BREAKER, 0.0, 0.25, np.zeros(1), np.zeros(1), "euler")
    # With v⁺ = 0 only the mean-reversion pull kappa·theta·dt acts on the raw state.
    assert next_state[0] == pytest.approx(state[0] + 0.5 * 0.04 * 0.25)


def test_invalid_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="scheme"):
        simulate(POSITIVE_RHO, 100.0, 1.0, 10, 10, scheme="milstein")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="spot"):
        simulate(POSITIVE_RHO, 0.0, 1.0, 10, 10)
    with pytest.raises(ValueError, match="dt"):
        step(np.zeros(1), np.ones(1), POSITIVE_RHO, 0.0, 0.0, np.zeros(1), np.zeros(1))


# --- QE moments and martingale correction, by quadrature (no Monte Carlo noise) ------------

_Z = np.linspace(-12.0, 12.0, 240_001)
_PHI = np.exp(-0.5 * _Z**2) / math.sqrt(2.0 * math.pi)


def _cir_moments(p: HestonParams, v: float, dt: float) -> tuple[float, float]:
    """Exact conditional mean and variance of the CIR process after dt."""
    e = math.exp(-p.kappa * dt)
    mean = p.theta + (v - p.theta) * e
    variance = v * p.sigma**2 * e * (1 - e) / p.kappa + p.theta * p.sigma**2 * (1 - e) ** 2 / (2 * p.kappa)
    return mean, variance


def _psi(p: HestonParams, v: float, dt: float) -> float:
    mean, variance = _cir_moments(p, v, dt)
    return variance / mean**2


# (params, v, dt): quadratic-branch and exponential-branch starting points, negative and positive rho.
_QE_POINTS = [
    (FELLER_BREAKER, 0.3, 0.125),
    (FELLER_BREAKER, 0.1, 0.125),
    (FELLER_BREAKER, 0.04, 0.125),
    (FELLER_BREAKER, 0.002, 0.125),
    (FELLER_BREAKER, 0.0, 1.0),
    (POSITIVE_RHO, 0.04, 1 / 52),
    (POSITIVE_RHO, 1e-4, 1 / 52),
]


def test_qe_points_cover_both_branches() -> None:
    branches = {_psi(p, v, dt) <= PSI_CRITICAL for p, v, dt in _QE_POINTS}
    assert branches == {True, False}


@pytest.mark.parametrize(("params", "v", "dt"), _QE_POINTS)
def test_qe_variance_matches_cir_mean_and_variance(params: HestonParams, v: float, dt: float) -> None:
    """QE is moment matched: E[v'] and Var[v'] equal the exact CIR conditional moments."""
    _, v_next = step(np.zeros_like(_Z), np.full_like(_Z, v), params, 0.0, dt, _Z, np.zeros_like(_Z))
    mean, variance = _cir_moments(params, v, dt)
    qe_mean = simpson(v_next * _PHI, x=_Z)
    qe_variance = simpson((v_next - qe_mean) ** 2 * _PHI, x=_Z)
    assert qe_mean == pytest.approx(mean, rel=1e-7)
    assert qe_variance == pytest.approx(variance, rel=1e-6)
    psi = _psi(params, v, dt)
    if psi > PSI_CRITICAL:  # the exponential branch puts mass (psi − 1)/(psi + 1) exactly at zero
        assert ndtr(_Z[v_next == 0.0].max()) == pytest.approx((psi - 1) / (psi + 1), abs=1e-4)


@pytest.mark.parametrize(("params", "v", "dt"), _QE_POINTS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_one_step_is_a_martingale_after_drift(scheme: str, params: HestonParams, v: float, dt: float) -> None:
    """E[S_{t+dt} | S_t, v_t] = S_t e^{mu dt} exactly, integrating z_s analytically and z_v by quadrature."""
    mu = 0.3
    zeros, ones = np.zeros_like(_Z), np.ones_like(_Z)
    v_start = np.full_like(_Z, v)
    log_s0, _ = step(zeros, v_start, params, mu, dt, _Z, zeros, scheme)
    log_s1, _ = step(zeros, v_start, params, mu, dt, _Z, ones, scheme)
    price_vol = log_s1 - log_s0  # the z_s loading, so E_{z_s}[S'/S] = exp(log_s0 + price_vol²/2)
    expectation = simpson(np.exp(log_s0 + 0.5 * price_vol**2) * _PHI, x=_Z)
    assert expectation == pytest.approx(math.exp(mu * dt), rel=1e-7)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("params", [FELLER_BREAKER, POSITIVE_RHO])
def test_expected_terminal_price_grows_at_mu(scheme: str, params: HestonParams) -> None:
    """E[S_T] = S0·exp(mu·T) within 3 Monte Carlo standard errors, at a coarse monthly step."""
    spot, T, mu = 100.0, 2.0, 0.15
    S, _ = simulate(params, spot, T, 24, 40_000, mu=mu, scheme=scheme, seed=21)
    terminal = S[-1]
    standard_error = terminal.std(ddof=1) / math.sqrt(terminal.size)
    assert abs(terminal.mean() - spot * math.exp(mu * T)) < 3.0 * standard_error


# --- Andersen (2008) bias test -------------------------------------------------------------

# Andersen's three test cases (his Table 1): S0 = 100, r = 0, v0 = theta, at-the-money call.
ANDERSEN_CASES = {
    "I": (HestonParams(kappa=0.5, theta=0.04, sigma=1.0, rho=-0.9, v0=0.04), 10.0),
    "II": (HestonParams(kappa=0.3, theta=0.04, sigma=0.9, rho=-0.5, v0=0.04), 15.0),
    "III": (HestonParams(kappa=1.0, theta=0.09, sigma=1.0, rho=-0.3, v0=0.09), 5.0),
}
# Paths per case and scheme, in batches to bound memory; with the S_T control variate this
# puts the standard error near 0.02–0.05, against Euler biases of 0.4–1.2.
_PATHS, _BATCH = 200_000, 25_000
STEPS_PER_YEAR = 8


def _quantlib_call(
    params: HestonParams, T: float, strike: float = 100.0, rate: float = 0.0, spot: float = 100.0
) -> float:
    """Exact Heston call price from QuantLib's AnalyticHestonEngine (no dividends)."""
    ql = pytest.importorskip("QuantLib")
    settings = ql.Settings.instance()
    previous = settings.evaluationDate
    today = ql.Date(2, 1, 2020)
    settings.evaluationDate = today
    try:
        day_count = ql.Actual365Fixed()
        discount = ql.YieldTermStructureHandle(ql.FlatForward(today, rate, day_count))
        dividend = ql.YieldTermStructureHandle(ql.FlatForward(today, 0.0, day_count))
        process = ql.HestonProcess(
            discount, dividend, ql.QuoteHandle(ql.SimpleQuote(spot)), params.v0, params.kappa, params.theta,
            params.sigma, params.rho,
        )  # fmt: skip
        expiry = today + round(T * 365)
        option = ql.EuropeanOption(ql.PlainVanillaPayoff(ql.Option.Call, strike), ql.EuropeanExercise(expiry))
        option.setPricingEngine(ql.AnalyticHestonEngine(ql.HestonModel(process)))
        return float(option.NPV())
    finally:
        settings.evaluationDate = previous


def _call_estimate(params: HestonParams, T: float, scheme: str, seed: int) -> tuple[float, float]:
    """MC call price and its standard error, with S_T as control variate.

    Both schemes keep E[S_T] = S0 exactly (QE through its martingale correction, Euler through
    its conditionally Gaussian log step; tested above), so the control variate adds no bias.
    """
    steps = round(STEPS_PER_YEAR * T)
    terminal = np.concatenate(
        [
            simulate(params, 100.0, T, steps, _BATCH, scheme=scheme, seed=[seed, batch])[0][-1]
            for batch in range(_PATHS // _BATCH)
        ]
    )
    payoff = np.maximum(terminal - 100.0, 0.0)
    covariance = np.cov(payoff, terminal)
    controlled = payoff - covariance[0, 1] / covariance[1, 1] * (terminal - 100.0)
    return float(controlled.mean()), float(controlled.std(ddof=1) / math.sqrt(controlled.size))


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(ANDERSEN_CASES))
def test_qe_is_unbiased_and_euler_is_not_on_andersen_cases(case: str) -> None:
    params, T = ANDERSEN_CASES[case]
    exact = _quantlib_call(params, T)
    qe_price, qe_se = _call_estimate(params, T, "qe", seed=1)
    euler_price, euler_se = _call_estimate(params, T, "euler", seed=2)
    qe_bias, euler_bias = qe_price - exact, euler_price - exact
    report = (
        f"exact {exact:.4f}; QE bias {qe_bias:+.4f} (SE {qe_se:.4f}); "
        f"Euler bias {euler_bias:+.4f} (SE {euler_se:.4f})"
    )
    assert abs(qe_bias) < 3.0 * qe_se, report
    assert abs(euler_bias) > 3.0 * euler_se, report
    assert abs(euler_bias) - abs(qe_bias) > 3.0 * math.hypot(qe_se, euler_se), report


def test_andersen_reference_prices_match_the_literature() -> None:
    """Published exact prices pin the case parameters down.

    Cases I and II: Andersen's K = 100 prices (13.085, 16.649), also used by Van Haastrecht &
    Pelsser (2010). Case III: they price it with r = 5 % (33.597, 18.157, 56.575 at K = 100,
    140, 60); Andersen's own case III has r = 0, which is what the bias test uses.
    """
    assert _quantlib_call(*ANDERSEN_CASES["I"]) == pytest.approx(13.085, abs=5e-4)
    assert _quantlib_call(*ANDERSEN_CASES["II"]) == pytest.approx(16.649, abs=5e-4)
    for strike, price in ((100.0, 33.597), (140.0, 18.157), (60.0, 56.575)):
        assert _quantlib_call(*ANDERSEN_CASES["III"], strike=strike, rate=0.05) == pytest.approx(
            price, abs=5e-4
        )


# --- regime switching ----------------------------------------------------------------------


def test_seed_regimes_match_the_design() -> None:
    assert (BULL.mu, BULL.params.theta, BULL.params.sigma, BULL.params.kappa) == (0.10, 0.02, 0.1, 3.0)
    assert (CRASH.mu, CRASH.params.theta, CRASH.params.sigma, CRASH.params.kappa) == (-0.30, 0.16, 0.8, 0.5)
    for regime in (BULL, CRASH):
        assert regime.params.rho == -0.7 and regime.params.v0 == regime.params.theta


def test_fixed_switch_labels_are_exact() -> None:
    steps, T = 100, 2.0  # dt = 0.02
    switches = [(0.5, 1), (1.23, 0), (1.5, 1)]  # 1.23 is off the grid: takes effect at t = 1.24
    paths = simulate_regimes((BULL, CRASH), 100.0, T, steps, 7, switch_times=switches, seed=0)
    expected = np.zeros(steps + 1, dtype=int)
    expected[25:62] = 1
    expected[75:] = 1
    assert paths.labels.shape == (steps + 1, 7)
    np.testing.assert_array_equal(paths.labels, np.repeat(expected[:, None], 7, axis=1))


def test_fixed_switch_carries_the_state_and_changes_only_the_dynamics() -> None:
    """The stitched path equals stepping BULL up to the switch and CRASH after it from the same state."""
    steps, T, n_paths, switch_row = 60, 1.0, 30, 36
    paths = simulate_regimes(
        (BULL, CRASH), 100.0, T, steps, n_paths, switch_times=[(switch_row * T / steps, 1)], seed=9
    )
    rng = np.random.default_rng(9)
    log_s, v = np.full(n_paths, math.log(100.0)), np.full(n_paths, BULL.params.v0)
    for k in range(steps):
        regime = BULL if k < switch_row else CRASH
        z = rng.standard_normal((2, n_paths))
        log_s, v = step(log_s, v, regime.params, regime.mu, T / steps, z[0], z[1])
        np.testing.assert_allclose(paths.S[k + 1], np.exp(log_s), rtol=1e-12)
        np.testing.assert_allclose(paths.V[k + 1], v, rtol=1e-12)
    # And not a restart: at the switch the variance is the bull state, not CRASH's v0.
    assert np.all(np.abs(paths.V[switch_row] - CRASH.params.v0) > 0.05)
    bull_only, bull_variance = simulate(BULL.params, 100.0, T, steps, n_paths, mu=BULL.mu, seed=9)
    np.testing.assert_allclose(paths.S[: switch_row + 1], bull_only[: switch_row + 1], rtol=1e-12)
    np.testing.assert_allclose(paths.V[: switch_row + 1], bull_variance[: switch_row + 1], rtol=1e-12)
    assert not np.allclose(paths.V[switch_row + 1 :], bull_variance[switch_row + 1 :])


THREE_REGIMES = (BULL, CRASH, Regime(HestonParams(1.5, 0.05, 0.4, -0.5, 0.05), mu=0.02, name="choppy"))
INTENSITIES = np.array([[0.0, 0.6, 1.2], [3.0, 0.0, 2.0], [1.0, 1.5, 0.0]])


def _transition_counts(labels: np.ndarray, n_states: int) -> np.ndarray:
    counts = np.zeros((n_states, n_states))
    np.add.at(counts, (labels[:-1].ravel(), labels[1:].ravel()), 1.0)
    return counts


def test_markov_switching_rates_match_the_intensities() -> None:
    """Generator estimated from the labelled paths (logm of the empirical transition matrix) ≈ intensities."""
    steps, T, n_paths = 250, 5.0, 2_000
    dt = T / steps
    paths = simulate_regimes(THREE_REGIMES, 100.0, T, steps, n_paths, intensities=INTENSITIES, seed=4)
    assert (paths.labels[0] == 0).all()
    counts = _transition_counts(paths.labels, 3)
    empirical = counts / counts.sum(axis=1, keepdims=True)
    estimated = logm(empirical).real / dt
    exits = counts.sum(axis=1)
    for i in range(3):
        for j in range(3):
            if i == j:
                continue
            # Poisson standard error of a rate: √(number of i→j switches) / (time spent in i).
            standard_error = math.sqrt(counts[i, j]) / (exits[i] * dt)
            assert abs(estimated[i, j] - INTENSITIES[i, j]) < 3.0 * standard_error, (i, j, estimated)
    # The grid transition frequencies themselves match expm(Q dt) (binomial standard errors).
    exact = expm(generator_matrix(INTENSITIES) * dt)
    binomial_se = np.sqrt(exact * (1.0 - exact) / exits[:, None])
    assert (np.abs(empirical - exact) < 3.0 * binomial_se).all()


def test_markov_paths_switch_dynamics_per_path() -> None:
    """Each path uses its own label's dynamics: crash steps are far more volatile than bull steps."""
    paths = simulate_regimes(
        (BULL, CRASH), 100.0, 4.0, 1000, 400, intensities=[[0.0, 1.0], [2.0, 0.0]], initial_regime=1, seed=6
    )
    assert (paths.labels[0] == 1).all()
    assert np.isin(paths.labels, (0, 1)).all()
    step_labels = paths.labels[:-1]
    in_both = (step_labels == 0).any(axis=0) & (step_labels == 1).any(axis=0)
    assert in_both.mean() > 0.5  # paths really do switch, independently
    assert not (step_labels == step_labels[:, :1]).all()
    variance_change = np.abs(np.diff(paths.V, axis=0))
    assert variance_change[step_labels == 1].mean() > 3.0 * variance_change[step_labels == 0].mean()


def test_streaming_chain_matches_the_transition_matrix() -> None:
    chain = MarkovRegimeChain(INTENSITIES, initial=2, rng=np.random.default_rng(8))
    dt = 0.05
    states = np.array([2] + [chain.advance(dt) for _ in range(20_000)])
    counts = _transition_counts(states[:, None], 3)
    exits = counts.sum(axis=1)
    empirical = counts / exits[:, None]
    exact = transition_matrix(generator_matrix(INTENSITIES), dt)
    binomial_se = np.sqrt(exact * (1.0 - exact) / exits[:, None])
    assert (np.abs(empirical - exact) < 3.0 * binomial_se).all()
    assert chain.state == states[-1]


def test_generator_accepts_zero_or_generator_diagonal_only() -> None:
    q = generator_matrix([[0.0, 2.0], [1.0, 0.0]])
    np.testing.assert_array_equal(q, [[-2.0, 2.0], [1.0, -1.0]])
    np.testing.assert_array_equal(generator_matrix(q), q)
    with pytest.raises(ValueError, match="diagonal"):
        generator_matrix([[1.0, 2.0], [1.0, 0.0]])
    with pytest.raises(ValueError, match="≥ 0"):
        generator_matrix([[0.0, -2.0], [1.0, 0.0]])
    np.testing.assert_allclose(transition_matrix(q, 50.0), [[1 / 3, 2 / 3], [1 / 3, 2 / 3]], atol=1e-12)


def test_regime_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        simulate_regimes((BULL, CRASH), 100.0, 1.0, 10, 5)
    with pytest.raises(ValueError, match="exactly one"):
        simulate_regimes(
            (BULL, CRASH), 100.0, 1.0, 10, 5, switch_times=[(0.5, 1)], intensities=[[0, 1], [1, 0]]
        )
    with pytest.raises(ValueError, match="increasing"):
        simulate_regimes((BULL, CRASH), 100.0, 1.0, 10, 5, switch_times=[(0.5, 1), (0.3, 0)])
    with pytest.raises(ValueError, match="regime"):
        simulate_regimes((BULL, CRASH), 100.0, 1.0, 10, 5, switch_times=[(0.5, 2)])
    with pytest.raises(ValueError, match="3 regimes"):
        simulate_regimes(THREE_REGIMES, 100.0, 1.0, 10, 5, intensities=[[0, 1], [1, 0]])
