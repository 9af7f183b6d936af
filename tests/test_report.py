"""Backtest reports: byte-identical metrics.json, CSVs that match the run, an HTML page that renders."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from rich.console import Console

from backtest.engine import BacktestResult, RegimeMark, run_backtest
from backtest.report import METRIC_ROWS, metrics_table, regime_time_share, write_report
from config.settings import Settings, load_settings

SEED = 4
DAYS = 0.02
SECOND = 1_000_000_000


def crash_settings() -> Settings:
    """A crash after ten minutes, so the report has two regimes to shade."""
    return load_settings(
        overrides={
            "run": {"seed": SEED},
            "venue": {"seed": SEED},
            "market": {"seed": SEED, "switch_times": [(600.0, 1)]},
        }
    )


def backtest() -> BacktestResult:
    return run_backtest(crash_settings(), synthetic_seed=SEED, days=DAYS, progress=False)


@pytest.fixture(scope="module")
def result() -> BacktestResult:
    return backtest()


@pytest.fixture(scope="module")
def report(result: BacktestResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_report(result, tmp_path_factory.mktemp("report"))


def test_the_same_backtest_twice_gives_identical_files(report: Path, tmp_path: Path) -> None:
    again = write_report(backtest(), tmp_path / "again")
    for name in ("metrics.json", "trades.csv", "equity.csv"):
        assert (again / name).read_bytes() == (report / name).read_bytes(), name


def test_metrics_json_is_sorted_finite_and_complete(result: BacktestResult, report: Path) -> None:
    text = (report / "metrics.json").read_text()

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    document = json.loads(text, parse_constant=refuse)
    assert text == json.dumps(document, sort_keys=True, indent=2) + "\n"
    assert document["fills_sha256"] == result.fills_sha256
    assert document["obs_sha256"] == result.obs_sha256
    assert document["events"] == result.events
    assert document["span"]["start_ns"] == result.start_ns and document["span"]["end_ns"] == result.end_ns
    assert document["source"] == {
        "kind": "synthetic",
        "seed": SEED,
        "days": DAYS,
        "start_ns": result.start_ns,
    }
    assert document["settings"]["policy"] == "trend" and document["settings"]["venue_seed"] == SEED
    for side, run in (("strategy", result.strategy), ("benchmark", result.benchmark)):
        expected = {
            k: (None if isinstance(v, float) and math.isnan(v) else v)
            for k, v in run.metrics.to_dict().items()
        }
        assert document[side]["metrics"] == expected
        assert document[side]["fills_sha256"] == run.fills_sha256
    assert document["benchmark"]["targets"] == result.benchmark_targets
    assert set(document["regime_time_share"]) == {"bull", "crash"}


def test_engine_settings_digest_ignores_where_files_go() -> None:
    moved = load_settings(
        overrides={
            "run": {"seed": SEED, "var_dir": "/elsewhere"},
            "venue": {"seed": SEED},
            "market": {"seed": SEED, "switch_times": [(600.0, 1)]},
            "store": {"url": "sqlite:///elsewhere.db"},
            "logging": {"dir": "/elsewhere/logs"},
        }
    )
    changed = crash_settings().model_copy(
        update={"venue": crash_settings().venue.model_copy(update={"seed": 9})}
    )
    results = [run_backtest(s, synthetic_seed=SEED, days=0.001, progress=False) for s in (moved, changed)]
    digests = [r.settings["engine_settings_sha256"] for r in results]
    reference = run_backtest(crash_settings(), synthetic_seed=SEED, days=0.001, progress=False)
    assert digests[0] == reference.settings["engine_settings_sha256"]
    assert digests[1] != reference.settings["engine_settings_sha256"]


def test_csv_files_hold_every_fill_and_snapshot(result: BacktestResult, report: Path) -> None:
    trades = (report / "trades.csv").read_text().splitlines()
    assert trades[0].split(",")[:3] == ["seq", "ts_ns", "time"]
    assert len(trades) == 1 + len(result.fills)
    first = dict(zip(trades[0].split(","), trades[1].split(","), strict=True))
    assert float(first["price"]) == result.fills[0].price  # written exactly
    equity = [line.split(",") for line in (report / "equity.csv").read_text().splitlines()]
    header, rows = equity[0], equity[1:]
    assert len(rows) == len(result.equity)
    assert [f"exposure {i}" for i in result.strategy.instruments] == [
        c for c in header if c.startswith("exposure")
    ]
    column = {name: index for index, name in enumerate(header)}
    assert [float(row[column["benchmark_equity"]]) for row in rows] == [
        p.equity for p in result.benchmark.equity
    ]
    regimes = [row[column["regime"]] for row in rows]
    assert regimes[0] == "bull" and regimes[-1] == "crash"
    assert regimes == sorted(regimes)  # bull until the switch, crash after


def test_html_is_self_contained_with_three_png_plots(report: Path) -> None:
    page = (report / "report.html").read_text()
    assert "<style>" in page
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page), "no external resources"
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 3
    for data in images:
        pixels = matplotlib.image.imread(io.BytesIO(base64.b64decode(data)), format="png")
        assert pixels.shape[0] > 200 and pixels.shape[1] > 800
        assert pixels[..., :3].std() > 0.05  # not a blank canvas


def test_report_renders_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    screenshot = tmp_path / "report.png"
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={screenshot}",
            "--window-size=1280,2000",
            (report / "report.html").resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    rgb = matplotlib.image.imread(screenshot)[..., :3]
    assert rgb.shape[:2] == (2000, 1280)
    # The text alone darkens ~2 % of the page and has no colour; the plots bring lines and shading.
    assert (rgb.min(axis=2) < 0.95).mean() > 0.10
    assert ((rgb.max(axis=2) - rgb.min(axis=2)) > 0.05).mean() > 0.02


def test_console_table_lists_every_metric_for_both(result: BacktestResult) -> None:
    console = Console(record=True, width=160)
    console.print(metrics_table(result))
    text = console.export_text()
    for row in METRIC_ROWS:
        assert row.label in text
    assert "buy & hold SYNTH:BTCUSDT 0.99" in text
    assert f"{result.metrics.total_return:+.2%}" in text
    assert f"{result.benchmark_metrics.total_return:+.2%}" in text


def test_regime_time_share_by_hand() -> None:
    marks = [
        RegimeMark(0, 0, "bull"),
        RegimeMark(60 * SECOND, 1, "crash"),
        RegimeMark(120 * SECOND, 0, "bull"),
    ]
    assert regime_time_share(marks, 240 * SECOND) == {"bull": 0.75, "crash": 0.25}
    assert regime_time_share([], 240 * SECOND) == {}
    np.testing.assert_allclose(sum(regime_time_share(marks, 10**12).values()), 1.0)
