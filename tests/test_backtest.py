"""The backtester: same engine as every mode, benchmark on the same events, recorded books, bad inputs."""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest

from adapters.synthetic import SyntheticMarket
from backtest.engine import (
    BENCHMARK_EXPOSURE,
    BacktestError,
    BacktestResult,
    backtest_main,
    benchmark_instrument,
    run_backtest,
)
from bot.app import build_engine
from bot.events import Event
from bot.instruments import InstrumentRegistry
from bot.journal import JournalWriter
from config.settings import Settings, load_settings

SEED = 3
DAYS = 0.02  # 28.8 minutes of event time: the trend policy trades within minutes
NANOS_PER_DAY = 86_400 * 1_000_000_000


def settings_for(seed: int = SEED, **sections: dict[str, object]) -> Settings:
    overrides: dict[str, dict[str, object]] = {
        "run": {"seed": seed},
        "market": {"seed": seed},
        "venue": {"seed": seed},
    }
    for section, values in sections.items():
        overrides.setdefault(section, {}).update(values)
    return load_settings(overrides=overrides)


def synthetic_events(settings: Settings, days: float) -> Iterator[Event]:
    """The stream a synthetic backtest replays: the market's own, led by its CONNECTED status."""
    end = settings.market.start_ns + round(days * NANOS_PER_DAY)
    return SyntheticMarket(settings.market.model_copy(update={"until_ns": end})).events()


@pytest.fixture(scope="module")
def result() -> BacktestResult:
    return run_backtest(settings_for(), synthetic_seed=SEED, days=DAYS, progress=False)


def test_backtest_is_the_engine_fed_directly(result: BacktestResult) -> None:
    """No component of its own: build_engine fed the same events gives the same fingerprints."""
    settings = settings_for()
    engine = build_engine(settings, SyntheticMarket(settings.market).instruments())
    for event in synthetic_events(settings, DAYS):
        engine.feed(event)
    assert result.fills, "the trend policy should trade within half an hour"
    assert engine.fingerprint.fill_count == len(result.fills)
    assert (result.fills_sha256, result.obs_sha256) == (
        engine.fingerprint.fills_sha256,
        engine.fingerprint.obs_sha256,
    )
    assert result.equity[-1].equity == engine.portfolio.equity()


def test_equity_curve_is_every_snapshot_tick_plus_the_closing_one(result: BacktestResult) -> None:
    interval_ns = int(settings_for().run.snapshot_interval_s * 1e9)
    ticks = [point.ts_ns for point in result.equity[:-1]]
    assert all(ts % interval_ns == 0 for ts in ticks)
    assert all(b - a == interval_ns for a, b in pairwise(ticks))
    assert len(ticks) == (result.end_ns - result.start_ns) // interval_ns
    assert result.equity[-1].ts_ns == result.end_ns
    assert result.events > 10_000
    assert result.start_ns == settings_for().market.start_ns


def test_recorded_fills_carry_the_portfolio_books(result: BacktestResult) -> None:
    final = result.equity[-1]
    assert math.fsum(fill.realized_pnl for fill in result.fills) == pytest.approx(
        final.realized_pnl, abs=1e-6
    )
    assert math.fsum(fill.fee for fill in result.fills) == pytest.approx(final.fees, rel=1e-12)
    assert [fill.seq for fill in result.fills] == list(range(1, len(result.fills) + 1))
    position: dict[str, float] = {}
    for fill in result.fills:
        before = position.get(fill.instrument, 0.0)
        signed = fill.quantity if fill.side == "BUY" else -fill.quantity
        assert fill.position_after == pytest.approx(before + signed, abs=1e-9)
        assert fill.closing == (before != 0.0 and (before > 0) != (signed > 0))
        if not fill.closing:
            assert fill.realized_pnl == 0.0
        position[fill.instrument] = fill.position_after
    filled = {order.client_order_id for order in result.strategy.orders if order.status == "FILLED"}
    assert filled == {fill.client_order_id for fill in result.fills}
    assert result.metrics.trades == len(result.fills)
    assert result.metrics.closing_trades == sum(fill.closing for fill in result.fills)


def test_exposures_are_recorded_per_traded_instrument(result: BacktestResult) -> None:
    instruments = result.strategy.instruments
    assert instruments == tuple(instrument.instrument for instrument in settings_for().trend.instruments)
    for point in result.equity:
        assert len(point.exposures) == len(instruments)
        assert sum(abs(exposure) for exposure in point.exposures) == pytest.approx(
            point.gross_exposure, abs=1e-9
        )
    assert any(point.gross_exposure > 0 for point in result.equity)


def test_benchmark_buys_and_holds_the_first_assets_spot(result: BacktestResult) -> None:
    assert result.benchmark_targets == {"SYNTH:BTCUSDT": BENCHMARK_EXPOSURE}
    benchmark = result.benchmark
    assert benchmark.policy == "hold"
    assert len(benchmark.fills) == 1 and benchmark.fills[0].side == "BUY"
    assert [point.ts_ns for point in benchmark.equity] == [point.ts_ns for point in result.equity]
    held = [point.exposures[0] for point in benchmark.equity if point.gross_exposure > 0]
    assert held and all(abs(exposure - BENCHMARK_EXPOSURE) < 0.01 for exposure in held)
    assert result.benchmark_metrics.trades == 1


def test_benchmark_instrument_prefers_the_spot_of_the_same_base() -> None:
    registry = InstrumentRegistry(SyntheticMarket().instruments())
    assert benchmark_instrument(registry, "SYNTH:DOGEUSDT-PERP") == "SYNTH:DOGEUSDT"
    assert benchmark_instrument(registry, "SYNTH:BTCUSDT") == "SYNTH:BTCUSDT"
    perps_only = InstrumentRegistry([spec for spec in registry if spec.is_perp])
    assert benchmark_instrument(perps_only, "SYNTH:BTCUSDT-PERP") == "SYNTH:BTCUSDT-PERP"


def test_regime_labels_are_recorded() -> None:
    settings = settings_for(market={"switch_times": [(300.0, 1)]})
    result = run_backtest(settings, synthetic_seed=SEED, days=0.01, policy="hold", progress=False)
    start = settings.market.start_ns
    assert [(mark.ts_ns - start, mark.name) for mark in result.regimes] == [
        (0, "bull"),
        (300 * 10**9, "crash"),
    ]


def write_journal(path: Path, settings: Settings, days: float, seed: int) -> None:
    journal = JournalWriter(path, "paper-test", meta={"mode": "paper", "seed": seed, "feed": "synthetic"})
    for event in synthetic_events(settings, days):
        journal.write(event)
    journal.close()


def test_journal_replay_equals_the_synthetic_run_of_the_same_events(tmp_path: Path) -> None:
    settings = settings_for()
    path = tmp_path / "run.jsonl"
    write_journal(path, settings, 0.01, SEED)
    replayed = run_backtest(settings, events_path=path, progress=False)
    generated = run_backtest(settings, synthetic_seed=SEED, days=0.01, progress=False)
    assert replayed.fills
    assert (replayed.fills_sha256, replayed.obs_sha256) == (generated.fills_sha256, generated.obs_sha256)
    assert replayed.events == generated.events
    assert replayed.source["journal_run_id"] == "paper-test"
    assert replayed.name == "run-trend"


def cli_args(**given: object) -> argparse.Namespace:
    values: dict[str, object] = {
        "config": None,
        "events": None,
        "synthetic_seed": None,
        "days": None,
        "report": None,
        "seed": None,
    }
    values.update(given)
    return argparse.Namespace(**values)


def test_cli_replays_a_journal_with_its_seed_and_writes_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    journal_seed = 5
    path = tmp_path / "j.jsonl"
    write_journal(path, settings_for(seed=journal_seed), 0.01, journal_seed)
    overrides = {"logging": {"dir": str(tmp_path / "logs")}}
    report = tmp_path / "report"
    assert backtest_main(cli_args(events=path, report=report), overrides) == 0
    assert {p.name for p in report.iterdir()} == {"metrics.json", "trades.csv", "equity.csv", "report.html"}
    printed = capsys.readouterr().out
    assert "Sharpe" in printed and "report.html" in printed
    # without --seed the venue drew from the journal's seed: its slippage, hence its fills, match
    same_seed = run_backtest(settings_for(seed=journal_seed), events_path=path, progress=False)
    other_seed = run_backtest(settings_for(seed=0), events_path=path, progress=False)
    assert same_seed.fills
    assert f'"fills_sha256": "{same_seed.fills_sha256}"' in (report / "metrics.json").read_text()
    assert other_seed.fills_sha256 != same_seed.fills_sha256


def test_cli_default_report_folder_is_named_after_source_and_policy(tmp_path: Path) -> None:
    overrides = {
        "logging": {"dir": str(tmp_path / "logs")},
        "run": {"var_dir": str(tmp_path / "var"), "policy": "hold"},
    }
    assert backtest_main(cli_args(synthetic_seed=1, days=0.002), overrides) == 0
    assert (tmp_path / "var" / "reports" / "synthetic-s1-0.002d-hold" / "metrics.json").is_file()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "either a journal"),
        ({"events_path": "x.jsonl", "synthetic_seed": 1, "days": 1.0}, "either a journal"),
        ({"synthetic_seed": 1}, "positive --days"),
        ({"synthetic_seed": 1, "days": 0.0}, "positive --days"),
        ({"synthetic_seed": -1, "days": 1.0}, "non-negative"),
        ({"events_path": "missing.jsonl"}, "journal not found"),
        ({"synthetic_seed": 1, "days": 0.001, "policy": "nosuchpolicy"}, "unknown policy"),
    ],
)
def test_bad_inputs_are_one_line_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(BacktestError, match=message) as raised:
        run_backtest(settings_for(), progress=False, **kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(raised.value)


def test_files_that_are_not_journals_are_refused(tmp_path: Path) -> None:
    not_json = tmp_path / "notes.jsonl"
    not_json.write_text("hello\n")
    other_json = tmp_path / "other.jsonl"
    other_json.write_text('{"journal": "other"}\n')
    days_on_journal = tmp_path / "days.jsonl"
    write_journal(days_on_journal, settings_for(), 0.0005, SEED)
    header_only = tmp_path / "empty.jsonl"
    JournalWriter(header_only, "empty", meta={"feed": "synthetic"}).close()
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text(days_on_journal.read_text().splitlines()[0] + '\n{"type": "Nope"}\n')
    cases = [
        (not_json, "not a volbot journal"),
        (other_json, "not a volbot journal"),
        (header_only, "no events"),
        (bad_line, "not a journal event"),
    ]
    for path, message in cases:
        with pytest.raises(BacktestError, match=message):
            run_backtest(settings_for(), events_path=path, progress=False)
    with pytest.raises(BacktestError, match="--days applies to synthetic"):
        run_backtest(settings_for(), events_path=days_on_journal, days=1.0, progress=False)


def test_a_journal_of_another_feed_needs_its_instruments(tmp_path: Path) -> None:
    settings = settings_for()
    path = tmp_path / "recorded.jsonl"
    journal = JournalWriter(path, "live", meta={"mode": "live", "seed": SEED, "feed": "binance"})
    for event in synthetic_events(settings, 0.005):
        journal.write(event)
    journal.close()
    with pytest.raises(BacktestError, match="instrument specs of feed 'binance'"):
        run_backtest(settings, events_path=path, progress=False)
    given = run_backtest(
        settings, events_path=path, instruments=SyntheticMarket().instruments(), policy="hold", progress=False
    )
    assert given.events == sum(1 for _ in synthetic_events(settings, 0.005))
    assert given.source["feed"] == "binance"
