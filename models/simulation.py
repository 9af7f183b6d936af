"""Monte Carlo paths of the Heston model, with regime switching for labelled synthetic markets.

The price is stepped in logs under the real-world measure,

    d ln S = (mu − v/2) dt + √v dW_S,    dv = kappa (theta − v) dt + sigma √v dW_v,    d⟨W_S, W_v⟩ = rho dt,

with one of two variance schemes:

* ``"qe"`` (default): Andersen's (2008) quadratic-exponential scheme. The variance is drawn
  from a moment-matched squared Gaussian (``psi ≤ 1.5``) or a point mass at zero plus an
  exponential (``psi > 1.5``); the log-price uses the central discretisation
  (``gamma1 = gamma2 = 1/2``) of the integrated variance and Andersen's martingale correction,
  so the discrete scheme keeps ``E[S_{t+dt} | S_t] = S_t e^{mu dt}`` exactly. Its bias at a few
  steps per year is small even when the Feller condition fails badly.
* ``"euler"``: Euler with full truncation (Lord, Koekkoek & van Dijk 2010), the best Euler
  variant but visibly biased at coarse steps; kept as the simple baseline QE is measured against.

Every simulator here is built on :func:`step`, which takes its standard normals from the
caller so that another component can correlate several assets or stream one step at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal, NamedTuple

import numpy as np
from scipy.linalg import expm
from scipy.special import log_ndtr

from models.heston import HestonParams

Scheme = Literal["qe", "euler"]
SCHEMES: tuple[str, ...] = ("qe", "euler")
SeedLike = int | Sequence[int] | np.random.Generator | None

# Andersen's switching threshold between the quadratic and the exponential variance draws.
PSI_CRITICAL = 1.5
# Central discretisation of ∫v dt in the log-price step (Andersen's gamma1 = gamma2).
_GAMMA1 = 0.5
_GAMMA2 = 0.5


def step(
    log_s: np.ndarray,
    v: np.ndarray,
    params: HestonParams,
    mu: float,
    dt: float,
    z_v: np.ndarray,
    z_s: np.ndarray,
    scheme: Scheme = "qe",
) -> tuple[np.ndarray, np.ndarray]:
    """Advance ``(ln S, v)`` by ``dt`` years given independent standard normals (arrays broadcast).

    ``z_v`` drives the variance; ``z_s`` is the part of the price shock *orthogonal* to it
    (the scheme applies ``rho`` itself), so correlating ``z_s`` across assets correlates their
    idiosyncratic price moves. QE's exponential branch uses ``Φ(z_v)`` as its uniform.

    The returned ``v`` is the scheme's state, to be fed back unchanged: for ``"qe"`` it is the
    variance (≥ 0); for ``"euler"`` it is the full-truncation auxiliary, which may dip below
    zero, and the variance is ``max(v, 0)``.
    """
    if dt <= 0.0:
        raise ValueError(f"dt must be > 0, got {dt!r}")
    if scheme == "qe":
        return _qe_step(log_s, v, params, mu, dt, z_v, z_s)
    if scheme == "euler":
        return _euler_step(log_s, v, params, mu, dt, z_v, z_s)
    raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")


def _qe_step(
    log_s: np.ndarray,
    v: np.ndarray,
    p: HestonParams,
    mu: float,
    dt: float,
    z_v: np.ndarray,
    z_s: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Andersen's QE step with martingale correction (his equations 23–33)."""
    shape = np.broadcast_shapes(*(np.shape(x) for x in (log_s, v, z_v, z_s)))
    # At least 1-d so that the exponential branch can be written into its paths by mask.
    log_s, v, z_v, z_s = np.broadcast_arrays(*(np.atleast_1d(x) for x in (log_s, v, z_v, z_s)))
    decay = math.exp(-p.kappa * dt)
    s2_from_v = p.sigma**2 * decay * (1.0 - decay) / p.kappa
    s2_const = p.theta * p.sigma**2 * (1.0 - decay) ** 2 / (2.0 * p.kappa)
    m = p.theta + (v - p.theta) * decay
    psi = (s2_from_v * v + s2_const) / (m * m)

    k_common = p.kappa * p.rho / p.sigma - 0.5
    k0 = -p.rho * p.kappa * p.theta * dt / p.sigma
    k1 = _GAMMA1 * dt * k_common - p.rho / p.sigma
    k2 = _GAMMA2 * dt * k_common + p.rho / p.sigma
    k3 = _GAMMA1 * dt * (1.0 - p.rho**2)
    k4 = _GAMMA2 * dt * (1.0 - p.rho**2)
    big_a = k2 + 0.5 * k4

    # Quadratic branch v' = a (b + z)², evaluated on every path with psi clipped into its
    # domain; the (usually few) exponential-branch paths are overwritten below. The martingale
    # correction is −ln E[exp(A v')] under the discrete law of v'. That moment is infinite when
    # 2·A·a ≥ 1 or A ≥ beta (possible only for rho > 0 at coarse steps): no finite correction
    # exists there, and those paths keep Andersen's uncorrected K0.
    two_over_psi = 2.0 / np.minimum(psi, PSI_CRITICAL)
    b2 = two_over_psi - 1.0 + np.sqrt(two_over_psi * (two_over_psi - 1.0))
    a = m / (1.0 + b2)
    v_next = a * (np.sqrt(b2) + z_v) ** 2
    one_minus_2aa = 1.0 - 2.0 * big_a * a
    moment_exists = one_minus_2aa > 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        log_mgf = big_a * b2 * a / one_minus_2aa - 0.5 * np.log(one_minus_2aa)

    exponential = psi > PSI_CRITICAL
    if exponential.any():
        # v' = 0 with probability prob_zero, else exponential with rate beta; U = Φ(z_v), and
        # ln(1 − U) = ln Φ(−z_v) stays accurate in both tails.
        psi_e = psi[exponential]
        prob_zero = (psi_e - 1.0) / (psi_e + 1.0)
        beta = (1.0 - prob_zero) / m[exponential]
        log_tail = log_ndtr(-z_v[exponential])
        v_next[exponential] = np.maximum(np.log1p(-prob_zero) - log_tail, 0.0) / beta
        with np.errstate(divide="ignore", invalid="ignore"):
            log_mgf[exponential] = np.log(prob_zero + beta * (1.0 - prob_zero) / (beta - big_a))
        moment_exists[exponential] = beta > big_a

    drift = np.where(moment_exists, -log_mgf - 0.5 * k3 * v, k0 + k1 * v)
    log_s_next = log_s + mu * dt + drift + k2 * v_next + np.sqrt(k3 * v + k4 * v_next) * z_s
    return log_s_next.reshape(shape), v_next.reshape(shape)


def _euler_step(
    log_s: np.ndarray,
    v: np.ndarray,
    p: HestonParams,
    mu: float,
    dt: float,
    z_v: np.ndarray,
    z_s: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Euler full truncation: ``v⁺ = max(v, 0)`` in drift and diffusion, the raw ``v`` carried."""
    v_plus = np.maximum(v, 0.0)
    root_var_dt = np.sqrt(v_plus * dt)
    v_next = v + p.kappa * (p.theta - v_plus) * dt + p.sigma * root_var_dt * z_v
    price_shock = p.rho * z_v + math.sqrt(1.0 - p.rho**2) * z_s
    log_s_next = log_s + (mu - 0.5 * v_plus) * dt + root_var_dt * price_shock
    return log_s_next, v_next


def _check_grid(spot: float, T: float, steps: int, n_paths: int, scheme: str) -> None:
    if not spot > 0.0:
        raise ValueError(f"spot must be > 0, got {spot!r}")
    if not T > 0.0:
        raise ValueError(f"T must be > 0, got {T!r}")
    if steps < 1 or n_paths < 1:
        raise ValueError(f"steps and n_paths must be ≥ 1, got {steps!r} and {n_paths!r}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")


def simulate(
    params: HestonParams,
    spot: float,
    T: float,
    steps: int,
    n_paths: int,
    mu: float = 0.0,
    scheme: Scheme = "qe",
    seed: SeedLike = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Price and variance paths ``(S, V)``, each of shape ``(steps + 1, n_paths)``, row 0 the start.

    Reproducible by ``seed``: each step draws ``rng.standard_normal((2, n_paths))`` (row 0 is
    ``z_v``, row 1 is ``z_s``) from ``np.random.default_rng(seed)`` and calls :func:`step`.
    ``V`` is the variance, ``max(state, 0)``.
    """
    _check_grid(spot, T, steps, n_paths, scheme)
    rng = np.random.default_rng(seed)
    dt = T / steps
    log_paths = np.empty((steps + 1, n_paths))
    var_paths = np.empty((steps + 1, n_paths))
    log_s = np.full(n_paths, math.log(spot))
    v = np.full(n_paths, params.v0)
    log_paths[0], var_paths[0] = log_s, v
    for k in range(steps):
        z = rng.standard_normal((2, n_paths))
        log_s, v = step(log_s, v, params, mu, dt, z[0], z[1], scheme)
        log_paths[k + 1] = log_s
        np.maximum(v, 0.0, out=var_paths[k + 1])
    prices = np.exp(log_paths, out=log_paths)
    prices[0] = spot  # exactly, not exp(log(spot))
    return prices, var_paths


@dataclass(frozen=True, slots=True)
class Regime:
    """One market regime: Heston dynamics plus the real-world drift ``mu`` (per year)."""

    params: HestonParams
    mu: float
    name: str


# The design's bull → crash stitch (chapter 4): a calm, fast mean-reverting bull market and a
# crash with negative drift, high long-run variance and extreme, sticky vol of vol.
BULL = Regime(HestonParams(kappa=3.0, theta=0.02, sigma=0.1, rho=-0.7, v0=0.02), mu=0.10, name="bull")
CRASH = Regime(HestonParams(kappa=0.5, theta=0.16, sigma=0.8, rho=-0.7, v0=0.16), mu=-0.30, name="crash")


class RegimePaths(NamedTuple):
    """Regime-switching paths; ``labels[k]`` is the regime whose dynamics drive step k → k+1."""

    S: np.ndarray
    V: np.ndarray
    labels: np.ndarray


def generator_matrix(intensities: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """The CTMC generator from per-year switching rates (off-diagonal entries).

    The diagonal may be given as zeros or as the generator's ``−row sum``; anything else is
    rejected because it would silently mean a different chain.
    """
    rates = np.array(intensities, dtype=np.float64)
    if rates.ndim != 2 or rates.shape[0] != rates.shape[1] or rates.shape[0] < 1:
        raise ValueError(f"intensities must be a square matrix, got shape {rates.shape}")
    if not np.isfinite(rates).all():
        raise ValueError("intensities must be finite")
    diagonal = np.diag(rates).copy()
    np.fill_diagonal(rates, 0.0)
    if (rates < 0.0).any():
        raise ValueError("off-diagonal intensities must be ≥ 0")
    exit_rates = rates.sum(axis=1)
    zero_diag = diagonal == 0.0
    generator_diag = np.isclose(diagonal, -exit_rates, rtol=1e-12, atol=1e-12)
    if not (zero_diag | generator_diag).all():
        raise ValueError("intensity diagonal must be 0 or minus the row's off-diagonal sum")
    np.fill_diagonal(rates, -exit_rates)
    return rates


def transition_matrix(generator: np.ndarray, dt: float) -> np.ndarray:
    """Exact ``dt``-step transition probabilities ``expm(Q dt)``, rows renormalised against round-off."""
    if dt <= 0.0:
        raise ValueError(f"dt must be > 0, got {dt!r}")
    probabilities = np.clip(expm(generator * dt), 0.0, None)
    return probabilities / probabilities.sum(axis=1, keepdims=True)


def _next_states(cumulative: np.ndarray, states: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Inverse-CDF draw of the next states from the rows ``cumulative[states]``.

    Loops over the few states rather than reducing along a length-n_states axis, which numpy
    does slowly.
    """
    next_states = np.zeros(states.shape, dtype=np.int64)
    for column in cumulative[:, :-1].T:
        next_states += uniforms >= column[states]
    return next_states


class MarkovRegimeChain:
    """A single continuous-time regime chain that callers advance themselves (streaming markets).

    Sampling through ``expm(Q dt)`` is exact at the times the caller asks for, whatever ``dt``.
    """

    def __init__(
        self,
        intensities: np.ndarray | Sequence[Sequence[float]],
        initial: int,
        rng: np.random.Generator,
    ) -> None:
        self._generator = generator_matrix(intensities)
        if not 0 <= initial < self._generator.shape[0]:
            raise ValueError(f"initial regime {initial} outside 0..{self._generator.shape[0] - 1}")
        self._rng = rng
        self._cumulative_by_dt: dict[float, np.ndarray] = {}
        self.state = initial

    def advance(self, dt: float) -> int:
        """Move the chain ``dt`` years forward and return the regime it is in then."""
        cumulative = self._cumulative_by_dt.get(dt)
        if cumulative is None:
            cumulative = np.cumsum(transition_matrix(self._generator, dt), axis=1)
            self._cumulative_by_dt[dt] = cumulative
        uniform = self._rng.random(1)
        self.state = int(_next_states(cumulative, np.array([self.state]), uniform)[0])
        return self.state


def _fixed_labels(
    switch_times: Sequence[tuple[float, int]], initial_regime: int, T: float, steps: int, n_regimes: int
) -> np.ndarray:
    """Per-row regime index for fixed switches; a switch at τ takes effect at the first grid time ≥ τ."""
    times = [float(t) for t, _ in switch_times]
    if any(b <= a for a, b in pairwise(times)):
        raise ValueError(f"switch times must be strictly increasing, got {times}")
    dt = T / steps
    row_labels = np.full(steps + 1, initial_regime, dtype=np.int64)
    for time, regime in switch_times:
        if not 0.0 <= time <= T:
            raise ValueError(f"switch time {time} outside [0, {T}]")
        if not 0 <= regime < n_regimes:
            raise ValueError(f"switch regime {regime} outside 0..{n_regimes - 1}")
        # Relative tolerance so that a time meant to sit on the grid is not pushed a step late.
        first_row = math.ceil(time / dt - 1e-9)
        row_labels[first_row:] = regime
    return row_labels


def _markov_labels(
    generator: np.ndarray, initial_regime: int, dt: float, steps: int, n_paths: int, rng: np.random.Generator
) -> np.ndarray:
    """The chain sampled exactly on the step grid, one independent chain per path."""
    cumulative = np.cumsum(transition_matrix(generator, dt), axis=1)
    labels = np.empty((steps + 1, n_paths), dtype=np.int64)
    labels[0] = initial_regime
    uniforms = rng.random((steps, n_paths))
    for k in range(steps):
        labels[k + 1] = _next_states(cumulative, labels[k], uniforms[k])
    return labels


def simulate_regimes(
    regimes: Sequence[Regime],
    spot: float,
    T: float,
    steps: int,
    n_paths: int,
    *,
    switch_times: Sequence[tuple[float, int]] | None = None,
    intensities: np.ndarray | Sequence[Sequence[float]] | None = None,
    initial_regime: int = 0,
    scheme: Scheme = "qe",
    seed: SeedLike = None,
) -> RegimePaths:
    """Heston paths whose dynamics switch between ``regimes``, with exact per-step labels.

    Give exactly one of ``switch_times`` (``(time, regime index)`` pairs, the same for all
    paths: the design's bull → crash stitch) or ``intensities`` (per-year switching rates of a
    continuous-time Markov chain, sampled exactly on the step grid, independently per path).
    Price and variance carry over a switch; only the dynamics change. The start variance is
    ``regimes[initial_regime].params.v0``. With the same seed, the path normals are drawn as in
    :func:`simulate`; Markov labels are drawn first, as ``rng.random((steps, n_paths))``.
    """
    _check_grid(spot, T, steps, n_paths, scheme)
    if not regimes:
        raise ValueError("at least one regime is required")
    if not 0 <= initial_regime < len(regimes):
        raise ValueError(f"initial_regime {initial_regime} outside 0..{len(regimes) - 1}")
    if (switch_times is None) == (intensities is None):
        raise ValueError("give exactly one of switch_times and intensities")
    rng = np.random.default_rng(seed)
    dt = T / steps
    if switch_times is not None:
        rows = _fixed_labels(switch_times, initial_regime, T, steps, len(regimes))
        labels = np.broadcast_to(rows[:, None], (steps + 1, n_paths)).copy()
    else:
        generator = generator_matrix(intensities)
        if generator.shape[0] != len(regimes):
            raise ValueError(
                f"intensities are {generator.shape[0]}×{generator.shape[0]} for {len(regimes)} regimes"
            )
        labels = _markov_labels(generator, initial_regime, dt, steps, n_paths, rng)

    log_paths = np.empty((steps + 1, n_paths))
    var_paths = np.empty((steps + 1, n_paths))
    log_s = np.full(n_paths, math.log(spot))
    v = np.full(n_paths, regimes[initial_regime].params.v0)
    log_paths[0], var_paths[0] = log_s, v
    for k in range(steps):
        z = rng.standard_normal((2, n_paths))
        row = labels[k]
        first = row[0]
        if (row == first).all():
            regime = regimes[first]
            log_s, v = step(log_s, v, regime.params, regime.mu, dt, z[0], z[1], scheme)
        else:
            # Each step's outputs are fresh arrays, so updating disjoint path sets in place is safe.
            for index, regime in enumerate(regimes):
                paths = np.flatnonzero(row == index)
                if paths.size == 0:
                    continue
                log_s[paths], v[paths] = step(
                    log_s[paths], v[paths], regime.params, regime.mu, dt, z[0, paths], z[1, paths], scheme
                )
        log_paths[k + 1] = log_s
        np.maximum(v, 0.0, out=var_paths[k + 1])
    prices = np.exp(log_paths, out=log_paths)
    prices[0] = spot
    return RegimePaths(prices, var_paths, labels)


class MarkovHestonStep(NamedTuple):
    """One step of :func:`markov_heston_steps`, all arrays (n_paths,) and fresh (never written to again).

    ``regime`` drives the step and ``v_start`` is the variance it starts from (after any entry jump);
    ``log_s`` and ``v_end`` are the state at its end, ``v_end`` clamped at 0 and before the entry jump
    of the regime the path switches into at that instant.
    """

    regime: np.ndarray
    v_start: np.ndarray
    log_s: np.ndarray
    v_end: np.ndarray


def markov_heston_steps(
    regimes: Sequence[Regime],
    intensities: np.ndarray | Sequence[Sequence[float]],
    initial: np.ndarray,
    dt: float,
    steps: int,
    rng: np.random.Generator,
    entry_variance: Sequence[float | None],
) -> Iterator[MarkovHestonStep]:
    """The synthetic market's physics, one step at a time: QE Heston under a per-path Markov regime chain.

    Why: the regime detector's and the world model's training data are both this loop, and their trained
    models depend on its exact draws, so it exists once. Unlike :func:`simulate_regimes` the chain is
    drawn step by step, interleaved with the normals, and a path entering regime ``i`` has its variance
    raised to at least ``entry_variance[i]`` (unless ``None``): the crash-entry jump.

    Paths start in the regimes ``initial`` (n_paths,) at their ``v0`` and ``ln S = 0``. Each step draws
    ``z = rng.standard_normal((2, n_paths))`` and then ``rng.random(n_paths)``, steps each regime's paths
    by :func:`step` (row 0 ``z_v``, row 1 ``z_s``), clamps the variance at 0, samples the next regimes
    exactly (``expm(Q dt)``) and applies the entry jumps.
    """
    cumulative = np.cumsum(transition_matrix(generator_matrix(intensities), dt), axis=1)
    if not cumulative.shape[0] == len(regimes) == len(entry_variance):
        raise ValueError("intensities, regimes and entry_variance need one entry per regime")
    state = np.asarray(initial, dtype=np.int64)
    if state.ndim != 1 or ((state < 0) | (state >= len(regimes))).any():
        raise ValueError(f"initial must be regime indices (n_paths,) in 0..{len(regimes) - 1}")
    n_paths = state.size
    v = np.array([regime.params.v0 for regime in regimes])[state]
    log_s = np.zeros(n_paths)
    for _ in range(steps):
        z = rng.standard_normal((2, n_paths))
        uniforms = rng.random(n_paths)
        log_next, v_next = np.empty(n_paths), np.empty(n_paths)
        for index, regime in enumerate(regimes):
            paths = np.flatnonzero(state == index)
            if paths.size:
                log_next[paths], v_next[paths] = step(log_s[paths], v[paths], regime.params, regime.mu, dt,
                                                      z[0, paths], z[1, paths])
        v_end = np.maximum(v_next, 0.0)
        next_state = _next_states(cumulative, state, uniforms)
        v_jumped = v_end.copy()
        for index, entry in enumerate(entry_variance):
            entered = (next_state == index) & (state != index)
            if entry is not None and entered.any():
                v_jumped[entered] = np.maximum(v_jumped[entered], entry)
        yield MarkovHestonStep(state, v, log_next, v_end)
        state, v, log_s = next_state, v_jumped, log_next
