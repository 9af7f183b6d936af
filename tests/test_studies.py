"""The notebook's claims, checked as statistics, and the study report written to disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.studies import (
    feller_study,
    heston_vs_black_scholes,
    regime_example,
    rho_skewness,
    run_studies,
    vol_of_vol_clustering,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_negative_rho_skews_left_and_positive_rho_right() -> None:
    study = rho_skewness(rhos=(-0.9, 0.0, 0.9), n_paths=6_000, seed=1)
    low, middle, high = study.skewness
    se = study.skewness_se
    assert low < -3 * se[0]
    assert high > 3 * se[2]
    assert low + 3 * np.hypot(se[0], se[1]) < middle < high - 3 * np.hypot(se[1], se[2])


def test_vol_of_vol_drives_volatility_clustering() -> None:
    study = vol_of_vol_clustering(sigmas=(0.1, 0.6), years=2.0, n_paths=150, max_lag=10, seed=2)
    calm, wild = study.acf_abs[:, 0]
    assert calm < wild - 10 * study.acf_se
    assert (study.acf_abs[1] > 3 * study.acf_se).all()  # persistent, not only at lag 1
    assert study.acf_squared[1, 0] > study.acf_squared[0, 0] + 10 * study.acf_se


def test_heston_has_fatter_tails_than_black_scholes() -> None:
    study = heston_vs_black_scholes(n_paths=6_000, seed=3)
    (heston, bs), (heston_se, bs_se) = study.terminal_kurtosis, study.terminal_kurtosis_se
    assert heston - bs > 3 * np.hypot(heston_se, bs_se)
    assert abs(bs) < 3 * bs_se  # log returns are exactly normal under Black–Scholes
    (daily_heston, daily_bs), (daily_heston_se, daily_bs_se) = study.daily_kurtosis, study.daily_kurtosis_se
    assert daily_heston - daily_bs > 3 * np.hypot(daily_heston_se, daily_bs_se)


def test_variance_reaches_zero_only_when_feller_fails() -> None:
    holds, fails, fails_badly = feller_study(n_paths=400, years=1.0, seed=4)
    assert holds.feller and not fails.feller and not fails_badly.feller
    assert holds.paths_touching_zero == 0.0
    assert fails.paths_touching_zero > 0.5
    assert fails_badly.steps_at_zero > fails.steps_at_zero > holds.steps_at_zero


def test_regime_example_labels_the_crash_exactly() -> None:
    study = regime_example(years=2.0, n_paths=50, seed=5)
    labels = study.fixed.labels[:, 0]
    switch_row = round(study.fixed_switch_time * 252)
    assert (labels[:switch_row] == 0).all() and (labels[switch_row:] == 1).all()
    assert study.realised_vol["crash"] > study.realised_vol["bull"]
    assert sum(study.time_share.values()) == pytest.approx(1.0)


def test_run_studies_writes_plots_and_summary(tmp_path: Path) -> None:
    out_dir = tmp_path / "heston"
    summary = run_studies(out_dir, seed=0)
    assert summary == out_dir / "summary.md"
    for name in (
        "rho_skewness.png",
        "vol_of_vol_clustering.png",
        "heston_vs_black_scholes.png",
        "feller.png",
        "regimes.png",
    ):
        data = (out_dir / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
        assert name in summary.read_text(encoding="utf-8")
    text = summary.read_text(encoding="utf-8")
    for heading in ("skewness", "clustering", "Black–Scholes", "Feller", "Regime"):
        assert heading in text
    # One row per rho with a finite number in it.
    rho_rows = [line for line in text.splitlines() if line.startswith(("| -0.9 ", "| +0.9 "))]
    assert len(rho_rows) == 2
    assert all(np.isfinite(float(row.split("|")[2])) for row in rho_rows)
