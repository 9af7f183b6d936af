"""Does the world-model hedger cut drawdowns more cheaply than a static hedge? Three policies, held-out seeds.

``python -m backtest.hedging --seeds 20 --days D``: on each seed (910000.., a pool no training or test
set of ``backtest/train.py`` uses) a synthetic regime-switching market with one forced crash is replayed
through the backtester for three policies on the same events:

- **unhedged**: the hedger's base book held constant (``hold``; long ``SYNTH:BTCUSDT`` by default);
- **hedger**: ``hedger:MODEL`` (``strategies/hedger.py``), the base book plus a perpetual short switched
  by the world model's latent energy;
- **static**: the base book plus a constant perpetual short at the hedger's average hedge ratio over all
  its runs, so both hedged policies buy the same amount of protection on average and differ only in when
  they hold it (a fixed 0.5 would compare different amounts of protection).

The world (:data:`WORLD`, written into the report): a coarse market so that replays are cheap (one step a
minute, few trades, a surface every 10 minutes, a decision an hour); the regimes of the default market,
with the crash's drift steeper than the default −30 %/year (``crash_drift``) so a crash loses money as
well as raising volatility; the IV surfaces, which are all the world model sees, do not depend on the
drift. Each seed's crash starts at a uniformly drawn fraction of the window and lasts an exponential time
(mean ``crash_mean_days``); it may outlast the window. The risk engine's drawdown kill switch and notional
caps are lifted for all three (as for the backtester's benchmark): a kill switch that flattens the
unhedged book at −10 % would be a crude hedge of its own. Market data counts as stale after
``stale_after_s`` (two steps) instead of 5 s: a quote a minute old is the freshest a one-minute market has.

Reported per policy: mean and median max drawdown, mean total return, mean Sharpe; on how many seeds the
hedger's drawdown is below the unhedged one; and each hedge's mean return loss against unhedged. Outputs:
``metrics.json`` and ``hedging.png`` in ``--report`` (default ``var/reports/hedging``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backtest.engine import BacktestResult, benchmark_settings, run_backtest
from backtest.train import quiet_logging, sharpe_or_zero
from bot.features.engine import FeatureModuleSpec
from config.settings import Settings, load_settings
from strategies.base import Observation, Policy, load_policy
from strategies.hedger import HedgerPolicy
from strategies.hold import HoldPolicy, HoldPolicyConfig

SEED_START = 910_000
DEFAULT_MODEL = Path("var/models/world_model")
DEFAULT_REPORT = Path("var/reports/hedging")
SECONDS_PER_DAY = 86_400.0
NANOS_PER_SECOND = 1_000_000_000
POLICIES = ("unhedged", "static", "hedger")
WORLD: dict[str, Any] = {
    "market": {"step_s": 60.0, "trade_rate_per_s": 0.01, "surface_interval_s": 600.0},
    "decision_interval_s": 3600.0,
    "snapshot_interval_s": 300.0,
    "crash_drift": -2.0,
    "crash_start_fraction": [0.15, 0.5],
    "crash_mean_days": 14.0,
    "stale_after_s": 120.0,
    "risk": "drawdown kill switch and notional caps lifted (backtest.engine.benchmark_settings)",
}


def crash_schedule(seed: int, days: float, world: Mapping[str, Any]) -> list[tuple[float, int]]:
    """``switch_times`` of one seed: into the crash regime (1) at a random time, back to bull (0) maybe."""
    rng = np.random.default_rng([seed, 6])
    low, high = world["crash_start_fraction"]
    start = float(rng.uniform(low, high)) * days * SECONDS_PER_DAY
    end = start + float(rng.exponential(world["crash_mean_days"] * SECONDS_PER_DAY))
    return [(start, 1), (end, 0)] if end < days * SECONDS_PER_DAY else [(start, 1)]


def evaluation_settings(
    settings: Settings, seed: int, days: float, model: Path, world: Mapping[str, Any] = WORLD
) -> Settings:
    """``settings`` in this seed's world, with the world feature module on ``model`` and lifted risk caps."""
    regimes = [
        r.model_copy(update={"mu": world["crash_drift"]}) if r.name == "crash" else r
        for r in settings.market.regimes
    ]
    market = settings.market.model_copy(
        update={**world["market"], "regimes": regimes, "switch_times": crash_schedule(seed, days, world)}
    )
    modules = [*settings.features.modules, FeatureModuleSpec(name="world", params={"model_path": str(model)})]
    updated = settings.model_copy(
        update={
            "market": type(market).model_validate(market.model_dump()),
            "features": settings.features.model_copy(update={"modules": modules}),
            "run": settings.run.model_copy(
                update={
                    "decision_interval_s": world["decision_interval_s"],
                    "snapshot_interval_s": world["snapshot_interval_s"],
                }
            ),
            "venue": settings.venue.model_copy(update={"seed": seed}),
        }
    )
    lifted = benchmark_settings(updated)
    risk = lifted.risk.model_copy(update={"stale_after_s": world["stale_after_s"]})
    return lifted.model_copy(update={"risk": risk})


class RecordedHedger(Policy):
    """The hedger, with the hedge ratio it chose at each decision kept for the report."""

    def __init__(self, inner: HedgerPolicy) -> None:
        self.inner = inner
        self.name = inner.name
        self.instruments = inner.instruments
        self.ratios: list[tuple[int, float]] = []

    def targets(self, observation: Observation) -> Mapping[str, float]:
        targets = self.inner.targets(observation)
        self.ratios.append((observation.ts_ns, self.inner.hedge_ratio))
        return targets


@dataclass(frozen=True)
class Task:
    """One replay: which seed and policy, in which world, and the static hedge's ratio when it is static."""

    settings: Settings
    seed: int
    days: float
    policy: str
    model: Path
    static_ratio: float = 0.0


def base_book(settings: Settings) -> dict[str, float]:
    """The hedger's base book, held by the unhedged and static policies too."""
    return dict(settings.hedger.base_targets)


def _policy(task: Task) -> Policy:
    """The policy of a task: the recorded hedger, or the base book (with the static hedge) held constant."""
    if task.policy == "hedger":
        policy = load_policy(f"hedger:{task.model}", settings=task.settings)
        assert isinstance(policy, HedgerPolicy)
        return RecordedHedger(policy)
    targets = base_book(task.settings)
    if task.policy == "static":
        config = task.settings.hedger
        covered = max(0.0, sum(targets.get(i, 0.0) for i in config.hedged_instruments))
        targets[config.hedge_instrument] = (
            targets.get(config.hedge_instrument, 0.0) - task.static_ratio * covered
        )
    return HoldPolicy(HoldPolicyConfig(targets=targets))


def run_task(task: Task) -> dict[str, Any]:
    """One backtest (in a worker: one torch thread, errors-only logs): metrics, equity and hedge ratios."""
    torch.set_num_threads(1)
    quiet_logging()
    policy = _policy(task)
    started = time.perf_counter()
    result = run_backtest(
        task.settings, synthetic_seed=task.seed, days=task.days, policy=policy, progress=False
    )
    return summarise(task, result, policy, time.perf_counter() - started)


def summarise(task: Task, result: BacktestResult, policy: Policy, seconds: float) -> dict[str, Any]:
    """What the report needs of one run (picklable)."""
    m = result.metrics
    ratios = policy.ratios if isinstance(policy, RecordedHedger) else []
    values = [r for _, r in ratios]
    return {
        "seed": task.seed,
        "policy": task.policy,
        "seconds": seconds,
        "events": result.events,
        "max_drawdown": m.max_drawdown,
        "total_return": m.total_return,
        "sharpe": sharpe_or_zero(m.sharpe),
        "fees": m.fees,
        "funding": m.funding_pnl,
        "trades": m.trades,
        "mean_hedge_ratio": statistics.fmean(values) if values else task.static_ratio,
        "hedge_switches": sum(a != b for a, b in itertools.pairwise(values)),
        "equity": [(p.ts_ns, p.equity) for p in result.equity],
        "ratios": ratios,
        "crash": [(mark.ts_ns, mark.regime) for mark in result.regimes],
    }


def evaluate(
    settings: Settings,
    seeds: Sequence[int],
    days: float,
    model: Path,
    workers: int = 2,
    world: Mapping[str, Any] = WORLD,
) -> dict[str, Any]:
    """Unhedged and hedger on every seed, then the static hedge at the hedger's average ratio."""
    per_seed = {seed: evaluation_settings(settings, seed, days, model, world) for seed in seeds}
    first = [Task(per_seed[s], s, days, p, model) for s in seeds for p in ("unhedged", "hedger")]
    runs = _map(run_task, first, workers)
    ratio = statistics.fmean(r["mean_hedge_ratio"] for r in runs if r["policy"] == "hedger")
    runs += _map(run_task, [Task(per_seed[s], s, days, "static", model, ratio) for s in seeds], workers)
    return {"runs": runs, "static_ratio": ratio}


def _map(function: Any, tasks: list[Task], workers: int) -> list[dict[str, Any]]:
    if workers > 1:
        with multiprocessing.get_context("forkserver").Pool(workers) as pool:
            return pool.map(function, tasks, chunksize=1)
    return [function(task) for task in tasks]


def headline(runs: list[dict[str, Any]], static_ratio: float) -> dict[str, Any]:
    """Per-policy statistics, the paired comparisons and whether the must-show holds."""
    by = {p: sorted((r for r in runs if r["policy"] == p), key=lambda r: r["seed"]) for p in POLICIES}
    table = {
        p: {
            "mean_max_drawdown": statistics.fmean(r["max_drawdown"] for r in rs),
            "median_max_drawdown": statistics.median(r["max_drawdown"] for r in rs),
            "mean_total_return": statistics.fmean(r["total_return"] for r in rs),
            "median_total_return": statistics.median(r["total_return"] for r in rs),
            "mean_sharpe": statistics.fmean(r["sharpe"] for r in rs),
            "mean_fees": statistics.fmean(r["fees"] for r in rs),
            "mean_hedge_ratio": statistics.fmean(r["mean_hedge_ratio"] for r in rs),
            "mean_hedge_switches": statistics.fmean(r["hedge_switches"] for r in rs),
        }
        for p, rs in by.items()
    }
    unhedged = by["unhedged"]
    loss = {
        p: statistics.fmean(
            u["total_return"] - r["total_return"] for u, r in zip(unhedged, by[p], strict=True)
        )
        for p in ("static", "hedger")
    }
    wins = sum(h["max_drawdown"] < u["max_drawdown"] for h, u in zip(by["hedger"], unhedged, strict=True))
    static_wins = sum(
        h["max_drawdown"] < s["max_drawdown"] for h, s in zip(by["hedger"], by["static"], strict=True)
    )
    lower_dd = table["hedger"]["mean_max_drawdown"] < table["unhedged"]["mean_max_drawdown"]
    return {
        "policies": table,
        "static_ratio": static_ratio,
        "return_loss_vs_unhedged": loss,
        "hedger_lower_drawdown_than_unhedged_seeds": wins,
        "hedger_lower_drawdown_than_static_seeds": static_wins,
        "n_seeds": len(unhedged),
        "must_show": {
            "hedger_mean_drawdown_below_unhedged": lower_dd,
            "hedger_return_loss_below_static": loss["hedger"] < loss["static"],
            "met": lower_dd and loss["hedger"] < loss["static"],
        },
    }


def format_table(summary: dict[str, Any]) -> list[str]:
    """The headline as plain-text lines."""
    lines = [
        f"{'policy':<10}{'mean maxDD':>12}{'median maxDD':>14}{'mean return':>13}{'mean Sharpe':>13}"
        f"{'hedge ratio':>13}{'fees':>9}",
        "-" * 84,
    ]
    for name, row in summary["policies"].items():
        lines.append(
            f"{name:<10}{row['mean_max_drawdown']:>12.2%}{row['median_max_drawdown']:>14.2%}"
            f"{row['mean_total_return']:>13.2%}{row['mean_sharpe']:>13.2f}"
            f"{row['mean_hedge_ratio']:>13.2f}{row['mean_fees']:>9.0f}"
        )
    loss, n = summary["return_loss_vs_unhedged"], summary["n_seeds"]
    must = summary["must_show"]
    wins, static_wins = (summary[f"hedger_lower_drawdown_than_{p}_seeds"] for p in ("unhedged", "static"))
    lines += [
        f"hedger drawdown below unhedged on {wins}/{n} seeds, below static on {static_wins}/{n}",
        f"mean return loss vs unhedged: static {loss['static']:+.2%}, hedger {loss['hedger']:+.2%}",
        f"must-show: mean drawdown below unhedged {must['hedger_mean_drawdown_below_unhedged']}, "
        f"return loss below static {must['hedger_return_loss_below_static']} -> "
        f"{'met' if must['met'] else 'NOT met'}",
    ]
    return lines


def plot(runs: list[dict[str, Any]], path: Path) -> Path:
    """Left: max drawdown per seed and policy. Right: the seed with the deepest unhedged drawdown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 4.8))
    by = {p: sorted((r for r in runs if r["policy"] == p), key=lambda r: r["seed"]) for p in POLICIES}
    left.boxplot([[r["max_drawdown"] * 100 for r in by[p]] for p in POLICIES])
    left.set_xticks(range(1, len(POLICIES) + 1), POLICIES)
    for i, p in enumerate(POLICIES, start=1):
        left.scatter(
            np.full(len(by[p]), i) + np.linspace(-0.15, 0.15, len(by[p])),
            [r["max_drawdown"] * 100 for r in by[p]],
            s=10,
            alpha=0.6,
        )
    left.set_ylabel("max drawdown (%)")
    left.set_title(f"max drawdown over {len(by['unhedged'])} held-out seeds")
    worst = max(by["unhedged"], key=lambda r: r["max_drawdown"])["seed"]
    start = next(r for r in by["unhedged"] if r["seed"] == worst)["equity"][0][0]

    def days(ts: Sequence[int]) -> np.ndarray:
        return (np.asarray(ts, dtype=np.float64) - start) / NANOS_PER_SECOND / SECONDS_PER_DAY

    for p in POLICIES:
        run = next(r for r in by[p] if r["seed"] == worst)
        ts, equity = zip(*run["equity"], strict=True)
        right.plot(days(ts), np.asarray(equity) / equity[0], label=p)
    hedger = next(r for r in by["hedger"] if r["seed"] == worst)
    twin = right.twinx()
    if hedger["ratios"]:
        ts, ratio = zip(*hedger["ratios"], strict=True)
        twin.step(days(ts), ratio, where="post", color="gray", alpha=0.5, label="hedge ratio")
    twin.set_ylim(-0.05, 1.6)
    twin.set_ylabel("hedger's hedge ratio")
    marks = hedger["crash"]
    end = days([hedger["equity"][-1][0]])[0]
    for (t0, regime), nxt in zip(marks, [*marks[1:], None], strict=True):
        if regime == 1:
            right.axvspan(days([t0])[0], days([nxt[0]])[0] if nxt else end, color="red", alpha=0.08)
    right.set_xlabel("days (red: crash regime)")
    right.set_ylabel("equity / start")
    right.set_title(f"seed {worst}: equity and hedge ratio")
    right.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m backtest.hedging``: run the comparison, print the table, write the report."""
    parser = argparse.ArgumentParser(prog="python -m backtest.hedging", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="TOML settings file (default: config/default.toml)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="trained world model")
    parser.add_argument("--seeds", type=int, default=20, help=f"seeds {SEED_START}, {SEED_START + 1}, ...")
    parser.add_argument("--days", type=float, default=8.0, help="simulated days per seed")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--crash-drift", type=float, default=WORLD["crash_drift"], help="annual drift of the crash regime"
    )
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT)
    args = parser.parse_args(argv)
    settings = load_settings(args.config)
    world = {**WORLD, "crash_drift": args.crash_drift}
    quiet_logging()
    started = time.perf_counter()
    seeds = list(range(SEED_START, SEED_START + args.seeds))
    result = evaluate(settings, seeds, args.days, args.model, args.workers, world)
    wall = time.perf_counter() - started
    summary = headline(result["runs"], result["static_ratio"])
    lines = format_table(summary)
    for line in lines:
        print(line)
    per_seed = [
        {k: v for k, v in r.items() if k not in ("equity", "ratios", "crash")} for r in result["runs"]
    ]
    report = {
        "summary": summary,
        "table": lines,
        "world": world,
        "seeds": seeds,
        "days": args.days,
        "model": str(args.model),
        "hedger": settings.hedger.model_dump(mode="json"),
        "base_book": base_book(settings),
        "wall_seconds": wall,
        "crash_schedules": {s: crash_schedule(s, args.days, world) for s in seeds},
        "runs": per_seed,
    }
    args.report.mkdir(parents=True, exist_ok=True)
    (args.report / "metrics.json").write_text(json.dumps(report, indent=2, default=float))
    picture = plot(result["runs"], args.report / "hedging.png")
    print(f"{len(result['runs'])} backtests in {wall:,.0f} s; report {args.report}, plot {picture}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
