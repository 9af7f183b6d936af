"""App wiring: one engine for every mode, and the paper-trading session around it.

:func:`build_engine` assembles the deterministic core (bus, clock, portfolio, risk
engine, order manager, venue, features, state builder, policy, decision loop) in a
fixed order; paper, live, backtest and the gym environment all call it, so they share
every object that can change a decision. :class:`PaperSession` adds the edges of a
continuous run: a paced feed, the journal, the store, checkpoints, logs, status lines
and clean shutdown on SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from adapters.ccxt_venue import CcxtVenue
from adapters.paper import PaperVenue
from adapters.sources import MarketSource, market_source
from bot.bus import EventBus, InboundQueue
from bot.decision import DecisionLoop, RunFingerprint
from bot.events import Event
from bot.features.engine import FeatureEngine, build_feature_engine
from bot.instruments import InstrumentRegistry, InstrumentSpec
from bot.journal import JournalWriter
from bot.logs import EventLogger, StatusLine, configure_logging
from bot.orders import OrderManager
from bot.portfolio import Portfolio
from bot.risk import RiskEngine
from bot.state import StateBuilder
from bot.store import Store, StoreRecorder
from config.settings import ConfigError, Settings
from strategies.base import Policy, load_policy

NANOS_PER_SECOND = 1_000_000_000
log = structlog.get_logger(__name__)


@dataclass
class Engine:
    """The deterministic trading core; every mode drives exactly these objects."""

    bus: EventBus
    instruments: InstrumentRegistry
    portfolio: Portfolio
    risk: RiskEngine
    orders: OrderManager
    venue: PaperVenue | None  # None when a real venue adapter answers the orders (live mode)
    features: FeatureEngine
    state_builder: StateBuilder
    policy: Policy
    decisions: DecisionLoop
    fingerprint: RunFingerprint

    def feed(self, event: Event) -> None:
        """Process one inbound event, then let the policy answer any decision it triggered."""
        self.bus.feed(event)
        if self.decisions.pending:
            self.decisions.resolve_with_policy()

    def state_dicts(self) -> dict[str, dict[str, Any]]:
        """Everything a restarted run needs to continue where this one stopped."""
        return {
            "portfolio": self.portfolio.state_dict(),
            "risk": self.risk.state_dict(),
            "orders": self.orders.state_dict(),
            "state_builder": self.state_builder.state_dict(),
            "clock": {"now_ns": self.bus.clock.now_ns() if self.bus.clock.started else 0},
        }

    def load_state_dicts(self, states: dict[str, dict[str, Any]]) -> None:
        self.portfolio.load_state_dict(states["portfolio"])
        self.risk.load_state_dict(states["risk"])
        self.orders.load_state_dict(states["orders"])
        self.state_builder.load_state_dict(states["state_builder"])
        self.portfolio.publish_positions(int(states["clock"]["now_ns"]))
        if self.venue is not None:
            positions = {p.instrument: p.quantity for p in self.portfolio.positions.values()}
            self.venue.restore_positions(positions)


def build_engine(
    settings: Settings,
    instruments: Iterable[InstrumentSpec],
    policy: str | Policy | None = None,
    simulated_venue: bool = True,
) -> Engine:
    """Assemble the core in its fixed subscription order (marks reach the portfolio before risk).

    ``simulated_venue=False`` leaves the orders to a real venue adapter attached to the bus (live).
    """
    bus = EventBus()
    registry = InstrumentRegistry(list(instruments))
    portfolio = Portfolio(bus, registry, settings.run.initial_cash)
    risk = RiskEngine(bus, registry, portfolio, settings.risk)
    orders = OrderManager(bus, registry, portfolio, settings.orders)
    venue = PaperVenue(bus, registry, settings.venue) if simulated_venue else None
    features = build_feature_engine(bus, settings.features)
    state_builder = StateBuilder(
        len(features.feature_names),
        window=settings.state.window,
        clip=settings.state.clip,
        schema_hash=features.schema_hash(),
        fixed_scales=settings.state.scales_for(features.feature_names),
    )
    if not isinstance(policy, Policy):
        policy = load_policy(policy or settings.run.policy, settings=settings)
    unlisted = [instrument for instrument in policy.instruments if instrument not in registry]
    if unlisted:
        raise ConfigError(
            f"config error: policy {policy.name!r} trades {', '.join(unlisted)}, which the market does not "
            f"list (it lists {', '.join(registry.ids) or 'nothing'})"
        )
    fingerprint = RunFingerprint(bus)
    decisions = DecisionLoop(
        bus, features, state_builder, policy, settings.run.decision_interval_s, fingerprint
    )
    bus.clock.set_timer(
        "snapshot", int(settings.run.snapshot_interval_s * NANOS_PER_SECOND), lambda _: portfolio.snapshot()
    )
    return Engine(
        bus=bus,
        instruments=registry,
        portfolio=portfolio,
        risk=risk,
        orders=orders,
        venue=venue,
        features=features,
        state_builder=state_builder,
        policy=policy,
        decisions=decisions,
        fingerprint=fingerprint,
    )


def new_run_id(mode: str) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{mode}-{stamp}-{secrets.token_hex(3)}"


@dataclass
class PaperOptions:
    duration_s: float | None = None
    speed: float = 1.0
    journal_path: Path | None = None
    live: bool = False  # orders go to the exchange of [live] through ccxt instead of the paper venue


@dataclass
class RunSummary:
    run_id: str
    status: str
    events: int
    decisions: int
    fills: int
    equity: float
    cash: float
    pnl: float
    risk_state: str
    positions: dict[str, float] = field(default_factory=dict)
    journal: str = ""
    resumed_from: str | None = None
    fills_sha256: str = ""
    obs_sha256: str = ""

    def lines(self) -> list[str]:
        positions = ", ".join(f"{k}={v:g}" for k, v in self.positions.items() if v) or "flat"
        return [
            f"run {self.run_id} {self.status}: {self.events} events, "
            f"{self.decisions} decisions, {self.fills} fills",
            f"equity {self.equity:,.2f} USDT (PnL {self.pnl:+,.2f}), "
            f"cash {self.cash:,.2f}, risk {self.risk_state}",
            f"positions: {positions}",
            f"journal: {self.journal}",
        ]


class PaperSession:
    """A continuous paper-trading run on the embedded synthetic market or the venues' live feeds."""

    def __init__(self, settings: Settings, options: PaperOptions) -> None:
        self.settings = settings
        self.options = options
        self.mode = "live" if options.live else "paper"
        self.run_id = new_run_id(self.mode)
        self.stop = asyncio.Event()
        self.events = 0

    def request_stop(self, reason: str) -> None:
        if not self.stop.is_set():
            log.info("stop_requested", reason=reason)
            self.stop.set()

    async def run(self) -> RunSummary:
        settings = self.settings
        var_dir = Path(settings.run.var_dir)
        configure_logging(
            Path(settings.logging.dir),
            self.run_id,
            level=settings.logging.level,
            console=settings.logging.console,
            json_file=settings.logging.json_file,
        )
        store = Store(settings.store.url)
        await store.open()
        try:
            return await self._run_with_store(store, var_dir)
        finally:
            await store.close()

    async def _run_with_store(self, store: Store, var_dir: Path) -> RunSummary:
        settings = self.settings
        resume = await store.latest_component_states(mode=self.mode)
        previous = await store.latest_run(mode=self.mode)
        start_ns = (time.time_ns() // NANOS_PER_SECOND) * NANOS_PER_SECOND
        if resume is not None:
            start_ns = max(start_ns, resume["clock"]["now_ns"] + NANOS_PER_SECOND)
        source = market_source(settings, start_ns, self.options.speed)
        if self.options.live and source.name == "synthetic":
            raise ConfigError("config error: run.feed: live mode trades a real market; use --feed binance")
        engine = build_engine(settings, await source.instruments(), simulated_venue=not self.options.live)
        if resume is not None:
            engine.load_state_dicts(resume)
            log.info("resumed", from_run=previous.run_id if previous else None, cash=engine.portfolio.cash)

        journal_path = self.options.journal_path or (
            Path(settings.journal.dir) / f"{self.run_id}.jsonl{'.gz' if settings.journal.gzip else ''}"
        )
        journal = JournalWriter(
            journal_path,
            self.run_id,
            meta={"mode": self.mode, "seed": settings.run.seed, "feed": source.name},
        )
        engine.bus.on_inbound(journal.write)
        recorder = StoreRecorder(engine.bus, store, self.run_id)
        EventLogger(engine.bus)
        await store.start_run(
            self.run_id,
            mode=self.mode,
            seed=settings.run.seed,
            config=settings.redacted_dict(),
            policy=engine.policy.name,
            journal_path=str(journal_path),
            parent_run_id=previous.run_id if (resume is not None and previous is not None) else None,
        )
        log.info(
            "run_started",
            mode=self.mode,
            speed=self.options.speed,
            journal=str(journal_path),
            var=str(var_dir),
        )

        status = "completed"
        try:
            await self._loop(engine, source, journal, recorder, store)
        except BaseException:
            status = "crashed"
            raise
        finally:
            engine.portfolio.snapshot()
            journal.close()
            await recorder.flush()
            if engine.bus.clock.started:
                await store.save_component_states(
                    self.run_id, engine.bus.clock.now_ns(), engine.state_dicts()
                )
            summary = self._summary(
                engine, status, journal_path, previous.run_id if resume and previous else None
            )
            await store.finish_run(
                self.run_id,
                status,
                summary=summary.__dict__,
                fills_sha256=engine.fingerprint.fills_sha256,
                obs_sha256=engine.fingerprint.obs_sha256,
            )
            log.info("run_finished", **{k: v for k, v in summary.__dict__.items() if k != "positions"})
        return summary

    async def _loop(
        self,
        engine: Engine,
        source: MarketSource,
        journal: JournalWriter,
        recorder: StoreRecorder,
        store: Store,
    ) -> None:
        queue = InboundQueue()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop, signal.Signals(sig).name)
        if self.options.duration_s is not None:
            loop.call_later(self.options.duration_s, self.request_stop, "duration elapsed")

        async def checkpoint_every(seconds: float) -> None:
            # Ends at a stop request, never by cancellation: a write cancelled half-way would keep
            # SQLite's lock from the final checkpoint.
            while not self.stop.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(seconds):
                        await self.stop.wait()
                if not self.stop.is_set():
                    await self._checkpoint(engine, journal, recorder, store)

        status_line = StatusLine()

        async def status_every(seconds: float) -> None:
            last_events, last_time = self.events, time.monotonic()
            while True:
                await asyncio.sleep(seconds)
                now = time.monotonic()
                rate = (self.events - last_events) / max(now - last_time, 1e-9)
                last_events, last_time = self.events, now
                status_line.emit(engine.portfolio, engine.risk.state, rate)

        venue: CcxtVenue | None = None
        if self.options.live:
            live = self.settings.live
            overrides = {"base_url": live.base_url} if live.base_url else {}
            venue = CcxtVenue.from_live_config(live, queue.put_nowait, bus=engine.bus, **overrides)
            await venue.start()
        producer = asyncio.create_task(source.run(queue, self.stop), name="feed")
        checkpoints = asyncio.create_task(
            checkpoint_every(self.settings.run.checkpoint_interval_s), name="checkpoint"
        )
        status = asyncio.create_task(status_every(self.settings.run.status_interval_s), name="status")
        try:
            while not (self.stop.is_set() and producer.done() and len(queue) == 0):
                if producer.done() and producer.exception() is not None:
                    raise producer.exception()  # type: ignore[misc]
                batch = 0
                while batch < 512 and (event := queue.get_nowait()) is not None:
                    engine.feed(event)
                    batch += 1
                self.events += batch
                if batch == 0:
                    if self.stop.is_set() and producer.done():
                        break
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.1):  # not wait_for: it can swallow a cancel on 3.11
                            event = await queue.get()
                        engine.feed(event)
                        self.events += 1
                else:
                    await asyncio.sleep(0)
        finally:
            self.stop.set()
            producer.cancel()
            status.cancel()
            await asyncio.gather(producer, checkpoints, status, return_exceptions=True)
            if venue is not None:
                await venue.close()

    async def _checkpoint(
        self, engine: Engine, journal: JournalWriter, recorder: StoreRecorder, store: Store
    ) -> None:
        """Make everything so far durable: journal first, then rows, then resumable state."""
        journal.flush()
        await recorder.flush()
        if engine.bus.clock.started:
            await store.save_component_states(self.run_id, engine.bus.clock.now_ns(), engine.state_dicts())

    def _summary(self, engine: Engine, status: str, journal: Path, resumed_from: str | None) -> RunSummary:
        portfolio = engine.portfolio
        equity = portfolio.equity()
        return RunSummary(
            run_id=self.run_id,
            status=status,
            events=self.events,
            decisions=engine.decisions.decisions,
            fills=engine.fingerprint.fill_count,
            equity=equity if math.isfinite(equity) else float("nan"),
            cash=portfolio.cash,
            pnl=equity - self.settings.run.initial_cash,
            risk_state=str(engine.risk.state),
            positions={p.instrument: p.quantity for p in portfolio.positions.values()},
            journal=str(journal),
            resumed_from=resumed_from,
            fills_sha256=engine.fingerprint.fills_sha256,
            obs_sha256=engine.fingerprint.obs_sha256,
        )
