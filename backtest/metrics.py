"""Performance metrics of a backtest, from its equity curve and its fills.

Pure functions of numpy arrays, so each can be checked against a hand computation.
Conventions (the same for the strategy and its benchmark):

- **Returns** are simple returns between consecutive equity samples (the portfolio
  snapshots, every ``run.snapshot_interval_s`` of event time, plus the final one).
- **Annualisation** uses the actual sampling: ``periods_per_year = 365 days / the median
  interval between samples`` (crypto trades every day of the year; the median ignores the
  shorter final interval). Annualised return is geometric over the actual span.
- **Sharpe** and **Sortino** assume a zero risk-free rate: ``mean / std · √periods_per_year``,
  with the sample standard deviation for Sharpe and the downside deviation
  ``√mean(min(r, 0)²)`` for Sortino.
- **Max drawdown** is the largest fall from a running peak, as a positive fraction; its
  **duration** is the longest time from a peak until equity first regains it (or until the
  end, if it never does) — not necessarily the deepest episode.
- **Turnover** is traded notional divided by mean equity: how many times the book was traded.
- **Hit rate** is the share of *closing* fills — fills that reduce or close a position —
  whose realised PnL (price move against the average entry, before fees) is positive.
  Opening fills realise nothing and are not counted.
- **Exposure time** is the share of time with any open position: each interval between
  samples counts as exposed when the sample that starts it has a positive gross exposure.

A value that does not exist (a ratio over zero, a rate with no closing fills) is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

NANOS_PER_SECOND = 1_000_000_000
SECONDS_PER_YEAR = 365.0 * 86_400.0


@dataclass(frozen=True, slots=True)
class Metrics:
    """Every figure of one equity curve and its fills (see the module docstring for definitions)."""

    start_equity: float
    end_equity: float
    total_return: float
    annualised_return: float
    annualised_volatility: float
    sharpe: float
    sortino: float
    max_drawdown: float
    max_drawdown_duration_s: float
    calmar: float
    turnover: float
    traded_notional: float
    fees: float
    funding_pnl: float
    trades: int
    closing_trades: int
    hit_rate: float
    exposure_time: float
    span_s: float
    sampling_interval_s: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def period_returns(equity: np.ndarray) -> np.ndarray:
    """Simple returns between consecutive samples."""
    equity = np.asarray(equity, dtype=float)
    return equity[1:] / equity[:-1] - 1.0


def sampling_interval_s(ts_ns: np.ndarray) -> float:
    """Median time between samples, in seconds (NaN with fewer than two samples)."""
    ts_ns = np.asarray(ts_ns, dtype=np.int64)
    if ts_ns.size < 2:
        return math.nan
    return float(np.median(np.diff(ts_ns))) / NANOS_PER_SECOND


def periods_per_year(ts_ns: np.ndarray) -> float:
    """How many sampling intervals make a 365-day year."""
    interval = sampling_interval_s(ts_ns)
    return SECONDS_PER_YEAR / interval if interval > 0 else math.nan


def total_return(equity: np.ndarray) -> float:
    equity = np.asarray(equity, dtype=float)
    return float(equity[-1] / equity[0] - 1.0)


def annualised_return(equity: np.ndarray, ts_ns: np.ndarray) -> float:
    """Geometric return per 365 days over the actual span (−1 when equity ends at or below zero)."""
    equity = np.asarray(equity, dtype=float)
    span_s = (int(ts_ns[-1]) - int(ts_ns[0])) / NANOS_PER_SECOND
    if span_s <= 0:
        return math.nan
    growth = equity[-1] / equity[0]
    if growth <= 0:
        return -1.0
    try:
        return math.expm1(math.log(growth) * SECONDS_PER_YEAR / span_s)
    except OverflowError:
        return math.inf


def annualised_volatility(returns: np.ndarray, per_year: float) -> float:
    """Sample standard deviation of the returns, scaled by √periods per year."""
    returns = np.asarray(returns, dtype=float)
    if returns.size < 2:
        return math.nan
    return float(np.std(returns, ddof=1) * math.sqrt(per_year))


def sharpe_ratio(returns: np.ndarray, per_year: float) -> float:
    """Annualised mean return over annualised volatility, risk-free rate zero."""
    returns = np.asarray(returns, dtype=float)
    if returns.size < 2:
        return math.nan
    std = float(np.std(returns, ddof=1))
    return float(np.mean(returns)) / std * math.sqrt(per_year) if std > 0 else math.nan


def sortino_ratio(returns: np.ndarray, per_year: float) -> float:
    """Like Sharpe, but only losses count as risk: mean over √mean(min(r, 0)²)."""
    returns = np.asarray(returns, dtype=float)
    if returns.size < 1:
        return math.nan
    downside = math.sqrt(float(np.mean(np.minimum(returns, 0.0) ** 2)))
    return float(np.mean(returns)) / downside * math.sqrt(per_year) if downside > 0 else math.nan


def drawdown(equity: np.ndarray) -> np.ndarray:
    """Fall from the running peak at every sample, as a fraction of that peak (≥ 0)."""
    equity = np.asarray(equity, dtype=float)
    return 1.0 - equity / np.maximum.accumulate(equity)


def max_drawdown(equity: np.ndarray, ts_ns: np.ndarray) -> tuple[float, float]:
    """Deepest drawdown (fraction) and the longest time under a previous peak (seconds).

    A spell under water lasts from its peak to the first sample back at or above it,
    or to the last sample when equity never recovers.
    """
    equity = np.asarray(equity, dtype=float)
    ts_ns = np.asarray(ts_ns, dtype=np.int64)
    if equity.size == 0:
        return math.nan, math.nan
    at_peak = equity >= np.maximum.accumulate(equity)
    index = np.arange(equity.size)
    last_peak = np.maximum.accumulate(np.where(at_peak, index, 0))
    # Under water, or the sample that ends a spell: time since the peak the previous sample was under.
    in_spell = ~at_peak
    in_spell[1:] |= ~at_peak[:-1]
    previous_peak = np.concatenate(([0], last_peak[:-1]))
    durations = (ts_ns - ts_ns[previous_peak])[in_spell]
    longest = float(durations.max()) / NANOS_PER_SECOND if durations.size else 0.0
    return float(drawdown(equity).max()), longest


def calmar_ratio(annual_return: float, max_dd: float) -> float:
    """Annualised return per unit of maximum drawdown."""
    return annual_return / max_dd if max_dd > 0 else math.nan


def turnover(fill_notional: np.ndarray, equity: np.ndarray) -> float:
    """Traded notional over mean equity."""
    mean_equity = float(np.mean(equity))
    return float(np.sum(np.abs(fill_notional))) / mean_equity if mean_equity > 0 else math.nan


def hit_rate(closing_pnl: np.ndarray) -> float:
    """Share of closing fills with a positive realised PnL (NaN when nothing was closed)."""
    closing_pnl = np.asarray(closing_pnl, dtype=float)
    return float(np.mean(closing_pnl > 0.0)) if closing_pnl.size else math.nan


def exposure_time(ts_ns: np.ndarray, gross_exposure: np.ndarray) -> float:
    """Share of the span whose starting sample had an open position (gross exposure > 0)."""
    ts_ns = np.asarray(ts_ns, dtype=np.int64)
    gross_exposure = np.asarray(gross_exposure, dtype=float)
    intervals = np.diff(ts_ns).astype(float)
    total = float(intervals.sum())
    if total <= 0:
        return math.nan
    return float(intervals[gross_exposure[:-1] > 0.0].sum()) / total


def compute_metrics(
    ts_ns: Sequence[int] | np.ndarray,
    equity: Sequence[float] | np.ndarray,
    gross_exposure: Sequence[float] | np.ndarray,
    *,
    fill_notional: Sequence[float] | np.ndarray,
    fill_fees: Sequence[float] | np.ndarray,
    closing_pnl: Sequence[float] | np.ndarray,
    funding_pnl: float,
) -> Metrics:
    """All metrics of one run: the equity samples with their times, and its fills.

    ``closing_pnl`` holds the realised PnL of each fill that reduced or closed a position;
    ``funding_pnl`` the funding received (> 0) or paid over the run. Samples whose equity
    is not a number (a position without any mark) are left out.
    """
    ts = np.asarray(ts_ns, dtype=np.int64)
    values = np.asarray(equity, dtype=float)
    gross = np.asarray(gross_exposure, dtype=float)
    finite = np.isfinite(values)
    ts, values, gross = ts[finite], values[finite], gross[finite]
    if values.size == 0:
        raise ValueError("metrics need at least one equity sample with a finite value")
    notional = np.abs(np.asarray(fill_notional, dtype=float))
    returns = period_returns(values)
    per_year = periods_per_year(ts)
    annual = annualised_return(values, ts)
    deepest, longest = max_drawdown(values, ts)
    return Metrics(
        start_equity=float(values[0]),
        end_equity=float(values[-1]),
        total_return=total_return(values),
        annualised_return=annual,
        annualised_volatility=annualised_volatility(returns, per_year),
        sharpe=sharpe_ratio(returns, per_year),
        sortino=sortino_ratio(returns, per_year),
        max_drawdown=deepest,
        max_drawdown_duration_s=longest,
        calmar=calmar_ratio(annual, deepest),
        turnover=turnover(notional, values),
        traded_notional=float(notional.sum()),
        fees=float(np.sum(np.asarray(fill_fees, dtype=float))),
        funding_pnl=float(funding_pnl),
        trades=int(notional.size),
        closing_trades=int(np.asarray(closing_pnl).size),
        hit_rate=hit_rate(np.asarray(closing_pnl, dtype=float)),
        exposure_time=exposure_time(ts, gross),
        span_s=(int(ts[-1]) - int(ts[0])) / NANOS_PER_SECOND,
        sampling_interval_s=sampling_interval_s(ts),
    )
