"""volbot command line: ``python main.py --mode {paper,live,backtest,train,import,study} [options]``.

Bad arguments and bad configuration print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import NoReturn

MODES = ("paper", "live", "backtest", "train", "import", "study")
EXAMPLES = """examples:
  main.py --mode paper                                   paper trading on the embedded synthetic market
  main.py --mode paper --duration 60 --speed 600         one minute of wall time, ten market hours
  main.py --mode paper --feed binance --config my.toml   paper trading on Binance's live public data
  main.py --mode backtest --synthetic-seed 7 --days 2    replay a seeded synthetic market, write a report
  main.py --mode backtest --events var/journal/RUN.jsonl replay a recorded or imported journal
  main.py --mode train --model ppo --timesteps 5000      train PPO; then --policy ppo:var/models/ppo.zip
  main.py --mode train --model surrogate                 train the Heston surrogate pricer (then inverse)
  main.py --mode train --model surrogate-fast            the smallest surrogate meeting the accuracy targets
  main.py --mode train --model world                     train the volatility world model (VAE + GRU)
  main.py --mode train --model regime                    train the crash-regime detector (SSM vs GRU)
  main.py --mode import --source tardis-trades:t.csv --journal out.jsonl
  main.py --mode live --confirm-live --feed binance      real orders (needs live.enabled and env keys)
"""
LIVE_OPT_IN = (
    "--mode live sends real orders: it needs --confirm-live, VOLBOT_LIVE__ENABLED=true and the keys in "
    "VOLBOT_LIVE__API_KEY and VOLBOT_LIVE__API_SECRET"
)


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


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return value


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="main.py",
        description=__doc__.splitlines()[0],
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--mode", required=True, choices=MODES, help="what to run")
    parser.add_argument("--config", type=Path, help="TOML settings file (default: config/default.toml)")
    parser.add_argument("--db", help="database URL (default: SQLite under var/)")
    parser.add_argument(
        "--journal", type=Path, help="event journal file (default: var/journal/<run id>.jsonl)"
    )
    parser.add_argument(
        "--confirm-live", action="store_true", help="opt in to sending real orders (live mode)"
    )
    parser.add_argument("--duration", type=positive_float, help="stop after this many wall-clock seconds")
    parser.add_argument("--speed", type=positive_float, default=1.0, help="market time per wall time (paper)")
    parser.add_argument("--seed", type=int, help="random seed for the synthetic market and the venue")
    parser.add_argument("--policy", help="policy spec NAME[:PATH] (default from config)")
    parser.add_argument(
        "--feed", choices=("synthetic", "binance", "binance+deribit"), help="market data of a paper run"
    )
    parser.add_argument("--events", type=Path, help="journal to replay (backtest)")
    parser.add_argument("--synthetic-seed", type=int, help="backtest the synthetic market with this seed")
    parser.add_argument("--days", type=positive_float, help="simulated days of a synthetic backtest")
    parser.add_argument("--report", type=Path, help="report folder (default: var/reports/<name>)")
    parser.add_argument(
        "--model",
        default="ppo",
        choices=("ppo", "surrogate", "surrogate-fast", "inverse", "world", "world-model", "regime"),
        help="model to train (train mode)",
    )
    parser.add_argument("--timesteps", type=positive_int, help="agent decisions to train on (train mode)")
    parser.add_argument(
        "--source",
        action="append",
        default=[],
        help="import source KIND:PATH[:VENUE:SYMBOL], repeatable (import mode; writes --journal)",
    )
    parser.add_argument("--strict", action="store_true", help="stop at the first malformed row (import mode)")
    parser.add_argument("--what", default="heston", choices=("heston",), help="study to run (study mode)")
    parser.add_argument("--out", type=Path, help="output folder (study mode) or model path (train mode)")
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
    if args.feed:
        overrides.setdefault("run", {})["feed"] = args.feed
    if args.log_level:
        overrides.setdefault("logging", {})["level"] = args.log_level
    return overrides


def run_paper(args: argparse.Namespace, live: bool = False) -> int:
    from adapters.sources import SourceError
    from bot.app import PaperOptions, PaperSession
    from config.settings import ConfigError, load_settings

    try:
        settings = load_settings(args.config, overrides=settings_overrides(args))
        if live and not settings.live.enabled:
            fail(LIVE_OPT_IN)
        options = PaperOptions(
            duration_s=args.duration, speed=args.speed, journal_path=args.journal, live=live
        )
        session = PaperSession(settings, options)
        summary = asyncio.run(session.run())
    except (ConfigError, SourceError) as exc:
        fail(str(exc))
    for line in summary.lines():
        print(line)
    return 0


def run_backtest(args: argparse.Namespace) -> int:
    from backtest.engine import BacktestError, backtest_main
    from config.settings import ConfigError

    try:
        return backtest_main(args, settings_overrides(args))
    except (BacktestError, ConfigError) as exc:
        fail(str(exc))


def run_train(args: argparse.Namespace) -> int:
    from backtest.train import TrainConfig, train_main
    from config.settings import ConfigError, load_settings

    if args.model in ("surrogate", "surrogate-fast"):
        from models.surrogate import surrogate_main

        return surrogate_main(args.out or Path("var/models") / args.model, args.seed or 0, args.model)
    if args.model == "inverse":
        from models.inverse import InverseConfig, inverse_main

        inverse_defaults = InverseConfig()
        out = args.out or Path("var/models/inverse")
        return inverse_main(out, inverse_defaults.n_train, inverse_defaults.epochs, args.seed or 0)
    if args.model in ("world", "world-model"):
        from models.world_model import world_model_main

        return world_model_main(args.out or Path("var/models/world_model"), args.seed or 0)
    if args.model == "regime":
        from models.regime import regime_main

        return regime_main(args.out or Path("var/models/regime"), args.seed or 0)
    try:
        settings = load_settings(args.config, overrides=settings_overrides(args))
        return train_main(
            settings,
            timesteps=args.timesteps or TrainConfig.model_fields["timesteps"].default,
            out=args.out or TrainConfig.model_fields["out"].default,
            model=args.model,
            events=args.events,
            synthetic_seed=args.synthetic_seed,
        )
    except (ConfigError, ValueError) as exc:
        fail(" ".join(str(exc).split()))


def run_import(args: argparse.Namespace) -> int:
    from adapters.importer import ImportFailed, import_main

    if not args.source or args.journal is None:
        fail("--mode import needs at least one --source KIND:PATH[:VENUE:SYMBOL] and --journal OUT")
    try:
        import_main(args.source, args.journal, strict=args.strict)
    except ImportFailed as exc:
        fail(str(exc))
    return 0


def run_study(args: argparse.Namespace) -> int:
    from models.studies import run_studies

    out = args.out or Path("var/studies/heston")
    report = run_studies(out, seed=args.seed if args.seed is not None else 0)
    print(f"study written to {report}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.mode == "live":
        if not args.confirm_live:
            fail(LIVE_OPT_IN)
        return run_paper(args, live=True)
    if args.mode == "study":
        return run_study(args)
    if args.mode == "backtest":
        return run_backtest(args)
    if args.mode == "train":
        return run_train(args)
    if args.mode == "import":
        return run_import(args)
    return run_paper(args)


if __name__ == "__main__":
    sys.exit(main())
