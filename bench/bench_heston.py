"""Benchmark: Heston surface pricing on the project's 10×6 grid, numpy and torch, against QuantLib.

Prints (1) the time to price one surface (``grid.LOG_MONEYNESS`` strikes × ``grid.MATURITIES``) with
``models.heston.call_prices`` against QuantLib's ``AnalyticHestonEngine`` on the same 60 options
(default 144-point Gauss–Laguerre, and the OptimalCV + exp-sinh configuration the tests use as an
arbiter), with the time ratios and the largest price difference; (2) the throughput of one batch
call pricing 10,000 surfaces with random parameters (Feller violations included); (3) the torch
pricer on one surface: prices alone, prices plus one reverse-mode gradient, and the full 60×5
Jacobian by forward mode (one batched pass as in ``models.calibration``, and five separate passes).
Each figure is the best of several runs (the least disturbed by other load).
Run from the project root: ``python bench/bench_heston.py``; takes about ten seconds on two cores.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import QuantLib as ql
import torch
from torch.autograd import forward_ad

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import grid
from models.heston import HestonParams, call_prices
from models.heston_torch import call_prices_torch

PARAMS = HestonParams(kappa=2.0, theta=0.25, sigma=0.8, rho=-0.6, v0=0.36)
SPOT = 1.0
STRIKES = SPOT * np.exp(grid.LOG_MONEYNESS)  # r = q = 0, so ln(K/F) = ln(K/S)
REPEATS = 7
BATCH = 10_000
BATCH_REPEATS = 3


def _best_time(run: Callable[[], object], repeats: int = REPEATS) -> tuple[float, object]:
    """Fastest wall time of ``repeats`` calls and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - started)
    return best, result


class _QuantLibSurface:
    """The 60 grid options on one HestonModel; pricing sets the model's parameters and reads the NPVs."""

    def __init__(self, engine_factory: Callable[[ql.HestonModel], ql.PricingEngine]) -> None:
        today = ql.Date(2, 1, 2024)
        ql.Settings.instance().evaluationDate = today
        flat = ql.YieldTermStructureHandle(ql.FlatForward(today, 0.0, ql.Actual365Fixed()))
        p = PARAMS
        process = ql.HestonProcess(
            flat, flat, ql.QuoteHandle(ql.SimpleQuote(SPOT)), p.v0, p.kappa, p.theta, p.sigma, p.rho
        )
        self.model = ql.HestonModel(process)
        engine = engine_factory(self.model)
        self.options = []
        for strike in STRIKES:
            for days in grid.TENOR_DAYS:
                payoff = ql.PlainVanillaPayoff(ql.Option.Call, float(strike))
                option = ql.EuropeanOption(payoff, ql.EuropeanExercise(today + int(days)))
                option.setPricingEngine(engine)
                self.options.append(option)

    def prices(self, params: HestonParams) -> np.ndarray:
        # setParams notifies every option, so each call really reprices all 60.
        self.model.setParams(ql.Array([params.theta, params.kappa, params.sigma, params.rho, params.v0]))
        return np.array([option.NPV() for option in self.options]).reshape(grid.SHAPE)


def _random_parameters(n: int, seed: int) -> np.ndarray:
    """(n, 5) Heston parameters over a crypto-wide domain."""
    rng = np.random.default_rng(seed)
    return np.column_stack(
        [
            rng.uniform(0.2, 5.0, n),  # kappa
            rng.uniform(0.01, 0.6, n),  # theta
            rng.uniform(0.1, 2.0, n),  # sigma
            rng.uniform(-0.95, 0.5, n),  # rho
            rng.uniform(0.01, 0.8, n),  # v0
        ]
    )


def main() -> None:
    print(f"grid {grid.SHAPE}: K/F {grid.MONEYNESS.min()}..{grid.MONEYNESS.max()}, "
          f"{grid.TENOR_DAYS.min():.0f}..{grid.TENOR_DAYS.max():.0f} days; params {PARAMS}")

    # (1) One surface: ours against QuantLib on the same 60 options.
    call_prices(PARAMS, SPOT, STRIKES, grid.MATURITIES)  # warm the quadrature-node cache
    ours_seconds, ours = _best_time(lambda: call_prices(PARAMS, SPOT, STRIKES, grid.MATURITIES))
    print(f"(1) one surface, call_prices         : {ours_seconds * 1e3:8.3f} ms")
    engines = {
        "QuantLib default (Gauss-Laguerre 144)": ql.AnalyticHestonEngine,
        "QuantLib OptimalCV + expSinh(1e-14)  ": lambda model: ql.AnalyticHestonEngine(
            model, ql.AnalyticHestonEngine.OptimalCV, ql.FourierIntegration.expSinh(1e-14)
        ),
    }
    for name, factory in engines.items():
        surface = _QuantLibSurface(factory)
        seconds, quantlib = _best_time(lambda surface=surface: surface.prices(PARAMS))
        difference = float(np.max(np.abs(np.asarray(quantlib) - np.asarray(ours))))
        print(f"    {name}: {seconds * 1e3:8.3f} ms  QuantLib/ours time {seconds / ours_seconds:6.1f}x  "
              f"max |price diff| {difference:.1e}")

    # (2) Throughput: one batch call over many random parameter sets.
    params = _random_parameters(BATCH, seed=7)
    feller_violated = float(np.mean(2.0 * params[:, 0] * params[:, 1] <= params[:, 2] ** 2))
    call_prices(params[:100], SPOT, STRIKES, grid.MATURITIES)
    batch_seconds, batch = _best_time(
        lambda: call_prices(params, SPOT, STRIKES, grid.MATURITIES), BATCH_REPEATS
    )
    assert np.asarray(batch).shape == (BATCH, *grid.SHAPE) and np.isfinite(batch).all()
    print(f"(2) {BATCH} surfaces in one call       : {batch_seconds:8.3f} s  "
          f"{BATCH / batch_seconds:,.0f} surfaces/s  ({batch_seconds / BATCH * 1e6:.0f} µs/surface, "
          f"{feller_violated:.0%} violate Feller)")

    # (3) Torch: one surface, with derivatives.
    strikes_t = torch.tensor(STRIKES, dtype=torch.float64)
    maturities_t = torch.tensor(grid.MATURITIES, dtype=torch.float64)
    x = torch.tensor(PARAMS.to_array(), dtype=torch.float64)
    target = torch.as_tensor(np.asarray(ours)) * 1.01

    def prices_only() -> torch.Tensor:
        with torch.no_grad():
            return call_prices_torch(x, SPOT, strikes_t, maturities_t)

    def with_gradient() -> torch.Tensor:
        leaf = x.clone().requires_grad_(True)
        loss = ((call_prices_torch(leaf, SPOT, strikes_t, maturities_t) - target) ** 2).sum()
        loss.backward()
        return leaf.grad

    identity = torch.eye(5, dtype=torch.float64)

    def jacobian_five_passes() -> torch.Tensor:
        with forward_ad.dual_level():
            columns = [
                forward_ad.unpack_dual(
                    call_prices_torch(forward_ad.make_dual(x, identity[k]), SPOT, strikes_t, maturities_t)
                ).tangent
                for k in range(5)
            ]
        return torch.stack(columns, dim=-1)

    def jacobian_one_pass() -> torch.Tensor:
        # As models.calibration does it: five copies of x as a batch, the identity as their tangents.
        with forward_ad.dual_level():
            dual = forward_ad.make_dual(x.expand(5, -1).contiguous(), identity)
            tangent = forward_ad.unpack_dual(call_prices_torch(dual, SPOT, strikes_t, maturities_t)).tangent
        return tangent.permute(1, 2, 0)

    for run in (prices_only, with_gradient, jacobian_five_passes, jacobian_one_pass):
        run()  # first calls build torch kernels
    price_seconds, _ = _best_time(prices_only)
    grad_seconds, grad = _best_time(with_gradient)
    five_seconds, five = _best_time(jacobian_five_passes)
    one_seconds, one = _best_time(jacobian_one_pass)
    assert torch.isfinite(grad).all()
    assert torch.allclose(five, one, rtol=1e-12, atol=1e-12) and tuple(one.shape) == (*grid.SHAPE, 5)
    print(f"(3) torch, one surface, prices only  : {price_seconds * 1e3:8.3f} ms")
    print(f"    torch, prices + backward (grad)  : {grad_seconds * 1e3:8.3f} ms  "
          f"({grad_seconds / ours_seconds:.1f}x numpy prices)")
    print(f"    torch, 60x5 Jacobian, forward AD : {one_seconds * 1e3:8.3f} ms  one batched pass "
          f"(five separate passes: {five_seconds * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
