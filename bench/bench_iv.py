"""Implied-volatility inversion throughput: vectorised ``implied_vol`` against per-option loops.

Run from the project root: ``python bench/bench_iv.py [--options N]``. Prints options per second for
``models.iv.implied_vol`` on one large array, a ``scipy.optimize.brentq`` loop and the scalar
``py_lets_be_rational`` loop (each loop on a smaller sample, since throughput is per option), the
speed-ups, and the round-trip error of each method. Rates use this process's CPU time, so a busy
shared machine slows all methods alike. Takes well under a minute on one core.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy.optimize import brentq
from scipy.special import ndtr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.iv import bs_price, implied_vol

try:
    from py_lets_be_rational import implied_volatility_from_a_transformed_rational_guess
except ImportError:  # the scalar reference is optional: the brentq comparison still runs
    implied_volatility_from_a_transformed_rational_guess = None


def _book(n: int, seed: int) -> dict[str, np.ndarray]:
    """Forward-normalised options: |ln(K/F)| <= 1, 1 day to 5 years, σ in [0.05, 2], calls and puts."""
    rng = np.random.default_rng(seed)
    maturities = np.exp(rng.uniform(math.log(1 / 365), math.log(5.0), n))
    vol = rng.uniform(0.05, 2.0, n)
    # Keep the quotes where a price can tell σ at all: at most 3 standard deviations out of the money.
    reach = np.minimum(1.0, 3.0 * vol * np.sqrt(maturities))
    strikes = np.exp(rng.uniform(-1.0, 1.0, n) * reach)
    is_call = rng.random(n) < 0.5
    price = bs_price(1.0, strikes, maturities, vol, 0.0, 0.0, is_call)
    return {"price": price, "strikes": strikes, "maturities": maturities, "vol": vol, "call": is_call}


def _black(forward: float, strike: float, maturity: float, vol: float, sign: float) -> float:
    s = vol * math.sqrt(maturity)
    d1 = math.log(forward / strike) / s + 0.5 * s
    return sign * (forward * float(ndtr(sign * d1)) - strike * float(ndtr(sign * (d1 - s))))


def _brentq_vol(price: float, strike: float, maturity: float, is_call: bool) -> float:
    sign = 1.0 if is_call else -1.0
    return brentq(
        lambda v: _black(1.0, strike, maturity, v, sign) - price, 1e-6, 10.0, xtol=1e-14, rtol=1e-15
    )


def _lets_be_rational_vol(price: float, strike: float, maturity: float, is_call: bool) -> float:
    return implied_volatility_from_a_transformed_rational_guess(
        price, 1.0, strike, maturity, 1.0 if is_call else -1.0
    )


def _loop(
    solve: Callable[[float, float, float, bool], float], book: dict[str, np.ndarray], n: int
) -> tuple[float, float]:
    """Options per second and max |σ error| of a per-option solver on the first n options."""
    start = time.process_time()
    vols = [
        solve(float(p), float(k), float(t), bool(c))
        for p, k, t, c in zip(
            book["price"][:n], book["strikes"][:n], book["maturities"][:n], book["call"][:n], strict=True
        )
    ]
    elapsed = time.process_time() - start
    return n / elapsed, float(np.max(np.abs(np.array(vols) - book["vol"][:n])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--options", type=int, default=1_000_000, help="size of the vectorised batch")
    parser.add_argument("--loop-options", type=int, default=3_000, help="sample size for the scalar loops")
    args = parser.parse_args()

    book = _book(args.options, seed=0)
    implied_vol(
        book["price"][:1000], 1.0, book["strikes"][:1000], book["maturities"][:1000], call=book["call"][:1000]
    )
    start = time.process_time()
    vols = implied_vol(book["price"], 1.0, book["strikes"], book["maturities"], call=book["call"])
    elapsed = time.process_time() - start
    vector_rate = args.options / elapsed
    vector_error = float(np.nanmax(np.abs(vols - book["vol"])))

    brentq_rate, brentq_error = _loop(_brentq_vol, book, args.loop_options)
    rows = [(f"implied_vol, vectorised ({args.options:,})", vector_rate, vector_error)]
    rows.append((f"scipy brentq loop ({args.loop_options:,})", brentq_rate, brentq_error))
    if implied_volatility_from_a_transformed_rational_guess is None:
        print("py_lets_be_rational not installed: its scalar loop is skipped")
    else:
        lbr_rate, lbr_error = _loop(_lets_be_rational_vol, book, args.loop_options)
        rows.append((f"py_lets_be_rational loop ({args.loop_options:,})", lbr_rate, lbr_error))
    print(f"{'method (options)':<40} {'options/s (CPU)':>16} {'max |Δσ|':>10}")
    for name, rate, error in rows:
        print(f"{name:<40} {rate:16,.0f} {error:10.1e}")
    for name, rate, _ in rows[1:]:
        print(f"speed-up of implied_vol over {name.split(' (')[0]}: {vector_rate / rate:,.1f}x per option")


if __name__ == "__main__":
    main()
