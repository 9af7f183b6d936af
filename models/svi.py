"""Arbitrage-aware raw-SVI implied-volatility surfaces, resampled onto the project's fixed grid.

Each expiry's total implied variance ``w(k) = σ_imp²·T`` is fitted in log-moneyness ``k = ln(K/F)``
by Gatheral's raw SVI ``w(k) = a + b(ρ(k − m) + √((k − m)² + σ²))``. The parametrisation used by the
optimiser makes the static constraints hold by construction:

* wing slopes ``b(1 ± ρ)`` each in (0, 2]: ``b ≥ 0``, ``|ρ| < 1`` and Lee's moment bound
  ``b(1 + |ρ|) ≤ 2``. Lee's bound is the asymptotic form of Gatheral's density condition
  (``g(k) → 1/4 − b²(1 ± ρ)²/16``); it implies the Rogers–Tehranchi bound ``b(1 + |ρ|) ≤ 4``;
* ``σ > 0`` and a non-negative minimum variance ``a + bσ√(1 − ρ²) ≥ 0``.

Gatheral's density condition ``g(k) ≥ 0`` (no butterfly arbitrage) and calendar order (``w``
non-decreasing in ``T`` at every ``k``) are checked, exactly, on a fine ``k`` grid spanning the quotes
and the project grid with half their width again on each side; ``SurfaceFit``'s flags report them,
so arbitrage in the quotes shows up rather than being silently fitted away. On request
(``enforce_no_arbitrage=True``) both are imposed as hinge penalties instead: slices are then fitted
from the longest expiry to the shortest, each capped by the longer one already fitted, because
short expiries quote the narrowest ``k`` range and their unquoted wings are the ones to give way.

A slice's fit starts with Zeliade's quasi-explicit reduction: for fixed ``(m, σ)`` the model is
linear in ``(a, bσρ, bσ)``, so a coarse ``(m, σ)`` grid is solved in closed form and the best few
candidates seed ``scipy.optimize.least_squares`` on implied-volatility residuals.

Resampling (``SurfaceFit.total_variance``): between fitted expiries, total variance is interpolated
linearly in ``T`` at fixed ``k``; before the first and after the last expiry the implied volatility
at each ``k`` is held constant (``w ∝ T``), which keeps calendar order and invents no term slope.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import least_squares

from models import grid

# Quotes whose maturities differ by less than this belong to one expiry (a chain snapshot is taken
# over minutes, and listed expiries are at least a day apart).
EXPIRY_TOLERANCE_YEARS = 1.0 / (24.0 * 365.0)
MAX_WING_SLOPE = 2.0
CHECK_POINTS = 301
# Penalty scale against IV residuals of ~1e-2, and the safety margins the penalties aim for so that
# the small residual violation a penalty leaves still satisfies the exact check.
_PENALTY = 100.0
_DENSITY_MARGIN = 1e-3
_CALENDAR_MARGIN = 1e-4
_SEED_STARTS = 3
_SEED_CENTRES = 9
_SEED_WIDTHS = np.array([0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 1.9])
# With fewer quotes than SVI's five parameters a slice is not identified; a weak pull towards its
# closed-form seed (in optimiser coordinates, against IV residuals) makes the fit unique and fast.
_SEED_ANCHOR = 1e-3
_SEED_RIDGE = 1e-8


@dataclass(frozen=True)
class SVISlice:
    """Raw SVI parameters of one expiry: total variance w(k) in log-moneyness k = ln(K/F)."""

    maturity: float
    a: float
    b: float
    rho: float
    m: float
    sigma: float

    @property
    def params(self) -> np.ndarray:
        return np.array([self.a, self.b, self.rho, self.m, self.sigma])

    def total_variance(self, k: ArrayLike) -> np.ndarray:
        return _svi_derivatives(np.asarray(k, dtype=float), self.params)[0]

    def iv(self, k: ArrayLike) -> np.ndarray:
        return np.sqrt(self.total_variance(k) / self.maturity)

    def density_condition(self, k: ArrayLike) -> np.ndarray:
        """Gatheral's g(k); the risk-neutral density is non-negative where g >= 0."""
        k = np.asarray(k, dtype=float)
        return _density_condition(k, *_svi_derivatives(k, self.params))


@dataclass(frozen=True, eq=False)
class SurfaceFit:
    """Per-expiry SVI slices, the surface resampled on ``models.grid`` and arbitrage diagnostics.

    ``butterfly_free``: g(k) >= 0 on ``check_log_moneyness`` for every fitted slice and for the
    resampled slices at the grid maturities. ``calendar_free``: fitted slices ordered in T there.
    ``rmse_iv`` is the unweighted RMS implied-volatility error at the quotes that were fitted.
    """

    slices: tuple[SVISlice, ...]
    iv_grid: np.ndarray
    rmse_iv: float
    butterfly_free: bool
    calendar_free: bool
    check_log_moneyness: np.ndarray

    @property
    def expiries(self) -> np.ndarray:
        return np.array([s.maturity for s in self.slices])

    def total_variance(self, log_moneyness: ArrayLike, maturity: ArrayLike) -> np.ndarray:
        """w(k, T): linear in T between expiries, constant implied vol beyond them; NaN for T <= 0."""
        return _surface_derivatives(self.slices, log_moneyness, maturity)[0]

    def iv(self, log_moneyness: ArrayLike, maturity: ArrayLike) -> np.ndarray:
        """Implied volatility at (ln(K/F), T), broadcasting; NaN for T <= 0."""
        return _surface_iv(self.slices, log_moneyness, maturity)


def _svi_derivatives(k: np.ndarray, params: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w, ∂w/∂k and ∂²w/∂k² of raw SVI with params (a, b, ρ, m, σ)."""
    a, b, rho, m, sigma = params
    km = k - m
    root = np.sqrt(km * km + sigma * sigma)
    w = a + b * (rho * km + root)
    w1 = b * (rho + km / root)
    w2 = b * sigma * sigma / (root * root * root)
    return w, w1, w2


def _density_condition(k: np.ndarray, w: np.ndarray, w1: np.ndarray, w2: np.ndarray) -> np.ndarray:
    """Gatheral's g(k) = (1 − k w'/(2w))² − (w'²/4)(1/w + 1/4) + w''/2."""
    return (1.0 - k * w1 / (2.0 * w)) ** 2 - 0.25 * w1 * w1 * (1.0 / w + 0.25) + 0.5 * w2


def _time_coefficients(expiries: np.ndarray, maturity: np.ndarray) -> np.ndarray:
    """c_i(T) with w(k, T) = Σ_i c_i(T)·w_i(k): hat functions inside, T/T_edge scaling outside."""
    scale = np.where(
        maturity < expiries[0],
        maturity / expiries[0],
        np.where(maturity > expiries[-1], maturity / expiries[-1], 1.0),
    )
    return np.stack([np.interp(maturity, expiries, unit) * scale for unit in np.eye(expiries.size)])


def _surface_derivatives(
    slices: tuple[SVISlice, ...], log_moneyness: ArrayLike, maturity: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w, ∂w/∂k, ∂²w/∂k² of the resampled surface; all NaN where T <= 0 or T is not finite."""
    k, t = np.broadcast_arrays(np.asarray(log_moneyness, dtype=float), np.asarray(maturity, dtype=float))
    coefficients = _time_coefficients(np.array([s.maturity for s in slices]), t)
    totals = [np.zeros(k.shape) for _ in range(3)]
    for coefficient, svi_slice in zip(coefficients, slices, strict=True):
        for total, derivative in zip(totals, _svi_derivatives(k, svi_slice.params), strict=True):
            total += coefficient * derivative
    usable = np.isfinite(t) & (t > 0.0)
    return tuple(np.where(usable, total, np.nan) for total in totals)  # type: ignore[return-value]


def _surface_iv(slices: tuple[SVISlice, ...], log_moneyness: ArrayLike, maturity: ArrayLike) -> np.ndarray:
    t = np.asarray(maturity, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt(_surface_derivatives(slices, log_moneyness, t)[0] / t)


def _from_free(theta: np.ndarray) -> np.ndarray:
    """Optimiser coordinates (m, ln σ, wing-slope logits left/right, ln min-variance) → (a, b, ρ, m, σ)."""
    m, log_sigma, logit_left, logit_right, log_floor = theta
    sigma = np.exp(log_sigma)
    left = MAX_WING_SLOPE / (1.0 + np.exp(-logit_left))
    right = MAX_WING_SLOPE / (1.0 + np.exp(-logit_right))
    b = 0.5 * (left + right)
    rho = (right - left) / (left + right)
    a = np.exp(log_floor) - b * sigma * np.sqrt(1.0 - rho * rho)
    return np.array([a, b, rho, m, sigma])


def _to_free(params: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Inverse of ``_from_free`` for feasible (a, b, ρ, m, σ), clipped strictly inside the bounds."""
    a, b, rho, m, sigma = params
    left = b * (1.0 - rho) / MAX_WING_SLOPE
    right = b * (1.0 + rho) / MAX_WING_SLOPE
    floor = max(a + b * sigma * np.sqrt(1.0 - rho * rho), 1e-300)
    with np.errstate(divide="ignore"):
        theta = np.array(
            [m, np.log(sigma), np.log(left / (1 - left)), np.log(right / (1 - right)), np.log(floor)]
        )
    inset = 1e-6 * (upper - lower)
    return np.clip(theta, lower + inset, upper - inset)


def _seed_candidates(k: np.ndarray, w: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Zeliade's quasi-explicit seeds: for each (m, σ) of a coarse grid, weighted linear least
    squares in (a, bσρ, bσ), projected onto the constraints; rows (a, b, ρ, m, σ), best fit first."""
    span = max(float(np.ptp(k)), 0.01)
    m, sigma = (
        g.ravel() for g in np.meshgrid(np.linspace(k.min(), k.max(), _SEED_CENTRES), span * _SEED_WIDTHS)
    )
    y = (k[None, :] - m[:, None]) / sigma[:, None]
    design = np.stack([np.ones_like(y), y, np.sqrt(y * y + 1.0)], axis=-1)
    weighted = design * weights[None, :, None]
    # A faint ridge on the slopes (bσρ, bσ) decides slices with fewer quotes than parameters in
    # favour of the flattest smile through them; with enough quotes it changes nothing visible.
    ridge = _SEED_RIDGE * float(weights.sum()) * np.diag([0.0, 1.0, 1.0])
    normal = np.einsum("cni,cnj->cij", weighted, design) + ridge + 1e-14 * np.eye(3)
    a, d, c = np.linalg.solve(normal, np.einsum("cni,n->ci", weighted, w)[..., None])[..., 0].T
    c = np.maximum(c, 1e-8)
    rho = np.clip(d / c, -0.99, 0.99)
    b = np.minimum(c / sigma, MAX_WING_SLOPE / (1.0 + np.abs(rho)))
    a = np.maximum(a, 1e-12 - b * sigma * np.sqrt(1.0 - rho * rho))
    candidates = np.stack([a, b, rho, m, sigma], axis=1)
    model = np.stack([_svi_derivatives(k, row)[0] for row in candidates])
    cost = ((model - w[None, :]) ** 2 * weights[None, :]).sum(axis=1) + _SEED_RIDGE * float(weights.sum()) * (
        (b * sigma) ** 2
    )
    return candidates[np.argsort(cost)]


def _fit_slice(
    k: np.ndarray,
    iv: np.ndarray,
    weights: np.ndarray,
    maturity: float,
    check_k: np.ndarray,
    cap: np.ndarray | None,
    enforce_no_arbitrage: bool,
) -> np.ndarray:
    """Least-squares SVI fit of one expiry in implied volatility, best of a few quasi-explicit starts.

    With ``enforce_no_arbitrage``, g(k) >= 0 on ``check_k`` is penalised, and so is exceeding ``cap``,
    the next longer expiry's total variance on ``check_k``.
    """
    w_market = iv * iv * maturity
    sqrt_weights = np.sqrt(weights)
    # Bounds scaled by the quoted span keep the optimiser off SVI's flat ridge (m and σ running away
    # together towards the parabolic limit), which noisy slices otherwise crawl along.
    span = max(float(np.ptp(k)), 0.01)
    # Logits within ±25 keep |ρ| < 1 and both wing slopes < 2 strictly, even after rounding.
    lower = np.array([k.min() - span, np.log(1e-4 * span), -25.0, -25.0, np.log(1e-8 * w_market.min())])
    upper = np.array([k.max() + span, np.log(2.0 * span), 25.0, 25.0, np.log(10.0 * w_market.max())])

    identified = k.size >= 5

    def jacobian(theta: np.ndarray, seed: np.ndarray) -> np.ndarray:
        """Analytic ∂residuals/∂θ of the plain fit, from w = F − σ√(LR) + (R − L)(k − m)/2 + (L + R)ρ̃/2
        with wing slopes L, R, floor F and ρ̃ = √((k − m)² + σ²)."""
        m, log_sigma, logit_left, logit_right, log_floor = theta
        sigma = np.exp(log_sigma)
        left = MAX_WING_SLOPE / (1.0 + np.exp(-logit_left))
        right = MAX_WING_SLOPE / (1.0 + np.exp(-logit_right))
        km = k - m
        root = np.sqrt(km * km + sigma * sigma)
        geometric = np.sqrt(left * right)
        w = np.exp(log_floor) - sigma * geometric + 0.5 * (right - left) * km + 0.5 * (left + right) * root
        dw = np.stack(
            [
                -0.5 * (right - left) - 0.5 * (left + right) * km / root,
                sigma * (0.5 * (left + right) * sigma / root - geometric),
                (0.5 * (root - km) - 0.5 * sigma * right / geometric) * left * (1.0 - left / MAX_WING_SLOPE),
                (0.5 * (root + km) - 0.5 * sigma * left / geometric) * right * (1.0 - right / MAX_WING_SLOPE),
                np.full_like(k, np.exp(log_floor)),
            ],
            axis=1,
        )
        rows = (sqrt_weights / (2.0 * np.sqrt(w * maturity)))[:, None] * dw
        if identified:
            return rows
        return np.vstack([rows, _SEED_ANCHOR * np.eye(5)])

    def residuals(theta: np.ndarray, seed: np.ndarray) -> np.ndarray:
        params = _from_free(theta)
        parts = [sqrt_weights * (np.sqrt(_svi_derivatives(k, params)[0] / maturity) - iv)]
        if not identified:
            parts.append(_SEED_ANCHOR * (theta - seed))
        if enforce_no_arbitrage:
            w, w1, w2 = _svi_derivatives(check_k, params)
            parts.append(_PENALTY * np.maximum(_DENSITY_MARGIN - _density_condition(check_k, w, w1, w2), 0.0))
            if cap is not None:
                parts.append(_PENALTY * np.maximum(w / (cap * (1.0 - _CALENDAR_MARGIN)) - 1.0, 0.0))
        return np.concatenate(parts)

    # The reduction is linear in total variance; dσ ≈ dw/(2σT) turns IV weights into w weights.
    seeds = _seed_candidates(k, w_market, weights / (2.0 * iv * maturity) ** 2)
    starts = [_to_free(seed, lower, upper) for seed in seeds[:_SEED_STARTS]]
    results = [
        least_squares(
            residuals,
            start,
            jac="2-point" if enforce_no_arbitrage else jacobian,
            bounds=(lower, upper),
            x_scale="jac",
            max_nfev=200,
            args=(start,),
        )
        for start in starts
    ]
    return _from_free(min(results, key=lambda result: result.cost).x)


def _group_expiries(maturities: np.ndarray) -> np.ndarray:
    """Expiry label per quote: sorted maturities split wherever the gap exceeds the tolerance."""
    order = np.argsort(maturities)
    breaks = np.diff(maturities[order]) > EXPIRY_TOLERANCE_YEARS
    labels = np.empty(maturities.size, dtype=int)
    labels[order] = np.concatenate([[0], np.cumsum(breaks)])
    return labels


def fit_surface(
    maturities: ArrayLike,
    log_moneyness: ArrayLike,
    ivs: ArrayLike,
    weights: ArrayLike | None = None,
    *,
    enforce_no_arbitrage: bool = False,
) -> SurfaceFit:
    """Fit one raw-SVI slice per expiry to flat arrays of quotes and resample onto ``models.grid``.

    ``ivs`` are decimals; ``weights`` (default 1) weight the squared IV residuals. Quotes with a
    non-finite value or a non-positive maturity, IV or weight are ignored; maturities within
    ``EXPIRY_TOLERANCE_YEARS`` of each other form one expiry, fitted at their mean maturity.
    Raises ValueError when the arrays differ in length or no quote is usable.
    """
    t, k, iv = (np.asarray(a, dtype=float).ravel() for a in (maturities, log_moneyness, ivs))
    wt = np.ones_like(iv) if weights is None else np.asarray(weights, dtype=float).ravel()
    if not t.size == k.size == iv.size == wt.size:
        raise ValueError("maturities, log_moneyness, ivs and weights must have the same length")
    usable = (
        np.isfinite(t) & np.isfinite(k) & np.isfinite(iv) & np.isfinite(wt) & (t > 0) & (iv > 0) & (wt > 0)
    )
    if not usable.any():
        raise ValueError("no usable quotes to fit")
    t, k, iv, wt = t[usable], k[usable], iv[usable], wt[usable]

    labels = _group_expiries(t)
    expiries = np.array([t[labels == label].mean() for label in range(labels.max() + 1)])
    lo = min(k.min(), grid.LOG_MONEYNESS.min())
    hi = max(k.max(), grid.LOG_MONEYNESS.max())
    check_k = np.linspace(lo - 0.5 * (hi - lo), hi + 0.5 * (hi - lo), CHECK_POINTS)

    slices: list[SVISlice] = []
    cap = None
    for label in range(expiries.size - 1, -1, -1):
        members = labels == label
        params = _fit_slice(
            k[members], iv[members], wt[members], expiries[label], check_k, cap, enforce_no_arbitrage
        )
        slices.insert(0, SVISlice(float(expiries[label]), *(float(p) for p in params)))
        cap = slices[0].total_variance(check_k)

    residual = np.concatenate(
        [s.iv(k[labels == label]) - iv[labels == label] for label, s in enumerate(slices)]
    )
    fitted = tuple(slices)
    return SurfaceFit(
        slices=fitted,
        iv_grid=_surface_iv(fitted, grid.LOG_MONEYNESS[:, None], grid.MATURITIES[None, :]),
        rmse_iv=float(np.sqrt(np.mean(residual**2))),
        butterfly_free=_butterfly_free(fitted, check_k),
        calendar_free=_calendar_free(fitted, check_k),
        check_log_moneyness=check_k,
    )


def _butterfly_free(slices: tuple[SVISlice, ...], check_k: np.ndarray) -> bool:
    """g(k) >= 0 on the check grid for every fitted slice and every resampled grid maturity."""
    if any(np.any(s.density_condition(check_k) < 0.0) for s in slices):
        return False
    k = check_k[:, None]
    return bool(
        np.all(_density_condition(k, *_surface_derivatives(slices, k, grid.MATURITIES[None, :])) >= 0.0)
    )


def _calendar_free(slices: tuple[SVISlice, ...], check_k: np.ndarray) -> bool:
    """Total variance non-decreasing in maturity at every check-grid k."""
    w = np.stack([s.total_variance(check_k) for s in slices])
    return bool(np.all(np.diff(w, axis=0) >= 0.0))
