"""Backtest metrics against figures computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from backtest.metrics import (
    SECONDS_PER_YEAR,
    annualised_return,
    annualised_volatility,
    calmar_ratio,
    compute_metrics,
    drawdown,
    exposure_time,
    hit_rate,
    max_drawdown,
    period_returns,
    periods_per_year,
    sampling_interval_s,
    sharpe_ratio,
    sortino_ratio,
    total_return,
    turnover,
)

MINUTE_NS = 60 * 1_000_000_000
DAY_NS = 86_400 * 1_000_000_000


def minutes(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64) * MINUTE_NS


def test_returns_and_total_return() -> None:
    equity = np.array([100.0, 110.0, 99.0])
    np.testing.assert_allclose(period_returns(equity), [0.1, -0.1])
    assert total_return(equity) == pytest.approx(-0.01)


def test_annualisation_follows_the_sampling_interval() -> None:
    assert sampling_interval_s(minutes(5)) == 60.0
    assert periods_per_year(minutes(5)) == pytest.approx(365 * 24 * 60)
    # a shorter final interval (the shutdown snapshot) does not change the median
    ts = np.array([0, MINUTE_NS, 2 * MINUTE_NS, 2 * MINUTE_NS + 10**9])
    assert sampling_interval_s(ts) == 60.0
    hourly = np.arange(4, dtype=np.int64) * 60 * MINUTE_NS
    assert periods_per_year(hourly) == pytest.approx(8760.0)


def test_annualised_return_is_geometric_over_the_span() -> None:
    # +10 % in half a year is 1.1² − 1 = 21 % a year
    half_year_ns = int(SECONDS_PER_YEAR / 2 * 1e9)
    assert annualised_return(np.array([100.0, 110.0]), np.array([0, half_year_ns])) == pytest.approx(0.21)
    assert annualised_return(np.array([100.0, 0.0]), np.array([0, DAY_NS])) == -1.0
    assert math.isnan(annualised_return(np.array([100.0]), np.array([0])))
    # a huge return over a second overflows to +inf rather than raising
    assert annualised_return(np.array([1.0, 1e6]), np.array([0, 10**9])) == math.inf


def test_volatility_sharpe_sortino_by_hand() -> None:
    returns = np.array([0.01, -0.02, 0.03, 0.0])
    per_year = 365.0
    mean = 0.005
    sample_var = sum((r - mean) ** 2 for r in returns) / 3  # = 0.000433…
    std = math.sqrt(sample_var)
    assert annualised_volatility(returns, per_year) == pytest.approx(std * math.sqrt(365))
    assert sharpe_ratio(returns, per_year) == pytest.approx(mean / std * math.sqrt(365))
    downside = math.sqrt((0.02**2) / 4)  # only -0.02 is a loss, averaged over all 4 periods
    assert sortino_ratio(returns, per_year) == pytest.approx(mean / downside * math.sqrt(365))


def test_ratios_without_risk_are_nan() -> None:
    flat = np.zeros(5)
    assert math.isnan(sharpe_ratio(flat, 365.0))
    assert math.isnan(sortino_ratio(np.array([0.01, 0.02]), 365.0))  # no losing period
    assert math.isnan(annualised_volatility(np.array([0.01]), 365.0))
    assert math.isnan(calmar_ratio(0.3, 0.0))
    assert calmar_ratio(0.3, 0.15) == pytest.approx(2.0)


def test_max_drawdown_depth_and_duration() -> None:
    equity = np.array([100.0, 110.0, 99.0, 105.0, 110.0, 120.0, 90.0])
    np.testing.assert_allclose(drawdown(equity), [0, 0, 0.1, 1 - 105 / 110, 0, 0, 0.25])
    depth, duration = max_drawdown(equity, minutes(7))
    assert depth == pytest.approx(0.25)
    # 110 at minute 1 is regained at minute 4 (3 minutes); the 120 → 90 spell is still open after 1 minute
    assert duration == 180.0


def test_drawdown_never_recovered_lasts_until_the_end() -> None:
    depth, duration = max_drawdown(np.array([100.0, 90.0, 95.0, 80.0]), minutes(4))
    assert depth == pytest.approx(0.2)
    assert duration == 180.0
    assert max_drawdown(np.array([1.0, 2.0, 3.0]), minutes(3)) == (0.0, 0.0)


def test_turnover_hit_rate_exposure_time() -> None:
    assert turnover(np.array([50.0, -30.0, 20.0]), np.array([90.0, 110.0])) == pytest.approx(1.0)
    assert hit_rate(np.array([10.0, -5.0, 0.0, 2.5])) == 0.5  # zero is not a hit
    assert math.isnan(hit_rate(np.array([])))
    # exposed during the first and third of three equal intervals; the last sample starts none
    ts = minutes(4)
    assert exposure_time(ts, np.array([0.5, 0.0, 1.2, 0.0])) == pytest.approx(2 / 3)
    # intervals are weighted by their length
    ts = np.array([0, 3 * MINUTE_NS, 4 * MINUTE_NS])
    assert exposure_time(ts, np.array([1.0, 0.0, 1.0])) == pytest.approx(0.75)


def test_compute_metrics_assembles_every_figure() -> None:
    ts = minutes(5)
    equity = np.array([100.0, 102.0, 101.0, float("nan"), 103.0])
    metrics = compute_metrics(
        ts,
        equity,
        [0.0, 1.0, 1.0, 1.0, 0.0],
        fill_notional=[100.0, -51.0],
        fill_fees=[0.1, 0.05],
        closing_pnl=[1.5],
        funding_pnl=-0.25,
    )
    # the NaN sample is dropped: samples at minutes 0, 1, 2, 4
    assert metrics.start_equity == 100.0 and metrics.end_equity == 103.0
    assert metrics.total_return == pytest.approx(0.03)
    assert metrics.span_s == 240.0
    assert metrics.sampling_interval_s == 60.0
    assert metrics.max_drawdown == pytest.approx(1 - 101 / 102)
    assert metrics.max_drawdown_duration_s == 180.0  # 102 at minute 1, regained at minute 4
    assert metrics.trades == 2 and metrics.closing_trades == 1 and metrics.hit_rate == 1.0
    assert metrics.traded_notional == 151.0
    assert metrics.turnover == pytest.approx(151.0 / np.mean([100.0, 102.0, 101.0, 103.0]))
    assert metrics.fees == pytest.approx(0.15)
    assert metrics.funding_pnl == -0.25
    assert metrics.exposure_time == pytest.approx(180 / 240)  # exposed from minute 1 to 4
    assert metrics.calmar == pytest.approx(metrics.annualised_return / metrics.max_drawdown)
    assert set(metrics.to_dict()) >= {"sharpe", "sortino", "annualised_volatility"}


def test_compute_metrics_needs_a_finite_sample() -> None:
    with pytest.raises(ValueError, match="finite"):
        compute_metrics(
            [0], [float("nan")], [0.0], fill_notional=[], fill_fees=[], closing_pnl=[], funding_pnl=0.0
        )
