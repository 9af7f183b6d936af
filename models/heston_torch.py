"""The Heston pricer of ``models.heston`` in torch, differentiable with respect to the parameters.

Same formula as the numpy pricer (Lewis's single integral with a Black–Scholes control variate and
the little-trap characteristic function), same quadrature: the nodes are planned by
``models.heston.plan_quadrature`` on the parameters' current values and held fixed, so gradients are
the exact derivatives of the quadrature sum, and prices agree with the numpy pricer to rounding.
Works under reverse mode (``backward``) and forward mode (``torch.autograd.forward_ad``), which
calibration uses to get all five sensitivities in one pass.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.autograd import forward_ad

from models.heston import _CHUNK_ELEMENTS, PARAM_NAMES, plan_quadrature

Tensor = torch.Tensor


def _log1p(w: Tensor) -> Tensor:
    """Complex log(1 + w) accurate for small |w| (mirrors ``models.heston._log1p``)."""
    re, im = w.real, w.imag
    return torch.complex(0.5 * torch.log1p(re * (2.0 + re) + im * im), torch.atan2(im, 1.0 + re))


def _expm1(z: Tensor) -> Tensor:
    """Complex exp(z) − 1 accurate for small |z|."""
    re, im = z.real, z.imag
    half_sin = torch.sin(0.5 * im)
    real = torch.expm1(re) * torch.cos(im) - 2.0 * half_sin * half_sin
    return torch.complex(real, torch.exp(re) * torch.sin(im))


def log_charfn_torch(
    z: Tensor, t: Tensor, kappa: Tensor, theta: Tensor, sigma: Tensor, rho: Tensor, v0: Tensor
) -> Tensor:
    """ln E[exp(i z ln(S_T/F))] in the little-trap form; see ``models.heston.log_charfn``."""
    iz = 1j * z
    b = kappa - rho * sigma * iz
    d = torch.sqrt(b * b + sigma * sigma * (iz + z * z))
    b_plus_d = b + d
    b_minus_d_over_s2 = -(iz + z * z) / b_plus_d
    g = sigma * sigma * b_minus_d_over_s2 / b_plus_d
    one_minus_e = -_expm1(-d * t)
    one_minus_ge = 1.0 - g * (1.0 - one_minus_e)
    log_ratio = _log1p(g * one_minus_e / (1.0 - g))
    c = kappa * theta * (b_minus_d_over_s2 * t - 2.0 * log_ratio / (sigma * sigma))
    return c + v0 * b_minus_d_over_s2 * one_minus_e / one_minus_ge


def _expected_variance(p: Tensor, t: Tensor) -> Tensor:
    kappa, theta, v0 = p[:, 0], p[:, 1], p[:, 4]
    return theta * t + (v0 - theta) * (-torch.expm1(-kappa * t)) / kappa


def _primal_numpy(x: Tensor) -> np.ndarray:
    """The values of ``x`` without any forward or backward derivative attached."""
    return forward_ad.unpack_dual(x).primal.detach().cpu().numpy()


def _fourier_correction(p: Tensor, t: Tensor, strike_part: Tensor, shift: Tensor) -> Tensor:
    """(m, nK) Fourier part of the price for pairs ``p`` (m, 5), ``t`` (m,), ln(K/F) = strike_part + shift."""
    y = strike_part[None, :] + shift[:, None]
    plans = plan_quadrature(_primal_numpy(p), _primal_numpy(t), np.abs(_primal_numpy(y)).max(axis=1))
    variance = _expected_variance(p, t)
    pieces, order = [], []
    for plan in plans:
        unit_nodes, unit_weights = plan.unit_rule()
        u = torch.as_tensor(plan.cutoff * unit_nodes, dtype=torch.float64)
        kernel = torch.as_tensor(plan.cutoff * unit_weights, dtype=torch.float64) / (u * u + 0.25)
        z = torch.complex(u, torch.full_like(u, -0.5))
        strike_phase = torch.exp(-1j * torch.outer(u, strike_part))
        chunk = max(1, _CHUNK_ELEMENTS // u.numel())
        for start in range(0, plan.pairs.size, chunk):
            rows_np = plan.pairs[start : start + chunk]
            rows = torch.as_tensor(rows_np)
            pr, tr = p[rows], t[rows, None]
            heston = torch.exp(log_charfn_torch(z[None, :], tr, *(pr[:, k, None] for k in range(5))))
            gaussian = torch.exp(-0.5 * variance[rows, None] * (u * u + 0.25)[None, :])
            weighted = (heston - gaussian) * kernel * torch.exp(-1j * torch.outer(shift[rows], u))
            pieces.append((weighted @ strike_phase).real)
            order.append(rows_np)
    inverse = torch.as_tensor(np.argsort(np.concatenate(order)))
    return torch.exp(0.5 * y) / np.pi * torch.cat(pieces)[inverse]


def call_prices_torch(
    params: Tensor,
    spot: float,
    strikes: Tensor,
    maturities: Tensor,
    r: float = 0.0,
    q: float = 0.0,
) -> Tensor:
    """European call prices, (nK, nT) for ``params`` of shape (5,), (n, nK, nT) for an (n, 5) batch.

    Parameters in ``PARAM_NAMES`` order, float64; they are not validated here (the numpy pricer
    is the checked entry point), so keep them inside the Heston domain.
    """
    batched = params.dim() == 2
    p = params.reshape(-1, len(PARAM_NAMES))
    strikes = torch.as_tensor(strikes, dtype=torch.float64).reshape(-1)
    maturities = torch.as_tensor(maturities, dtype=torch.float64).reshape(-1)
    n, n_t, n_k = p.shape[0], maturities.numel(), strikes.numel()
    pair_p = p.repeat_interleave(n_t, dim=0)
    pair_t = maturities.repeat(n)
    shift = -(r - q) * pair_t
    strike_part = torch.log(strikes / spot)
    correction = _fourier_correction(pair_p, pair_t, strike_part, shift)
    y = strike_part[None, :] + shift[:, None]
    variance = _expected_variance(pair_p, pair_t)[:, None]
    sd = torch.sqrt(variance)
    d1 = (-y + 0.5 * variance) / sd
    control = torch.special.ndtr(d1) - torch.exp(y) * torch.special.ndtr(d1 - sd)
    undiscounted = (control - correction).reshape(n, n_t, n_k).transpose(1, 2)
    # The true price lies inside the no-arbitrage bounds; clipping only removes quadrature noise.
    ky = torch.exp(strike_part[:, None] - (r - q) * maturities[None, :])
    lower = torch.clamp(1.0 - ky, min=0.0)
    undiscounted = torch.minimum(torch.maximum(undiscounted, lower), torch.ones_like(ky))
    forward = spot * torch.exp((r - q) * maturities)
    prices = undiscounted * (torch.exp(-r * maturities) * forward)[None, None, :]
    return prices if batched else prices[0]
