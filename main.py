"""volbot command line: ``python main.py --mode {paper,study,...} [options]``.

Bad arguments and bad configuration print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import NoReturn

MODES = ("paper", "live", "backtest", "train", "import", "study")
NOT_YET = {
    "live": "live trading through ccxt",
    "backtest": "replay backtests",
    "train": "training",
    "import": "historical importers",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error as a single line and exits 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return value


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="main.py", description=__doc__.splitlines()[0])
    parser.add_argument("--mode", required=True, choices=MODES, help="what to run")
    parser.add_argument("--config", type=Path, help="TOML settings file (default: config/default.toml)")
    parser.add_argument("--db", help="database URL (default: SQLite under var/)")
    parser.add_argument(
        "--journal", type=Path, help="event journal file (default: var/journal/<run id>.jsonl)"
    )
    parser.add_argument("--duration", type=positive_float, help="stop after this many wall-clock seconds")
    parser.add_argument("--speed", type=positive_float, default=1.0, help="market time per wall time (paper)")
    parser.add_argument("--seed", type=int, help="random seed for the synthetic market and the venue")
    parser.add_argument("--policy", help="policy spec NAME[:PATH] (default from config)")
    parser.add_argument("--what", default="heston", choices=("heston",), help="study to run (study mode)")
    parser.add_argument("--out", type=Path, help="output folder (study mode)")
    parser.add_argument(
        "--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="console/file level"
    )
    return parser


def fail(message: str, code: int = 2) -> NoReturn:
    print(f"main.py: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def settings_overrides(args: argparse.Namespace) -> dict[str, dict[str, object]]:
    overrides: dict[str, dict[str, object]] = {}
    if args.db:
        overrides.setdefault("store", {})["url"] = args.db
    if args.seed is not None:
        overrides.setdefault("run", {})["seed"] = args.seed
        overrides.setdefault("market", {})["seed"] = args.seed
        overrides.setdefault("venue", {})["seed"] = args.seed
    if args.policy:
        overrides.setdefault("run", {})["policy"] = args.policy
    if args.log_level:
        overrides.setdefault("logging", {})["level"] = args.log_level
    return overrides


def run_paper(args: argparse.Namespace) -> int:
    from config.settings import ConfigError, load_settings

    from bot.app import PaperOptions, PaperSession

    try:
        settings = load_settings(args.config, overrides=settings_overrides(args))
    except ConfigError as exc:
        fail(str(exc))
    session = PaperSession(
        settings, PaperOptions(duration_s=args.duration, speed=args.speed, journal_path=args.journal)
    )
    summary = asyncio.run(session.run())
    for line in summary.lines():
        print(line)
    return 0


def run_study(args: argparse.Namespace) -> int:
    from models.studies import run_studies

    out = args.out or Path("var/studies/heston")
    report = run_studies(out, seed=args.seed if args.seed is not None else 0)
    print(f"study written to {report}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.mode in NOT_YET:
        fail(f"--mode {args.mode} ({NOT_YET[args.mode]}) is not available in this version yet")
    if args.mode == "study":
        return run_study(args)
    return run_paper(args)


if __name__ == "__main__":
    sys.exit(main())
