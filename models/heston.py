"""Heston (1993) parameters and semi-analytic European option prices.

Prices come from Lewis's single-integral formula with a Black–Scholes control variate
(Andersen & Piterbarg 2010):

    c(y) = c_BS(y; w) − e^{y/2}/π ∫_0^∞ Re[e^{−iuy} (φ_H − φ_BS)(u − i/2)] / (u² + ¼) du,

per unit of forward, with ``y = ln(K/F)``, ``φ_H`` the characteristic function of
``ln(S_T/F)`` in the "little Heston trap" form (Albrecher et al. 2007), and ``w`` the
expected integrated variance. Both characteristic functions equal 1 at ``u = ±i/2``, so the
integrand has no poles, and the control variate makes it small near the money.

Why not COS: COS truncates the density to a cumulant-based interval, which costs accuracy
for strikes far in the fat Heston tails; here the only error sources are the Fourier cut-off
and the quadrature, and both are planned per (parameter set, maturity): the cut-off ``U``
from the decay of ``|φ_H|`` and the Gauss–Legendre order from the number of oscillations
on ``[0, U]``. Pairs that share a plan share nodes, so the strike dimension is a single
complex matrix product and no Python loop runs over options.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import numpy as np
from scipy.special import ndtr, roots_legendre

from models import grid

PARAM_NAMES: tuple[str, ...] = ("kappa", "theta", "sigma", "rho", "v0")

# Tail bound on the neglected integral, per unit of forward.
_TAIL_TOLERANCE = 1e-15
# Candidate Fourier cut-offs: a √2 ladder, so a plan wastes at most that factor of nodes.
_CUTOFF_LADDER = 0.5 * np.sqrt(2.0) ** np.arange(42)
# Node counts: a ×1.25 ladder of multiples of 8; above _MAX_PANEL_ORDER they split into equal panels.
_NODE_LADDER = np.unique(np.ceil(16 * 1.25 ** np.arange(50) / 8).astype(np.int64) * 8)
_MAX_PANEL_ORDER = 1024
_BASE_ORDER = 24
_GAUSSIAN_NODES = 1.25
# Complex working-set size (pairs × nodes) per chunk: bounds memory on large batches.
_CHUNK_ELEMENTS = 1 << 18


@dataclass(frozen=True, slots=True)
class HestonParams:
    """Heston parameters: mean reversion, long-run variance, vol of variance, correlation, spot variance."""

    kappa: float
    theta: float
    sigma: float
    rho: float
    v0: float

    def __post_init__(self) -> None:
        for name in PARAM_NAMES:
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")
            if name != "rho" and value <= 0.0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if abs(self.rho) >= 1.0:
            raise ValueError(f"rho must satisfy |rho| < 1, got {self.rho!r}")

    def feller(self) -> bool:
        """True when 2·kappa·theta > sigma², i.e. the variance process never reaches zero."""
        return 2.0 * self.kappa * self.theta > self.sigma**2

    def to_array(self) -> np.ndarray:
        """The parameters as a float64 vector in ``PARAM_NAMES`` order."""
        return np.array([getattr(self, name) for name in PARAM_NAMES], dtype=np.float64)

    @classmethod
    def from_array(cls, values: np.ndarray) -> HestonParams:
        """Build from a length-5 vector in ``PARAM_NAMES`` order (validated)."""
        flat = np.asarray(values, dtype=np.float64).reshape(-1)
        if flat.size != len(PARAM_NAMES):
            raise ValueError(f"expected {len(PARAM_NAMES)} values in order {PARAM_NAMES}, got {flat.size}")
        return cls(*(float(v) for v in flat))


class _Plan(NamedTuple):
    """Pairs (rows of a flattened parameter × maturity table) priced with one node set."""

    pairs: np.ndarray
    cutoff: float
    nodes: int

    def unit_rule(self) -> tuple[np.ndarray, np.ndarray]:
        """Nodes and weights on [0, 1] for this plan's node count."""
        panels = -(-self.nodes // _MAX_PANEL_ORDER)
        return _unit_nodes(-(-self.nodes // panels), panels)


def as_param_matrix(params: HestonParams | np.ndarray) -> tuple[np.ndarray, bool]:
    """Validated (n, 5) float64 parameter matrix, and whether the caller passed a batch."""
    if isinstance(params, HestonParams):
        return params.to_array()[None, :], False
    matrix = np.asarray(params, dtype=np.float64)
    batched = matrix.ndim == 2
    if matrix.ndim not in (1, 2) or matrix.shape[-1] != len(PARAM_NAMES):
        raise ValueError(f"params must have shape (5,) or (n, 5) in order {PARAM_NAMES}, got {matrix.shape}")
    matrix = matrix.reshape(-1, len(PARAM_NAMES))
    if not np.isfinite(matrix).all():
        raise ValueError("params must be finite")
    for column, name in enumerate(PARAM_NAMES):
        if name != "rho" and (matrix[:, column] <= 0.0).any():
            raise ValueError(f"{name} must be > 0")
    if (np.abs(matrix[:, 3]) >= 1.0).any():
        raise ValueError("rho must satisfy |rho| < 1")
    return matrix, batched


def _positive_vector(values: np.ndarray | float, name: str) -> np.ndarray:
    vector = np.atleast_1d(np.asarray(values, dtype=np.float64))
    if vector.ndim != 1:
        raise ValueError(f"{name} must be a scalar or a 1-D array")
    if not (np.isfinite(vector).all() and (vector > 0.0).all()):
        raise ValueError(f"{name} must be finite and > 0")
    return vector


def _log1p(w: np.ndarray) -> np.ndarray:
    """Complex log(1 + w) accurate for small |w| (numpy's complex log1p is not)."""
    re, im = w.real, w.imag
    return 0.5 * np.log1p(re * (2.0 + re) + im * im) + 1j * np.arctan2(im, 1.0 + re)


def _expm1(z: np.ndarray) -> np.ndarray:
    """Complex exp(z) − 1 accurate for small |z|."""
    re, im = z.real, z.imag
    half_sin = np.sin(0.5 * im)
    return (np.expm1(re) * np.cos(im) - 2.0 * half_sin * half_sin) + 1j * np.exp(re) * np.sin(im)


def log_charfn(
    z: np.ndarray,
    t: np.ndarray,
    kappa: np.ndarray,
    theta: np.ndarray,
    sigma: np.ndarray,
    rho: np.ndarray,
    v0: np.ndarray,
) -> np.ndarray:
    """ln E[exp(i z ln(S_T/F))] in the little-trap form; arguments broadcast.

    ``(b − d)/σ²`` is rewritten as ``−(iz + z²)/(b + d)`` so that tiny vol-of-vol loses no digits.
    """
    iz = 1j * z
    b = kappa - rho * sigma * iz
    d = np.sqrt(b * b + sigma * sigma * (iz + z * z))
    b_plus_d = b + d
    b_minus_d_over_s2 = -(iz + z * z) / b_plus_d
    g = sigma * sigma * b_minus_d_over_s2 / b_plus_d
    one_minus_e = -_expm1(-d * t)
    one_minus_ge = 1.0 - g * (1.0 - one_minus_e)
    log_ratio = _log1p(g * one_minus_e / (1.0 - g))
    c = kappa * theta * (b_minus_d_over_s2 * t - 2.0 * log_ratio / (sigma * sigma))
    return c + v0 * b_minus_d_over_s2 * one_minus_e / one_minus_ge


def expected_variance(p: np.ndarray, t: np.ndarray) -> np.ndarray:
    """E[∫_0^T v dt] for rows of ``p`` (n, 5) and maturities ``t`` broadcast against them."""
    kappa, theta, v0 = p[..., 0], p[..., 1], p[..., 4]
    return theta * t + (v0 - theta) * (-np.expm1(-kappa * t)) / kappa


def _legendre_and_derivative(x: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray]:
    """P_order(x) and P'_order(x) by the three-term recurrence."""
    previous, current = np.ones_like(x), x.copy()
    for k in range(2, order + 1):
        previous, current = current, ((2 * k - 1) * x * current - (k - 1) * previous) / k
    return current, order * (x * current - previous) / (x * x - 1.0)


@lru_cache(maxsize=64)
def _unit_nodes(order: int, panels: int) -> tuple[np.ndarray, np.ndarray]:
    """Composite Gauss–Legendre nodes and weights on [0, 1]: ``panels`` equal panels of ``order`` points.

    scipy's nodes seed one Newton step and the weights are recomputed from P'(x): scipy's own
    weights carry relative errors near 1e-14 at high orders, which this pricer cannot afford.
    """
    x, _ = roots_legendre(order)
    value, slope = _legendre_and_derivative(x, order)
    x = x - value / slope
    _, slope = _legendre_and_derivative(x, order)
    w = 2.0 / ((1.0 - x * x) * slope * slope)
    starts = np.arange(panels)[:, None]
    nodes = ((starts + 0.5 * (x + 1.0)[None, :]) / panels).ravel()
    weights = np.tile(0.5 * w / panels, panels)
    nodes.setflags(write=False)
    weights.setflags(write=False)
    return nodes, weights


def plan_quadrature(p: np.ndarray, t: np.ndarray, max_abs_y: np.ndarray) -> list[_Plan]:
    """Group (parameter row, maturity) pairs by Fourier cut-off and Gauss–Legendre node count.

    ``p`` and ``t`` are the flattened pair table (m, 5) and (m,); ``max_abs_y`` (m,) the largest
    |ln(K/F)| the pair is priced at, which sets how fast the integrand oscillates.
    """
    ladder = _CUTOFF_LADDER
    z = ladder[None, :] - 0.5j
    psi = log_charfn(z, t[:, None], *(p[:, k, None] for k in range(5)))
    variance = expected_variance(p, t)[:, None]
    magnitude = np.exp(psi.real) + np.exp(-0.5 * variance * (ladder * ladder + 0.25))
    tail = magnitude * (1.0 + ladder) / (ladder * ladder + 0.25)
    too_big = tail > _TAIL_TOLERANCE
    last_bad = np.where(too_big.any(axis=1), ladder.size - 1 - np.argmax(too_big[:, ::-1], axis=1), -1)
    cut_index = np.minimum(last_bad + 1, ladder.size - 1)
    cutoff = ladder[cut_index]
    below = np.arange(ladder.size)[None, :] <= cut_index[:, None]
    phase = np.where(below, np.abs(psi.imag), 0.0).max(axis=1)
    # Oscillations of e^{-iuy}·φ_H on [0, U], or the Gaussian control variate's width when the
    # Heston tail outlasts it by far: whichever asks for more nodes.
    oscillation = 0.35 * (cutoff * max_abs_y + phase)
    gaussian_width = _GAUSSIAN_NODES * cutoff * np.sqrt(expected_variance(p, t))
    wanted = _BASE_ORDER + np.maximum(oscillation, gaussian_width)
    node_index = np.minimum(np.searchsorted(_NODE_LADDER, wanted), _NODE_LADDER.size - 1)
    key = cut_index * _NODE_LADDER.size + node_index
    return [
        _Plan(np.flatnonzero(key == value), float(ladder[value // _NODE_LADDER.size]),
              int(_NODE_LADDER[value % _NODE_LADDER.size]))
        for value in np.unique(key)
    ]


def _bs_undiscounted(y: np.ndarray, variance: np.ndarray, call: np.ndarray) -> np.ndarray:
    """Black–Scholes price per unit forward of a call (put where ``call`` is False), ln(K/F) = y."""
    sd = np.sqrt(variance)
    d1 = (-y + 0.5 * variance) / sd
    calls = ndtr(d1) - np.exp(y) * ndtr(d1 - sd)
    puts = np.exp(y) * ndtr(sd - d1) - ndtr(-d1)
    return np.where(call, calls, puts)


def _fourier_correction(
    p: np.ndarray, t: np.ndarray, strike_part: np.ndarray, maturity_part: np.ndarray
) -> np.ndarray:
    """e^{y/2}/π ∫ Re[e^{−iuy}(φ_H − φ_BS)(u − i/2)]/(u² + ¼) du for y = strike_part + maturity_part.

    ``p`` (m, 5), ``t`` and ``maturity_part`` (m,), ``strike_part`` (nK,); returns (m, nK).
    """
    y = strike_part[None, :] + maturity_part[:, None]
    variance = expected_variance(p, t)
    out = np.empty((t.size, strike_part.size))
    for plan in plan_quadrature(p, t, np.abs(y).max(axis=1)):
        unit_nodes, unit_weights = plan.unit_rule()
        u = plan.cutoff * unit_nodes
        z = u - 0.5j
        strike_phase = np.exp(-1j * np.outer(u, strike_part))
        kernel = plan.cutoff * unit_weights / (u * u + 0.25)
        chunk = max(1, _CHUNK_ELEMENTS // unit_nodes.size)
        for start in range(0, plan.pairs.size, chunk):
            rows = plan.pairs[start : start + chunk]
            pr, tr = p[rows], t[rows, None]
            heston = np.exp(log_charfn(z[None, :], tr, *(pr[:, k, None] for k in range(5))))
            gaussian = np.exp(-0.5 * variance[rows, None] * (u * u + 0.25)[None, :])
            weighted = (heston - gaussian) * kernel * np.exp(-1j * np.outer(maturity_part[rows], u))
            out[rows] = (weighted @ strike_phase).real
    return np.exp(0.5 * y) / np.pi * out


def _undiscounted_prices(
    p: np.ndarray,
    maturities: np.ndarray,
    strike_part: np.ndarray,
    maturity_part: np.ndarray,
    call: np.ndarray,
) -> np.ndarray:
    """Prices per unit forward, shape (n, nK, nT), at ln(K/F) = strike_part[:, None] + maturity_part.

    ``call`` (nK,) picks a call or a put per strike; both share the Fourier correction, and each
    takes its own Black–Scholes control price so neither is derived by cancelling parity.
    """
    n, n_t = p.shape[0], maturities.size
    pair_p = np.repeat(p, n_t, axis=0)
    pair_t = np.tile(maturities, n)
    pair_shift = np.tile(maturity_part, n)
    correction = _fourier_correction(pair_p, pair_t, strike_part, pair_shift)
    y = strike_part[None, :] + pair_shift[:, None]
    control = _bs_undiscounted(y, expected_variance(pair_p, pair_t)[:, None], call[None, :])
    prices = (control - correction).reshape(n, n_t, strike_part.size).transpose(0, 2, 1)
    # The true price lies inside the no-arbitrage bounds; clipping only removes quadrature noise.
    ky = np.exp(strike_part[:, None] + maturity_part[None, :])
    is_call = call[:, None]
    lower = np.maximum(np.where(is_call, 1.0 - ky, ky - 1.0), 0.0)
    upper = np.where(is_call, 1.0, ky)
    return np.clip(prices, lower, upper)


def _prices(
    params: HestonParams | np.ndarray,
    spot: float,
    strikes: np.ndarray,
    maturities: np.ndarray,
    r: float,
    q: float,
    call: bool,
) -> np.ndarray:
    p, batched = as_param_matrix(params)
    strikes = _positive_vector(strikes, "strikes")
    maturities = _positive_vector(maturities, "maturities")
    spot = float(_positive_vector(spot, "spot")[0])
    forward = spot * np.exp((r - q) * maturities)
    undiscounted = _undiscounted_prices(
        p, maturities, np.log(strikes / spot), -(r - q) * maturities, np.full(strikes.size, call)
    )
    prices = undiscounted * (np.exp(-r * maturities) * forward)[None, None, :]
    return prices if batched else prices[0]


def call_prices(
    params: HestonParams | np.ndarray,
    spot: float,
    strikes: np.ndarray,
    maturities: np.ndarray,
    r: float = 0.0,
    q: float = 0.0,
) -> np.ndarray:
    """European call prices, shape (nK, nT); (n, nK, nT) when ``params`` is an (n, 5) batch."""
    return _prices(params, spot, strikes, maturities, r, q, call=True)


def put_prices(
    params: HestonParams | np.ndarray,
    spot: float,
    strikes: np.ndarray,
    maturities: np.ndarray,
    r: float = 0.0,
    q: float = 0.0,
) -> np.ndarray:
    """European put prices, shape (nK, nT); (n, nK, nT) when ``params`` is an (n, 5) batch."""
    return _prices(params, spot, strikes, maturities, r, q, call=False)


def iv_surface(
    params: HestonParams | np.ndarray,
    spot: float = 1.0,
    log_moneyness: np.ndarray = grid.LOG_MONEYNESS,
    maturities: np.ndarray = grid.MATURITIES,
    r: float = 0.0,
    q: float = 0.0,
) -> np.ndarray:
    """Heston implied volatilities at ln(K/F) = ``log_moneyness``, shape (nK, nT) or (n, nK, nT).

    Each point is inverted from its out-of-the-money option (puts below the forward), whose
    price carries the time value without an intrinsic part to cancel.
    """
    from models.iv import implied_vol  # written concurrently; imported where needed

    p, batched = as_param_matrix(params)
    log_moneyness = np.atleast_1d(np.asarray(log_moneyness, dtype=np.float64))
    maturities = _positive_vector(maturities, "maturities")
    spot = float(_positive_vector(spot, "spot")[0])
    use_call = log_moneyness >= 0.0
    undiscounted = _undiscounted_prices(p, maturities, log_moneyness, np.zeros_like(maturities), use_call)
    forward = spot * np.exp((r - q) * maturities)
    prices = undiscounted * (np.exp(-r * maturities) * forward)[None, None, :]
    strikes = forward[None, :] * np.exp(log_moneyness[:, None])
    vols = implied_vol(prices, spot, strikes, maturities[None, :], r=r, q=q, call=use_call[:, None])
    return vols if batched else vols[0]
