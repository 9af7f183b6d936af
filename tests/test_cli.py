"""main.py's import and train modes: wired to their engines, bad arguments one line and exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bot.events import Quote
from bot.journal import read_events

ROOT = Path(__file__).resolve().parent.parent


def run_main(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


def test_import_mode_writes_a_journal_the_backtester_reads(shared_data: Path, tmp_path: Path) -> None:
    source = shared_data / "reference_fixtures" / "tardis" / "binance-futures_book_snapshot_5_BTCUSDT.csv"
    journal = tmp_path / "book.jsonl"
    args = ("--mode", "import", "--source", f"tardis-book:{source}", "--journal", str(journal))
    result = run_main(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Quote 8" in result.stdout
    events = list(read_events(journal))
    assert len(events) == 8 and all(isinstance(event, Quote) for event in events)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mode", "import", "--journal", "out.jsonl"], "needs at least one --source"),
        (["--mode", "import", "--source", "nosuchkind:x.csv", "--journal", "out.jsonl"], "nosuchkind"),
        (["--mode", "train", "--timesteps", "0"], "--timesteps"),
        (["--mode", "train", "--model", "sac"], "--model"),
        (
            ["--mode", "train", "--timesteps", "8", "--events", "j.jsonl", "--synthetic-seed", "1"],
            "either --events PATH or --synthetic-seed N",
        ),
    ],
)
def test_bad_import_and_train_arguments_are_one_line_and_exit_2(
    args: list[str], message: str, tmp_path: Path
) -> None:
    result = run_main(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--mode", "live"], {}, "needs --confirm-live"),
        (["--mode", "live", "--confirm-live"], {}, "VOLBOT_LIVE__ENABLED=true"),
        (
            ["--mode", "live", "--confirm-live"],
            {"VOLBOT_LIVE__ENABLED": "true"},
            "live: enabled needs VOLBOT_LIVE__API_KEY and VOLBOT_LIVE__API_SECRET",
        ),
        (
            ["--mode", "live", "--confirm-live"],
            {
                "VOLBOT_LIVE__ENABLED": "true",
                "VOLBOT_LIVE__API_KEY": "k" * 24,
                "VOLBOT_LIVE__API_SECRET": "s" * 24,
            },
            "live mode trades a real market; use --feed binance",
        ),
    ],
)
def test_live_mode_needs_the_flag_the_setting_the_keys_and_a_real_feed(
    args: list[str], env: dict[str, str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [name for name in os.environ if name.startswith("VOLBOT_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("VOLBOT_LOGGING__DIR", str(tmp_path / "logs"))
    monkeypatch.setenv("VOLBOT_STORE__URL", f"sqlite:///{tmp_path / 'volbot.db'}")
    result = run_main(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "k" * 24 not in result.stderr + result.stdout and "s" * 24 not in result.stderr + result.stdout
