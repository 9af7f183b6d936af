"""Black–Scholes prices, greeks and a vectorised implied-volatility inversion.

Everything broadcasts under numpy rules, so a surface is priced with ``strikes[:, None]`` and
``maturities[None, :]``. Prices are spot-based (continuous rate ``r``, dividend or funding yield ``q``)
but computed internally on the forward ``F = S·exp((r−q)T)`` through Jäckel's *normalised Black
function* ``b(x, s)`` with ``x = ln(F/K)`` and ``s = σ√T``: it keeps full relative precision for deep
out-of-the-money prices where the textbook formula cancels catastrophically.

``implied_vol`` is a numpy port of Peter Jäckel's "Let's Be Rational" (2013–2014 release, the one
``py_lets_be_rational`` transcribes): a four-branch rational initial guess that is already accurate
to a few digits, then two Householder(3) steps on branch-specific objective functions, which reach
machine precision. Instead of a per-option loop every step runs on whole arrays, each branch on its
own subset.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import erfcx, ndtr, ndtri

_DBL_EPSILON = float(np.finfo(float).eps)
_DBL_MIN = float(np.finfo(float).tiny)
_SQRT_DBL_MAX = math.sqrt(float(np.finfo(float).max))
_ONE_OVER_SQRT_TWO = 1.0 / math.sqrt(2.0)
_ONE_OVER_SQRT_TWO_PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_TWO_PI = math.sqrt(2.0 * math.pi)
_SQRT_PI_OVER_TWO = math.sqrt(math.pi / 2.0)
_SQRT_THREE = math.sqrt(3.0)
_SQRT_ONE_OVER_THREE = 1.0 / _SQRT_THREE
_TWO_PI_OVER_SQRT_TWENTY_SEVEN = 2.0 * math.pi / math.sqrt(27.0)
_PI_OVER_SIX = math.pi / 6.0

# Region boundaries of the normalised Black function (Jäckel's η and τ).
_ASYMPTOTIC_EXPANSION_THRESHOLD = -10.0
_SMALL_T_EXPANSION_THRESHOLD = 2.0 * _DBL_EPSILON**0.0625
# Control-parameter limits of the Delbourgo–Gregory rational cubic interpolation.
_RC_MIN = -(1.0 - math.sqrt(_DBL_EPSILON))
_RC_MAX = 2.0 / (_DBL_EPSILON * _DBL_EPSILON)
# Jäckel proves two Householder(3) steps from his guess reach machine precision.
_HOUSEHOLDER_STEPS = 2
# Options inverted per block: the dozens of temporaries of one block then stay in the CPU cache.
_CHUNK = 16384


def _asymptotic_coefficients() -> np.ndarray:
    """Coefficients ``C[n, k]`` of q^n·e^k in the 17th-order expansion of Jäckel's A(h, t).

    The nested closed form in the reference code is ``Σ_n (−1)^n (2n−1)!! q^n P_n(e)`` with
    ``P_n(e) = 2 Σ_k binom(2n+1, 2k+1) e^k``; generating it keeps the table exact and readable.
    """
    order = 17
    table = np.zeros((order + 1, order + 1))
    double_factorial = 1
    for n in range(order + 1):
        if n > 1:
            double_factorial *= 2 * n - 1
        for k in range(n + 1):
            table[n, k] = (-1) ** n * double_factorial * 2 * math.comb(2 * n + 1, 2 * k + 1)
    return table


_ASYMPTOTIC_COEFFICIENTS = _asymptotic_coefficients()

# Small-t expansion of Y(h+t) − Y(h−t), transcribed from Jäckel's twelfth-order formula: the
# coefficient of w^n (n = 1..6) is Σ_j (C[n−1, j] + D[n−1, j]·a)·h²^j / (2n+1)!.
_SMALL_T_C = np.array(
    [
        [-1, 0, 0, 0, 0, 0, 0],
        [-7, -1, 0, 0, 0, 0, 0],
        [-57, -18, -1, 0, 0, 0, 0],
        [-561, -285, -33, -1, 0, 0, 0],
        [-6555, -4680, -840, -52, -1, 0, 0],
        [-89055, -82845, -20370, -1926, -75, -1, 0],
    ],
    dtype=float,
)
_SMALL_T_D = np.array(
    [
        [3, 1, 0, 0, 0, 0, 0],
        [15, 10, 1, 0, 0, 0, 0],
        [105, 105, 21, 1, 0, 0, 0],
        [945, 1260, 378, 36, 1, 0, 0],
        [10395, 17325, 6930, 990, 55, 1, 0],
        [135135, 270270, 135135, 25740, 2145, 78, 1],
    ],
    dtype=float,
)
_SMALL_T_FACTORIALS = np.array([math.factorial(2 * n + 1) for n in range(1, 7)], dtype=float)


class BSGreeks(NamedTuple):
    """Spot greeks: vega per unit of volatility (not per vol point), theta per year of calendar time."""

    delta: np.ndarray
    gamma: np.ndarray
    vega: np.ndarray
    theta: np.ndarray


# ---------------------------------------------------------------------------------------------
# Normalised Black function b(x, s) for x <= 0 (an out-of-the-money call on a forward of 1).
# ---------------------------------------------------------------------------------------------


def _asymptotic_expansion(h: np.ndarray, t: np.ndarray) -> np.ndarray:
    """b for h ≪ −10 and small t, via a single exponential (the two-term formula underflows there)."""
    e = (t / h) ** 2
    r = (h + t) * (h - t)
    q = (h / r) ** 2
    total = np.zeros_like(h)
    for row in _ASYMPTOTIC_COEFFICIENTS[::-1]:
        poly_e = np.zeros_like(h)
        for coefficient in row[::-1]:
            poly_e = poly_e * e + coefficient
        total = total * q + poly_e
    return _ONE_OVER_SQRT_TWO_PI * np.exp(-0.5 * (h * h + t * t)) * (t / r) * total


def _small_t_expansion(h: np.ndarray, t: np.ndarray) -> np.ndarray:
    """b for t < τ ≈ 0.21, where the difference of two nearly equal terms would lose all digits."""
    a = 1.0 + h * (0.5 * _SQRT_TWO_PI) * erfcx(-_ONE_OVER_SQRT_TWO * h)
    w = t * t
    h2 = h * h
    expansion = np.zeros_like(h)
    for n in range(_SMALL_T_FACTORIALS.size - 1, -1, -1):
        # Each table row is of one sign, so its Horner sums do not cancel; the cancellation in
        # C + a·D is inherent to the expansion, as in Jäckel's nested form.
        constant, slope = np.full_like(h, _SMALL_T_C[n, n + 1]), np.full_like(h, _SMALL_T_D[n, n + 1])
        for j in range(n, -1, -1):
            constant = constant * h2 + _SMALL_T_C[n, j]
            slope = slope * h2 + _SMALL_T_D[n, j]
        expansion = (expansion + (constant + a * slope) / _SMALL_T_FACTORIALS[n]) * w
    expansion = 2.0 * t * (a + expansion)
    return _ONE_OVER_SQRT_TWO_PI * np.exp(-0.5 * (h * h + t * t)) * expansion


def _black_with_erfcx(h: np.ndarray, t: np.ndarray) -> np.ndarray:
    """b through erfcx: one exponential and a difference of two rational functions keep ~16 digits."""
    return (
        0.5
        * np.exp(-0.5 * (h * h + t * t))
        * (erfcx(-_ONE_OVER_SQRT_TWO * (h + t)) - erfcx(-_ONE_OVER_SQRT_TWO * (h - t)))
    )


def _black_with_cdf(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """b by the textbook formula, accurate when the first term dominates (h + t > 0.85)."""
    h = x / s
    t = 0.5 * s
    b_max = np.exp(0.5 * x)
    return ndtr(h + t) * b_max - ndtr(h - t) / b_max


def _normalised_black(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Jäckel's b(x, s) for 1-D arrays with x <= 0 and s >= 0, each region on its own subset."""
    b = np.zeros_like(s)
    positive = s > 0.0
    eta = _ASYMPTOTIC_EXPANSION_THRESHOLD
    tau = _SMALL_T_EXPANSION_THRESHOLD
    asymptotic = positive & (x < s * eta) & (0.5 * s * s + x < s * (tau + eta))
    small_t = positive & ~asymptotic & (0.5 * s < tau)
    by_cdf = positive & ~asymptotic & ~small_t & (x + 0.5 * s * s > 0.85 * s)
    by_erfcx = positive & ~asymptotic & ~small_t & ~by_cdf
    for region, evaluate in (
        (asymptotic, _asymptotic_expansion),
        (small_t, _small_t_expansion),
        (by_erfcx, _black_with_erfcx),
    ):
        if region.any():
            b[region] = evaluate(x[region] / s[region], 0.5 * s[region])
    if by_cdf.any():
        b[by_cdf] = _black_with_cdf(x[by_cdf], s[by_cdf])
    return np.maximum(b, 0.0)


def _normalised_vega(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """∂b/∂s = φ(x/s + s/2)·e^{x/2}, written with one exponential; 0 at s = 0 unless x = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        h = x / s
        vega = _ONE_OVER_SQRT_TWO_PI * np.exp(-0.5 * (h * h + 0.25 * s * s))
    return np.where(x == 0.0, _ONE_OVER_SQRT_TWO_PI * np.exp(-0.125 * s * s), vega)


# ---------------------------------------------------------------------------------------------
# Let's Be Rational: rational initial guess in four branches, then Householder(3).
# ---------------------------------------------------------------------------------------------


def _rational_cubic(
    z: np.ndarray,
    z_l: np.ndarray,
    z_r: np.ndarray,
    y_l: np.ndarray,
    y_r: np.ndarray,
    d_l: np.ndarray,
    d_r: np.ndarray,
    r: np.ndarray,
) -> np.ndarray:
    """Delbourgo–Gregory rational cubic through (z_l, y_l), (z_r, y_r) with end slopes d_l, d_r."""
    h = z_r - z_l
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (z - z_l) / h
        omt = 1.0 - t
        t2 = t * t
        omt2 = omt * omt
        cubic = (
            y_r * t2 * t + (r * y_r - h * d_r) * t2 * omt + (r * y_l + h * d_l) * t * omt2 + y_l * omt2 * omt
        ) / (1.0 + (r - 3.0) * t * omt)
    linear = y_r * t + y_l * omt
    return np.where(h == 0.0, 0.5 * (y_l + y_r), np.where(r >= _RC_MAX, linear, cubic))


def _minimum_control_parameter(
    d_l: np.ndarray, d_r: np.ndarray, slope: np.ndarray, prefer_shape: bool
) -> np.ndarray:
    """Smallest control parameter keeping the interpolant monotone/convex (Delbourgo–Gregory 3.8, 3.18)."""
    monotonic = (d_l * slope >= 0.0) & (d_r * slope >= 0.0)
    convex = (d_l <= slope) & (slope <= d_r)
    concave = (d_l >= slope) & (slope >= d_r)
    fallback = -np.finfo(float).max
    with np.errstate(divide="ignore", invalid="ignore"):
        r1 = np.where(
            monotonic,
            np.where(np.abs(slope) >= _DBL_MIN, (d_r + d_l) / slope, _RC_MAX if prefer_shape else fallback),
            fallback,
        )
        s_minus_dl = slope - d_l
        dr_minus_s = d_r - slope
        shaped = np.maximum(np.abs((d_r - d_l) / dr_minus_s), np.abs((d_r - d_l) / s_minus_dl))
        degenerate = (np.abs(s_minus_dl) < _DBL_MIN) | (np.abs(dr_minus_s) < _DBL_MIN)
    r2 = np.where(
        convex | concave,
        np.where(degenerate, _RC_MAX if prefer_shape else fallback, shaped),
        np.where(monotonic & prefer_shape, _RC_MAX, fallback),
    )
    r_min = np.maximum(_RC_MIN, np.maximum(r1, r2))
    return np.where(monotonic | convex | concave, r_min, _RC_MIN)


def _convex_control_parameter(
    z_l: np.ndarray,
    z_r: np.ndarray,
    y_l: np.ndarray,
    y_r: np.ndarray,
    d_l: np.ndarray,
    d_r: np.ndarray,
    second_derivative: np.ndarray | float,
    at_left: bool,
    prefer_shape: bool,
) -> np.ndarray:
    """Control parameter matching a second derivative at one end, floored to stay shape preserving."""
    h = z_r - z_l
    numerator = 0.5 * h * second_derivative + (d_r - d_l)
    denominator = (y_r - y_l) / h - d_l if at_left else d_r - (y_r - y_l) / h
    with np.errstate(divide="ignore", invalid="ignore"):
        fitted = np.where(
            np.abs(denominator) < _DBL_MIN,
            np.where(numerator > 0.0, _RC_MAX, _RC_MIN),
            numerator / denominator,
        )
    fitted = np.where(np.abs(numerator) < _DBL_MIN, 0.0, fitted)
    return np.maximum(fitted, _minimum_control_parameter(d_l, d_r, (y_r - y_l) / h, prefer_shape))


def _lower_map(x: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Jäckel's f(β) for the lowest branch at s, with its first two β-derivatives."""
    ax = np.abs(x)
    z = _SQRT_ONE_OVER_THREE * ax / s
    y = z * z
    s2 = s * s
    big_phi = ndtr(-z)
    small_phi = _ONE_OVER_SQRT_TWO_PI * np.exp(-0.5 * y)
    fpp = (
        _PI_OVER_SIX
        * y
        / (s2 * s)
        * big_phi
        * (8.0 * _SQRT_THREE * s * ax + (3.0 * s2 * (s2 - 8.0) - 8.0 * x * x) * big_phi / small_phi)
        * np.exp(2.0 * y + 0.25 * s2)
    )
    phi2 = big_phi * big_phi
    fp = 2.0 * math.pi * y * phi2 * np.exp(y + 0.125 * s2)
    f = _TWO_PI_OVER_SQRT_TWENTY_SEVEN * ax * (phi2 * big_phi)
    return f, fp, fpp


def _upper_map(x: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Jäckel's f(β) = Φ(−s/2) for the highest branch at s, with its first two β-derivatives."""
    f = ndtr(-0.5 * s)
    w = (x / s) ** 2
    fp = -0.5 * np.exp(0.5 * w)
    fpp = _SQRT_PI_OVER_TWO * np.exp(w + 0.125 * s * s) * w / s
    return f, fp, fpp


_LOWER, _MIDDLE, _UPPER = 0, 1, 2


def _initial_guess(beta: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rational-cubic guess for s, and the objective each option iterates on (x <= 0, 0 < β < e^{x/2})."""
    b_max = np.exp(0.5 * x)
    s_c = np.sqrt(np.abs(2.0 * x))
    b_c = _normalised_black(x, s_c)
    v_c = _normalised_vega(x, s_c)
    s = np.empty_like(beta)
    objective = np.full(beta.shape, _MIDDLE)

    below = np.flatnonzero(beta < b_c)
    if below.size:
        xb, betab, sc, bc, vc = x[below], beta[below], s_c[below], b_c[below], v_c[below]
        s_l = sc - bc / vc
        b_l = _normalised_black(xb, s_l)
        lowest = betab < b_l
        i = np.flatnonzero(lowest)
        if i.size:
            xi, bi, sli, bli = xb[i], betab[i], s_l[i], b_l[i]
            f_l, fp_l, fpp_l = _lower_map(xi, sli)
            zero, one = np.zeros_like(xi), np.ones_like(xi)
            r_ll = _convex_control_parameter(zero, bli, zero, f_l, one, fp_l, fpp_l, False, True)
            f = _rational_cubic(bi, zero, bli, zero, f_l, one, fp_l, r_ll)
            t = bi / bli
            f = np.where(f > 0.0, f, (f_l * t + bli * (1.0 - t)) * t)
            with np.errstate(divide="ignore", invalid="ignore"):
                guess = np.abs(
                    xi
                    / (
                        _SQRT_THREE
                        * ndtri((f / (_TWO_PI_OVER_SQRT_TWENTY_SEVEN * np.abs(xi))) ** (1.0 / 3.0))
                    )
                )
            s[below[i]] = np.where(f > 0.0, guess, 0.0)
            objective[below[i]] = _LOWER
        j = np.flatnonzero(~lowest)
        if j.size:
            xj, bj, slj, blj, scj, bcj, vcj = xb[j], betab[j], s_l[j], b_l[j], sc[j], bc[j], vc[j]
            v_l = _normalised_vega(xj, slj)
            r_lm = _convex_control_parameter(blj, bcj, slj, scj, 1.0 / v_l, 1.0 / vcj, 0.0, False, False)
            s[below[j]] = _rational_cubic(bj, blj, bcj, slj, scj, 1.0 / v_l, 1.0 / vcj, r_lm)

    above = np.flatnonzero(beta >= b_c)
    if above.size:
        xa, betaa, sc, bc, vc, bmax = x[above], beta[above], s_c[above], b_c[above], v_c[above], b_max[above]
        s_h = np.where(vc > _DBL_MIN, sc + (bmax - bc) / vc, sc)
        b_h = _normalised_black(xa, s_h)
        middle = betaa <= b_h
        i = np.flatnonzero(middle)
        if i.size:
            xi, bi, sci, bci, vci, shi, bhi = xa[i], betaa[i], sc[i], bc[i], vc[i], s_h[i], b_h[i]
            v_h = _normalised_vega(xi, shi)
            r_hm = _convex_control_parameter(bci, bhi, sci, shi, 1.0 / vci, 1.0 / v_h, 0.0, True, False)
            s[above[i]] = _rational_cubic(bi, bci, bhi, sci, shi, 1.0 / vci, 1.0 / v_h, r_hm)
        j = np.flatnonzero(~middle)
        if j.size:
            xj, bj, shj, bhj, bmj = xa[j], betaa[j], s_h[j], b_h[j], bmax[j]
            f_h, fp_h, fpp_h = _upper_map(xj, shj)
            zero, half = np.zeros_like(xj), np.full_like(xj, -0.5)
            r_hh = _convex_control_parameter(bhj, bmj, f_h, zero, fp_h, half, fpp_h, True, True)
            f = _rational_cubic(bj, bhj, bmj, f_h, zero, fp_h, half, r_hh)
            finite_curvature = (fpp_h > -_SQRT_DBL_MAX) & (fpp_h < _SQRT_DBL_MAX)
            h = bmj - bhj
            t = (bj - bhj) / h
            quadratic = (f_h * (1.0 - t) + 0.5 * h * t) * (1.0 - t)
            f = np.where(finite_curvature & (f > 0.0), f, quadratic)
            s[above[j]] = -2.0 * ndtri(f)
            objective[above[j]] = np.where(bj > 0.5 * bmj, _UPPER, _MIDDLE)
    return s, objective


def _householder_factor(newton: np.ndarray, halley: np.ndarray, hh3: np.ndarray) -> np.ndarray:
    """Third-order Householder correction applied to a Newton step."""
    return (1.0 + 0.5 * halley * newton) / (1.0 + newton * (halley + hh3 * newton / 6.0))


def _householder_step(beta: np.ndarray, x: np.ndarray, s: np.ndarray, objective: np.ndarray) -> np.ndarray:
    """One Householder(3) step on 1/ln b − 1/ln β (lower), b − β (middle), ln((b_max−β)/(b_max−b)) (upper)."""
    b = _normalised_black(x, s)
    bp = _normalised_vega(x, s)
    b_max = np.exp(0.5 * x)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        b_halley = (x / s) ** 2 / s - 0.25 * s
        b_hh3 = b_halley * b_halley - 3.0 * (x / (s * s)) ** 2 - 0.25
        newton = (beta - b) / bp
        halley = b_halley.copy()
        hh3 = b_hh3.copy()

        lower = objective == _LOWER
        if lower.any():
            ln_b = np.log(b[lower])
            ln_beta = np.log(beta[lower])
            bpob = bp[lower] / b[lower]
            bh = b_halley[lower]
            newton[lower] = (ln_beta - ln_b) * ln_b / ln_beta / bpob
            halley[lower] = bh - bpob * (1.0 + 2.0 / ln_b)
            hh3[lower] = (
                b_hh3[lower]
                + 2.0 * bpob * bpob * (1.0 + 3.0 / ln_b * (1.0 + 1.0 / ln_b))
                - 3.0 * bh * bpob * (1.0 + 2.0 / ln_b)
            )
        upper = objective == _UPPER
        if upper.any():
            room = b_max[upper] - b[upper]
            g = np.log((b_max[upper] - beta[upper]) / room)
            gp = bp[upper] / room
            bh = b_halley[upper]
            newton[upper] = -g / gp
            halley[upper] = bh + gp
            hh3[upper] = b_hh3[upper] + gp * (2.0 * gp + 3.0 * bh)
        ds = newton * _householder_factor(newton, halley, hh3)
    ds = np.where(np.isfinite(ds), ds, 0.0)
    return s + np.maximum(-0.5 * s, ds)


def _normalised_implied_vol(beta: np.ndarray, x: np.ndarray) -> np.ndarray:
    """s = σ√T solving b(x, s) = β for out-of-the-money normalised calls (x <= 0, 0 < β < e^{x/2})."""
    s, objective = _initial_guess(beta, x)
    for _ in range(_HOUSEHOLDER_STEPS):
        s = _householder_step(beta, x, s, objective)
    return s


# ---------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------


def _as_float(value: ArrayLike) -> np.ndarray:
    return np.asarray(value, dtype=float)


def _forward_terms(
    spot: np.ndarray, strikes: np.ndarray, maturities: np.ndarray, r: np.ndarray, q: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Forward, discount factor and x = ln(F/K), computed identically for pricing and inversion."""
    with np.errstate(invalid="ignore", divide="ignore"):
        forward = spot * np.exp((r - q) * maturities)
        discount = np.exp(-r * maturities)
        x = np.log(forward / strikes)
    return forward, discount, x


def bs_price(
    spot: ArrayLike,
    strikes: ArrayLike,
    maturities: ArrayLike,
    vol: ArrayLike,
    r: ArrayLike = 0.0,
    q: ArrayLike = 0.0,
    call: ArrayLike = True,
) -> np.ndarray:
    """Black–Scholes price; NaN for non-positive spot or strike, negative vol or maturity.

    Priced as discounted intrinsic plus the out-of-the-money normalised Black value, so tiny wing
    prices keep full relative precision and ``implied_vol`` inverts exactly what is computed here.
    """
    arrays = np.broadcast_arrays(
        _as_float(spot), _as_float(strikes), _as_float(maturities), _as_float(vol), _as_float(r), _as_float(q)
    )
    is_call = np.broadcast_to(np.asarray(call, dtype=bool), arrays[0].shape)
    shape = arrays[0].shape
    spot_, strikes_, maturities_, vol_, r_, q_ = (a.ravel() for a in arrays)
    forward, discount, x = _forward_terms(spot_, strikes_, maturities_, r_, q_)
    sign = np.where(is_call.ravel(), 1.0, -1.0)
    intrinsic = np.maximum(sign * (forward - strikes_), 0.0)
    valid = (spot_ > 0.0) & (strikes_ > 0.0) & (maturities_ >= 0.0) & (vol_ >= 0.0) & np.isfinite(x)
    valid &= np.isfinite(vol_) & np.isfinite(discount)
    price = np.full(spot_.shape, np.nan)
    idx = np.flatnonzero(valid)
    s = vol_[idx] * np.sqrt(maturities_[idx])
    time_value = np.sqrt(forward[idx]) * np.sqrt(strikes_[idx]) * _normalised_black(-np.abs(x[idx]), s)
    price[idx] = discount[idx] * (intrinsic[idx] + time_value)
    return price.reshape(shape)


def implied_vol(
    prices: ArrayLike,
    spot: ArrayLike,
    strikes: ArrayLike,
    maturities: ArrayLike,
    r: ArrayLike = 0.0,
    q: ArrayLike = 0.0,
    call: ArrayLike = True,
) -> np.ndarray:
    """Black–Scholes implied volatility, vectorised Let's Be Rational; never raises.

    NaN where no volatility reproduces the price: below discounted intrinsic, at or above the upper
    bound (``S·e^{−qT}`` for a call, ``K·e^{−rT}`` for a put), non-positive maturity, spot or strike,
    or non-finite input. A price exactly at intrinsic gives 0.
    """
    arrays = np.broadcast_arrays(
        _as_float(prices),
        _as_float(spot),
        _as_float(strikes),
        _as_float(maturities),
        _as_float(r),
        _as_float(q),
    )
    is_call = np.broadcast_to(np.asarray(call, dtype=bool), arrays[0].shape).ravel()
    shape = arrays[0].shape
    prices_, spot_, strikes_, maturities_, r_, q_ = (a.ravel() for a in arrays)
    forward, discount, x = _forward_terms(spot_, strikes_, maturities_, r_, q_)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        undiscounted = prices_ / discount
        sign = np.where(is_call, 1.0, -1.0)
        intrinsic = np.maximum(sign * (forward - strikes_), 0.0)
        upper_bound = np.where(is_call, forward, strikes_)
        valid = (spot_ > 0.0) & (strikes_ > 0.0) & (maturities_ > 0.0) & np.isfinite(x)
        valid &= np.isfinite(undiscounted) & (undiscounted >= intrinsic) & (undiscounted < upper_bound)
        # Put–call parity maps every option to the out-of-the-money one: its time value, on x <= 0.
        beta = (undiscounted - intrinsic) / (np.sqrt(forward) * np.sqrt(strikes_))
        x_otm = -np.abs(x)
        valid &= beta < np.exp(0.5 * x_otm)
    vol = np.full(prices_.shape, np.nan)
    vol[valid & (beta == 0.0)] = 0.0
    idx = np.flatnonzero(valid & (beta > 0.0))
    for chunk in np.array_split(idx, -(-idx.size // _CHUNK)) if idx.size else ():
        vol[chunk] = _normalised_implied_vol(beta[chunk], x_otm[chunk]) / np.sqrt(maturities_[chunk])
    return vol.reshape(shape)


def _d1_and_total_vol(
    spot: ArrayLike, strikes: ArrayLike, maturities: ArrayLike, vol: ArrayLike, r: ArrayLike, q: ArrayLike
) -> tuple[np.ndarray, ...]:
    """Broadcast inputs plus √T, s = σ√T and d1, with the s → 0 limits of d1 (±∞, or 0 at the money)."""
    spot_, strikes_, maturities_, vol_, r_, q_ = np.broadcast_arrays(
        _as_float(spot), _as_float(strikes), _as_float(maturities), _as_float(vol), _as_float(r), _as_float(q)
    )
    _, _, x = _forward_terms(spot_, strikes_, maturities_, r_, q_)
    sqrt_t = np.sqrt(np.where(maturities_ >= 0.0, maturities_, np.nan))
    with np.errstate(invalid="ignore", divide="ignore"):
        s = vol_ * sqrt_t
        d1 = np.where(s > 0.0, x / s + 0.5 * s, np.where(x == 0.0, 0.0, np.sign(x) * np.inf))
        invalid = (spot_ <= 0.0) | (strikes_ <= 0.0) | (maturities_ < 0.0) | (vol_ < 0.0)
    d1 = np.where(invalid, np.nan, d1)
    return spot_, strikes_, maturities_, r_, q_, sqrt_t, s, d1


def bs_vega(
    spot: ArrayLike,
    strikes: ArrayLike,
    maturities: ArrayLike,
    vol: ArrayLike,
    r: ArrayLike = 0.0,
    q: ArrayLike = 0.0,
) -> np.ndarray:
    """∂price/∂σ (same for calls and puts), the natural weight turning price errors into vol errors."""
    spot_, _, maturities_, _, q_, sqrt_t, _, d1 = _d1_and_total_vol(spot, strikes, maturities, vol, r, q)
    dividend_discount = np.exp(-q_ * maturities_)
    return spot_ * dividend_discount * _ONE_OVER_SQRT_TWO_PI * np.exp(-0.5 * d1 * d1) * sqrt_t


def bs_greeks(
    spot: ArrayLike,
    strikes: ArrayLike,
    maturities: ArrayLike,
    vol: ArrayLike,
    r: ArrayLike = 0.0,
    q: ArrayLike = 0.0,
    call: ArrayLike = True,
) -> BSGreeks:
    """Delta, gamma, vega (per unit vol), theta (−∂V/∂T, per year); at zero vol, the intrinsic limits."""
    spot_, strikes_, maturities_, r_, q_, sqrt_t, s, d1 = _d1_and_total_vol(
        spot, strikes, maturities, vol, r, q
    )
    sign = np.where(np.broadcast_to(np.asarray(call, dtype=bool), spot_.shape), 1.0, -1.0)
    d2 = d1 - s
    dividend_discount = np.exp(-q_ * maturities_)
    discount = np.exp(-r_ * maturities_)
    density = _ONE_OVER_SQRT_TWO_PI * np.exp(-0.5 * d1 * d1)
    delta = sign * dividend_discount * ndtr(sign * d1)
    with np.errstate(invalid="ignore", divide="ignore"):
        gamma = np.where(s > 0.0, dividend_discount * density / (spot_ * s), 0.0)
        decay = np.where(s > 0.0, spot_ * dividend_discount * density * s / (2.0 * maturities_), 0.0)
    vega = spot_ * dividend_discount * density * sqrt_t
    theta = (
        -decay
        - sign * r_ * strikes_ * discount * ndtr(sign * d2)
        + sign * q_ * spot_ * dividend_discount * ndtr(sign * d1)
    )
    nan = np.isnan(d1)
    return BSGreeks(*(np.where(nan, np.nan, g) for g in (delta, gamma, vega, theta)))
