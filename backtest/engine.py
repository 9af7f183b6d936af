"""Replay backtests: a journal or a seeded synthetic market through the one engine, as fast as it goes.

The backtester owns no trading component. It builds the core with
:func:`bot.app.build_engine` — the function paper and live runs use — and feeds it the
inbound events one by one with :meth:`Engine.feed <bot.app.Engine.feed>` on the simulated
clock, with no pacing. Replaying a paper run's journal with the same settings therefore
gives that run's orders, fills, equity snapshots and fingerprints exactly.

Sources:

- a journal (``docs/JOURNAL.md``) of a paper or live run, replayed as written. It starts
  from a flat account with ``run.initial_cash``: a journal of a run that resumed from a
  checkpoint does not hold the state it resumed from;
- the embedded synthetic market with a seed, for ``days`` of event time from
  ``market.start_ns``, exactly the stream a paper run on that seed receives.

A second engine on the same events is the **benchmark**: buy-and-hold of the spot instrument
of the policy's first traded asset at :data:`BENCHMARK_EXPOSURE` of equity. Two deliberate
differences from the strategy, so that it stays buy-and-hold: a target of 1.0 cannot be
bought (the taker fee and slippage come on top of all the cash, which the risk engine
rightly refuses), hence 0.99; and its notional caps and drawdown kill switch are lifted
(:func:`benchmark_settings`), since a 100 % position is above the default caps and a
benchmark that is liquidated in a crash is no longer buy-and-hold.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import chain
from pathlib import Path
from typing import Any

import msgspec
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from adapters.synthetic import SyntheticMarket
from backtest.metrics import Metrics, compute_metrics
from backtest.report import metrics_table, write_report
from bot.app import Engine, build_engine, new_run_id
from bot.events import (
    Event,
    Fill,
    OrderIntent,
    OrderStatus,
    OrderUpdate,
    PortfolioSnapshot,
    RegimeLabel,
    RiskDecision,
)
from bot.instruments import InstrumentKind, InstrumentRegistry, InstrumentSpec
from bot.journal import JournalError, read_events, read_header
from bot.logs import close_logging, configure_logging
from config.settings import Settings, load_settings
from strategies.base import Policy, load_policy
from strategies.hold import HoldPolicy, HoldPolicyConfig

NANOS_PER_SECOND = 1_000_000_000
NANOS_PER_DAY = 86_400 * NANOS_PER_SECOND
BENCHMARK_EXPOSURE = 0.99
_PROGRESS_EVERY = 4096  # events between progress-bar refreshes
# Settings that never reach the engine: where files go, wall-clock cadences, credentials.
_EDGE_SECTIONS = ("store", "journal", "logging", "live")
_EDGE_RUN_FIELDS = ("var_dir", "checkpoint_interval_s", "status_interval_s")


class BacktestError(Exception):
    """A backtest cannot start or read its input; ``str(error)`` is one line (the CLI exits 2)."""


@dataclass(frozen=True)
class BacktestConfig:
    """What to replay: exactly one of a journal or a synthetic seed (with its number of days)."""

    events_path: Path | None = None
    synthetic_seed: int | None = None
    days: float | None = None
    policy: str | Policy | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if (self.events_path is None) == (self.synthetic_seed is None):
            raise BacktestError(
                "give either a journal (--events PATH) or a synthetic seed (--synthetic-seed N)"
            )
        if self.synthetic_seed is not None:
            if self.synthetic_seed < 0:
                raise BacktestError(f"the synthetic seed must be non-negative, got {self.synthetic_seed}")
            if self.days is None or not (0 < self.days < math.inf):
                raise BacktestError(f"a synthetic backtest needs a positive --days, got {self.days}")
        elif self.days is not None:
            raise BacktestError("--days applies to synthetic backtests; a journal is replayed whole")

    @property
    def source_name(self) -> str:
        """Short name of the input, the first part of the default report folder's name."""
        if self.events_path is not None:
            return self.events_path.name.removesuffix(".gz").removesuffix(".jsonl")
        return f"synthetic-s{self.synthetic_seed}-{self.days:g}d"


# --- what a run records ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TradeRecord:
    """One fill, with the PnL it realised and the position it left (from the portfolio, its owner)."""

    seq: int
    ts_ns: int
    client_order_id: str
    instrument: str
    side: str
    quantity: float
    price: float
    fee: float
    liquidity: str
    trade_id: str
    realized_pnl: float
    position_after: float
    closing: bool

    @property
    def notional(self) -> float:
        return self.quantity * self.price


@dataclass(frozen=True, slots=True)
class EquityPoint:
    """One portfolio snapshot with the signed exposure (fraction of equity) of each traded instrument."""

    ts_ns: int
    equity: float
    cash: float
    unrealized_pnl: float
    realized_pnl: float
    fees: float
    funding: float
    gross_exposure: float
    exposures: tuple[float, ...]


@dataclass(slots=True)
class OrderRecord:
    """Latest state of one order, folded from its intent, risk verdict and venue updates like the store's."""

    client_order_id: str
    instrument: str
    side: str
    quantity: float
    order_type: str
    limit_price: float | None
    reduce_only: bool
    reason: str
    status: str
    status_reason: str
    venue_order_id: str
    filled_qty: float
    avg_price: float
    ts_created: int
    ts_updated: int


@dataclass(frozen=True, slots=True)
class RegimeMark:
    """The synthetic market's true regime from ``ts_ns`` on (evaluation and plot shading only)."""

    ts_ns: int
    regime: int
    name: str


@dataclass(frozen=True)
class PolicyRun:
    """Everything one engine did over the replay."""

    policy: str
    instruments: tuple[str, ...]
    fills: tuple[TradeRecord, ...]
    equity: tuple[EquityPoint, ...]
    orders: tuple[OrderRecord, ...]
    metrics: Metrics
    fills_sha256: str
    obs_sha256: str
    decisions: int
    risk_state: str


@dataclass(frozen=True)
class BacktestResult:
    """The strategy's run, the benchmark's run on the same events, and what was replayed."""

    name: str
    source: dict[str, Any]
    settings: dict[str, Any]
    events: int
    start_ns: int
    end_ns: int
    strategy: PolicyRun
    benchmark: PolicyRun
    benchmark_targets: dict[str, float]
    regimes: tuple[RegimeMark, ...] = field(default=())

    @property
    def metrics(self) -> Metrics:
        return self.strategy.metrics

    @property
    def benchmark_metrics(self) -> Metrics:
        return self.benchmark.metrics

    @property
    def fills(self) -> tuple[TradeRecord, ...]:
        return self.strategy.fills

    @property
    def equity(self) -> tuple[EquityPoint, ...]:
        return self.strategy.equity

    @property
    def fills_sha256(self) -> str:
        return self.strategy.fills_sha256

    @property
    def obs_sha256(self) -> str:
        return self.strategy.obs_sha256


@dataclass(frozen=True, slots=True)
class _PositionMark:
    """A position's quantity and cumulative realised PnL after the latest fill."""

    quantity: float
    realized_pnl: float


class _Recorder:
    """Collects one engine's fills, snapshots and orders from its bus (read-only subscriber)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.instruments = tuple(engine.policy.instruments)
        self.fills: list[TradeRecord] = []
        self.equity: list[EquityPoint] = []
        self.orders: dict[str, OrderRecord] = {}
        self._positions: dict[str, _PositionMark] = {}
        bus = engine.bus
        bus.subscribe(Fill, self.on_fill)
        bus.subscribe(PortfolioSnapshot, self.on_snapshot)
        bus.subscribe(OrderIntent, self.on_intent)
        bus.subscribe(RiskDecision, self.on_risk_decision)
        bus.subscribe(OrderUpdate, self.on_order_update)

    def on_fill(self, fill: Fill) -> None:
        # The portfolio subscribed first, so its position already includes this fill.
        after = self.engine.portfolio.position(fill.instrument)
        before = self._positions.get(fill.instrument, _PositionMark(0.0, 0.0))
        self.fills.append(
            TradeRecord(
                seq=len(self.fills) + 1,
                ts_ns=fill.ts_event,
                client_order_id=fill.client_order_id,
                instrument=fill.instrument,
                side=fill.side.value,
                quantity=fill.quantity,
                price=fill.price,
                fee=fill.fee,
                liquidity=fill.liquidity.value,
                trade_id=fill.trade_id,
                realized_pnl=after.realized_pnl - before.realized_pnl,
                position_after=after.quantity,
                closing=before.quantity != 0.0 and (before.quantity > 0.0) != (fill.signed_quantity > 0.0),
            )
        )
        self._positions[fill.instrument] = _PositionMark(after.quantity, after.realized_pnl)

    def on_snapshot(self, snapshot: PortfolioSnapshot) -> None:
        portfolio = self.engine.portfolio
        self.equity.append(
            EquityPoint(
                ts_ns=snapshot.ts_event,
                equity=float(snapshot.equity),
                cash=float(snapshot.cash),
                unrealized_pnl=float(snapshot.unrealized_pnl),  # an empty sum is the int 0
                realized_pnl=float(snapshot.realized_pnl),
                fees=float(snapshot.fees),
                funding=float(snapshot.funding),
                gross_exposure=float(snapshot.gross_exposure),
                exposures=tuple(portfolio.exposure(instrument) for instrument in self.instruments),
            )
        )

    def on_intent(self, intent: OrderIntent) -> None:
        self.orders[intent.client_order_id] = OrderRecord(
            client_order_id=intent.client_order_id,
            instrument=intent.instrument,
            side=intent.side.value,
            quantity=intent.quantity,
            order_type=intent.order_type.value,
            limit_price=intent.limit_price,
            reduce_only=intent.reduce_only,
            reason=intent.reason,
            status=OrderStatus.NEW.value,
            status_reason="",
            venue_order_id="",
            filled_qty=0.0,
            avg_price=0.0,
            ts_created=intent.ts_event,
            ts_updated=intent.ts_event,
        )

    def on_risk_decision(self, decision: RiskDecision) -> None:
        order = self.orders.get(decision.client_order_id)
        if order is not None and not decision.approved:
            order.status = OrderStatus.REJECTED.value
            order.status_reason = decision.reason
            order.ts_updated = decision.ts_event

    def on_order_update(self, update: OrderUpdate) -> None:
        order = self.orders.get(update.client_order_id)
        if order is None:  # an order this engine never created cannot exist in a replay from flat
            return
        order.status = update.status.value
        order.status_reason = update.reason
        order.venue_order_id = update.venue_order_id or order.venue_order_id
        order.filled_qty = update.filled_qty
        order.avg_price = update.avg_price
        order.ts_updated = update.ts_event

    def result(self) -> PolicyRun:
        engine = self.engine
        fills = self.fills
        equity = self.equity
        metrics = compute_metrics(
            [point.ts_ns for point in equity],
            [point.equity for point in equity],
            [point.gross_exposure for point in equity],
            fill_notional=[fill.notional for fill in fills],
            fill_fees=[fill.fee for fill in fills],
            closing_pnl=[fill.realized_pnl for fill in fills if fill.closing],
            funding_pnl=engine.portfolio.total_funding,
        )
        return PolicyRun(
            policy=engine.policy.name,
            instruments=self.instruments,
            fills=tuple(fills),
            equity=tuple(equity),
            orders=tuple(self.orders.values()),
            metrics=metrics,
            fills_sha256=engine.fingerprint.fills_sha256,
            obs_sha256=engine.fingerprint.obs_sha256,
            decisions=engine.decisions.decisions,
            risk_state=str(engine.risk.state),
        )


# --- sources --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """Inbound events to replay, the instruments they quote, and a description for the report."""

    events: Iterable[Event]
    instruments: list[InstrumentSpec]
    description: dict[str, Any]
    span_ns: tuple[int, int] | None  # known first and last event time (synthetic), for the progress bar


def journal_header(path: Path) -> dict[str, Any]:
    """The journal's header; BacktestError when the file is missing or is not a volbot journal."""
    if not path.is_file():
        raise BacktestError(f"journal not found: {path}")
    try:
        return read_header(path)
    except JournalError as exc:
        raise BacktestError(str(exc)) from None
    except OSError as exc:
        raise BacktestError(f"{path}: cannot read journal ({exc})") from None


def _journal_events(path: Path) -> Iterator[Event]:
    try:
        yield from read_events(path)
    except msgspec.DecodeError as exc:
        raise BacktestError(f"{path}: a line is not a journal event ({exc})") from None
    except OSError as exc:
        raise BacktestError(f"{path}: cannot read journal ({exc})") from None


def _journal_source(path: Path, settings: Settings, instruments: list[InstrumentSpec] | None) -> _Source:
    header = journal_header(path)
    meta = header.get("meta") or {}
    feed = meta.get("feed")
    if instruments is None:
        if feed != "synthetic":
            raise BacktestError(
                f"{path}: the instrument specs of feed {feed!r} must be given; "
                "only synthetic journals get theirs from the settings"
            )
        instruments = SyntheticMarket(settings.market).instruments()
    description = {
        "kind": "journal",
        "path": str(path),
        "journal_run_id": header.get("run_id"),
        "mode": meta.get("mode"),
        "feed": feed,
        "seed": meta.get("seed"),
    }
    return _Source(_journal_events(path), instruments, description, None)


def _synthetic_source(
    settings: Settings, seed: int, days: float, instruments: list[InstrumentSpec] | None
) -> _Source:
    """The synthetic market from ``market.start_ns`` for ``days``, exactly as a paper run receives it."""
    start = settings.market.start_ns
    end = start + round(days * NANOS_PER_DAY)
    if settings.market.until_ns is not None:
        end = min(end, settings.market.until_ns)
    market = SyntheticMarket(settings.market.model_copy(update={"seed": seed, "until_ns": end}), instruments)
    description = {"kind": "synthetic", "seed": seed, "days": days, "start_ns": start}
    return _Source(market.events(), market.instruments(), description, (start, end))


# --- the benchmark --------------------------------------------------------------------------------


def benchmark_instrument(registry: InstrumentRegistry, traded: str) -> str:
    """Spot instrument of ``traded``'s base asset, on its venue if there is one; ``traded`` when none."""
    spec = registry[traded]
    venue = spec.instrument.partition(":")[0]
    spots = [
        s for s in registry if s.kind is InstrumentKind.SPOT and s.base == spec.base and s.quote == spec.quote
    ]
    spots.sort(key=lambda s: s.instrument.partition(":")[0] != venue)
    return spots[0].instrument if spots else traded


def benchmark_settings(settings: Settings) -> Settings:
    """The strategy's settings with the notional caps and the drawdown kill switch lifted (see module)."""
    risk = settings.risk.model_copy(
        update={
            "max_position_notional": math.inf,
            "position_notional_limits": {},
            "max_order_notional": math.inf,
            "reduce_drawdown": 0.99,
            "max_drawdown": 0.99,
        }
    )
    return settings.model_copy(update={"risk": risk})


# --- running --------------------------------------------------------------------------------------


class _ProgressBar:
    """Events/s and the simulated date on a rich progress bar (wall time is read for display only)."""

    def __init__(self, span_ns: tuple[int, int] | None) -> None:
        self._span_ns = span_ns
        self._progress = Progress(
            TextColumn("[bold]backtest"),
            BarColumn(bar_width=24),
            TextColumn("{task.fields[date]}"),
            TextColumn("{task.fields[events]:>12,} events"),
            TextColumn("{task.fields[rate]:>9,.0f} events/s"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        )
        total = (span_ns[1] - span_ns[0]) / NANOS_PER_SECOND if span_ns is not None else None
        self._task = self._progress.add_task("backtest", total=total, date="", events=0, rate=0.0)
        self._started = time.perf_counter()

    def __enter__(self) -> _ProgressBar:
        self._progress.start()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._progress.stop()

    def update(self, events: int, now_ns: int) -> None:
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        completed = (now_ns - self._span_ns[0]) / NANOS_PER_SECOND if self._span_ns is not None else None
        self._progress.update(
            self._task, completed=completed, date=_iso(now_ns), events=events, rate=events / elapsed
        )


def _iso(ts_ns: int) -> str:
    return datetime.fromtimestamp(ts_ns / NANOS_PER_SECOND, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _load_policy(policy: str | Policy | None, settings: Settings, registry: InstrumentRegistry) -> Policy:
    if not isinstance(policy, Policy):
        spec = policy or settings.run.policy
        try:
            policy = load_policy(spec, settings=settings)
        except (ValueError, OSError) as exc:
            raise BacktestError(f"policy {spec!r}: {exc}") from None
    unknown = [instrument for instrument in policy.instruments if instrument not in registry]
    if unknown:
        raise BacktestError(f"policy {policy.name!r} trades instruments the source does not quote: {unknown}")
    return policy


def settings_summary(settings: Settings, policy: Policy) -> dict[str, Any]:
    """The settings that shaped the replay, and a sha256 of every engine-relevant section.

    Edge settings (files, databases, logging, wall-clock cadences, credentials) are left out of
    the digest, so the same backtest from another folder or database gives the same summary.
    """
    engine_settings = settings.redacted_dict()
    for section in _EDGE_SECTIONS:
        engine_settings.pop(section, None)
    for name in (*_EDGE_RUN_FIELDS, "policy"):
        engine_settings["run"].pop(name, None)
    return {
        "policy": policy.name,
        "instruments": list(policy.instruments),
        "initial_cash": settings.run.initial_cash,
        "decision_interval_s": settings.run.decision_interval_s,
        "snapshot_interval_s": settings.run.snapshot_interval_s,
        "venue_seed": settings.venue.seed,
        "engine_settings_sha256": hashlib.sha256(
            msgspec.json.encode(engine_settings, order="sorted")
        ).hexdigest(),
    }


def run_backtest(
    settings: Settings,
    *,
    events_path: Path | str | None = None,
    synthetic_seed: int | None = None,
    days: float | None = None,
    policy: str | Policy | None = None,
    report_dir: Path | str | None = None,
    progress: bool = True,
    instruments: Iterable[InstrumentSpec] | None = None,
) -> BacktestResult:
    """Replay a journal (``events_path``) or ``days`` of the synthetic market (``synthetic_seed``).

    ``policy`` is a spec ``NAME[:PATH]`` or a policy object (default ``run.policy``);
    ``instruments`` the specs of a non-synthetic journal's instruments. Writes the report
    into ``report_dir`` when given. Raises :class:`BacktestError` on bad inputs.
    """
    config = BacktestConfig(
        events_path=Path(events_path) if events_path is not None else None,
        synthetic_seed=synthetic_seed,
        days=days,
        policy=policy,
        progress=progress,
    )
    result = _Backtest(settings, config, list(instruments) if instruments is not None else None).run()
    if report_dir is not None:
        write_report(result, Path(report_dir))
    return result


class _Backtest:
    """One replay: the strategy engine and the benchmark engine fed the same events in one pass."""

    def __init__(
        self, settings: Settings, config: BacktestConfig, instruments: list[InstrumentSpec] | None
    ) -> None:
        self.settings = settings
        self.config = config
        if config.events_path is not None:
            self.source = _journal_source(config.events_path, settings, instruments)
        else:
            assert config.synthetic_seed is not None and config.days is not None
            self.source = _synthetic_source(settings, config.synthetic_seed, config.days, instruments)
        registry = InstrumentRegistry(self.source.instruments)
        self.policy = _load_policy(config.policy, settings, registry)
        if not self.policy.instruments:
            raise BacktestError(f"policy {self.policy.name!r} trades no instrument")
        held = benchmark_instrument(registry, self.policy.instruments[0])
        self.benchmark_targets = {held: BENCHMARK_EXPOSURE}
        self.strategy = build_engine(settings, self.source.instruments, policy=self.policy)
        self.benchmark = build_engine(
            benchmark_settings(settings),
            self.source.instruments,
            policy=HoldPolicy(HoldPolicyConfig(targets=self.benchmark_targets)),
        )
        self.recorders = (_Recorder(self.strategy), _Recorder(self.benchmark))
        self.regimes: list[RegimeMark] = []
        self.strategy.bus.subscribe(RegimeLabel, self._on_regime)

    def _on_regime(self, label: RegimeLabel) -> None:
        self.regimes.append(RegimeMark(label.ts_event, label.regime, label.name))

    def run(self) -> BacktestResult:
        events = iter(self.source.events)
        first = next(events, None)
        if first is None:
            raise BacktestError(f"nothing to replay: {self.config.source_name} has no events")
        bar = _ProgressBar(self.source.span_ns) if self.config.progress else None
        with bar if bar is not None else contextlib.nullcontext():
            count = self._feed(chain([first], events), bar)
        for engine in (self.strategy, self.benchmark):
            engine.portfolio.snapshot()  # the closing snapshot a paper run takes at shutdown
        strategy, benchmark = (recorder.result() for recorder in self.recorders)
        return BacktestResult(
            name=f"{self.config.source_name}-{self.policy.name}",
            source=self.source.description,
            settings=settings_summary(self.settings, self.policy),
            events=count,
            start_ns=first.ts_recv,
            end_ns=self.strategy.bus.clock.now_ns(),
            strategy=strategy,
            benchmark=benchmark,
            benchmark_targets=dict(self.benchmark_targets),
            regimes=tuple(self.regimes),
        )

    def _feed(self, events: Iterable[Event], bar: _ProgressBar | None) -> int:
        """The hot loop: every event to both engines, the progress bar refreshed now and then."""
        feed_strategy, feed_benchmark = self.strategy.feed, self.benchmark.feed
        count = 0
        for event in events:
            feed_strategy(event)
            feed_benchmark(event)
            count += 1
            if bar is not None and count % _PROGRESS_EVERY == 0:
                bar.update(count, event.ts_recv)
        if bar is not None:
            bar.update(count, self.strategy.bus.clock.now_ns())
        return count


# --- command line ---------------------------------------------------------------------------------


# Console width when stdout is not a terminal (a file, a pipe, a test's capture).
_PIPED_WIDTH = 120


def backtest_main(args: argparse.Namespace, overrides: Mapping[str, Mapping[str, Any]]) -> int:
    """``main.py --mode backtest``: replay, print the metrics table, write the report.

    ``args`` carries ``config``, ``events``, ``synthetic_seed``, ``days``, ``report`` and
    ``seed``; ``overrides`` are the command line's settings overrides (seeds, policy, log
    level). A journal replayed without ``--seed`` takes the run's and the venue's seed from
    its header, so ``--events PATH`` alone reproduces the run. The report goes to ``--report``
    or ``<run.var_dir>/reports/<name>``. Logs go to the JSON log file only: the console shows
    the progress bar and the results. Raises :class:`BacktestError` or ``ConfigError``, whose
    messages are one line (the CLI exits 2).
    """
    config = BacktestConfig(events_path=args.events, synthetic_seed=args.synthetic_seed, days=args.days)
    layered = {section: dict(values) for section, values in overrides.items()}
    if config.events_path is not None and args.seed is None:
        seed = (journal_header(config.events_path).get("meta") or {}).get("seed")
        if isinstance(seed, int):
            layered.setdefault("run", {})["seed"] = seed
            layered.setdefault("venue", {})["seed"] = seed
    settings = load_settings(args.config, overrides=layered)
    configure_logging(
        settings.logging.dir,
        new_run_id("backtest"),
        level=settings.logging.level,
        console=False,
        json_file=settings.logging.json_file,
    )
    try:
        result = run_backtest(
            settings, events_path=config.events_path, synthetic_seed=config.synthetic_seed, days=config.days
        )
    finally:
        close_logging()
    report_dir = args.report or Path(settings.run.var_dir) / "reports" / result.name
    write_report(result, report_dir)
    console = Console(soft_wrap=True)
    if not console.is_terminal:  # piped or captured: no terminal width to honour, so never squeeze
        console.width = max(console.width, _PIPED_WIDTH)
    console.print(metrics_table(result))
    console.print(f"report written to {report_dir / 'report.html'}")
    return 0
