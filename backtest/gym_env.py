"""A gymnasium environment around the one trading engine, for training agents on event-driven replays.

:class:`TradingEnv` owns no trading logic. Each episode it builds the engine with
:func:`bot.app.build_engine` and feeds it inbound events — a synthetic market drawn from a
seed pool, or a window of a journal — exactly as paper, live and backtest runs do. The
only difference is who answers a decision: where :meth:`Engine.feed <bot.app.Engine.feed>`
asks the engine's policy, the environment hands the queued observation to the agent and
applies its action with :meth:`DecisionLoop.apply <bot.decision.DecisionLoop.apply>`, the
same call at the same point of the event stream. A rollout that feeds a policy's own
actions therefore reproduces a plain replay of that policy bit for bit.

An episode:

1. ``reset`` draws a market seed (or a journal start time) and a start offset from the
   environment's seeded generator, builds a fresh engine and replays the warm-up: the
   first ``warmup_decisions`` decisions are answered by the engine's policy (flat for the
   default :class:`ExternalPolicy`), so features and the running normaliser have history
   before the agent's first observation.
2. ``step(action)``: action ``a ∈ [-1, 1]`` per traded instrument → target exposure
   ``a · max_exposure`` → order manager → risk engine → paper venue → portfolio; events are
   fed until the next decision tick, whose state-builder observation is returned with the
   :class:`~backtest.reward.RewardEngine`'s reward.
3. ``terminated`` means the account can no longer trade: equity at or below
   ``ruin_fraction`` of the initial cash, or the risk engine's kill switch HALTED (it never
   relaxes on its own). ``truncated`` means the episode was cut, not ended: its length was
   reached or the data ran out. The two are never both true.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from adapters.synthetic import SyntheticMarket, default_instruments
from backtest.metrics import compute_metrics
from backtest.reward import RewardConfig, RewardEngine
from bot.app import Engine, build_engine
from bot.bus import EventBus
from bot.events import Event, FeedState, FeedStatus, Fill, RiskState
from bot.features.engine import build_feature_engine
from bot.instruments import InstrumentSpec
from bot.journal import read_events
from config.settings import Settings
from strategies.base import Observation, Policy
from strategies.ppo import action_targets

NANOS_PER_SECOND = 1_000_000_000


class SeedRange(BaseModel):
    """A contiguous block of market seeds, ``start .. start + count − 1``: pools stay small in JSON."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: int = Field(ge=0)
    count: int = Field(ge=1)

    @property
    def stop(self) -> int:
        return self.start + self.count

    def seeds(self) -> range:
        return range(self.start, self.stop)

    def overlaps(self, other: SeedRange) -> bool:
        return self.start < other.stop and other.start < self.stop


class EnvConfig(BaseModel):
    """What an episode is: its data, length, warm-up, action scale, ending rules and reward."""

    model_config = ConfigDict(extra="forbid")

    episode_decisions: int = Field(360, ge=1, description="agent decisions per episode before truncation")
    warmup_decisions: int = Field(60, ge=0, description="decisions answered by the engine's policy first")
    decision_interval_s: float | None = Field(
        None, gt=0, description="event time between decisions; None: the settings' run.decision_interval_s"
    )
    market_seeds: SeedRange = Field(
        default_factory=lambda: SeedRange(start=1_000, count=100_000),
        description="synthetic market seeds an episode draws from (ignored with a journal)",
    )
    max_start_offset_s: float = Field(
        0.0, ge=0, description="episodes skip a uniform [0, this] of event time before the warm-up"
    )
    journal: Path | None = Field(None, description="replay this journal instead of the synthetic market")
    window_start_ns: int | None = Field(None, description="journal events before this time are not used")
    window_end_ns: int | None = Field(None, description="journal events after this time are not used")
    instruments: list[str] | None = Field(
        None, min_length=1, description="traded instruments in action order; None: the trend policy's"
    )
    max_exposure: float = Field(1.0, gt=0, le=1, description="target exposure of an action of ±1")
    ruin_fraction: float = Field(0.5, gt=0, lt=1, description="equity at or below this × initial cash ends")
    flatten: bool = Field(True, description="observations as one vector (MLP policies) or [window, dim]")
    reward: RewardConfig = Field(default_factory=RewardConfig)

    @model_validator(mode="after")
    def _window(self) -> EnvConfig:
        if (
            self.window_start_ns is not None
            and self.window_end_ns is not None
            and self.window_end_ns <= self.window_start_ns
        ):
            raise ValueError("window_end_ns must be after window_start_ns")
        return self


class ExternalPolicy(Policy):
    """The engine's stand-in for an agent that decides outside it: names the traded instruments.

    The engine only asks it during the warm-up, where it keeps the account flat.
    """

    def __init__(self, instruments: Sequence[str], name: str = "agent") -> None:
        if not instruments:
            raise ValueError("an agent must trade at least one instrument")
        self.name = name
        self.instruments = tuple(instruments)

    def targets(self, observation: Observation) -> dict[str, float]:
        return {}


class _EpisodeRecord:
    """Per-decision equity samples and the fills of one episode, for its metrics."""

    def __init__(self) -> None:
        self.ts_ns: list[int] = []
        self.equity: list[float] = []
        self.gross: list[float] = []
        self.fill_notional: list[float] = []
        self.fill_fees: list[float] = []
        self.start_funding = 0.0


class TradingEnv(gym.Env[np.ndarray, np.ndarray]):
    """Episodes of the trading engine on synthetic or journalled events (see the module docstring).

    ``policy`` becomes the engine's policy: it names the traded instruments (the action's
    order) and answers the warm-up decisions. Default: an :class:`ExternalPolicy` trading
    the config's ``instruments`` (else the trend policy's). ``instruments`` are the specs of
    the replayed market (default: the synthetic market's).
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}

    def __init__(
        self,
        settings: Settings,
        config: EnvConfig | None = None,
        policy: Policy | None = None,
        instruments: Sequence[InstrumentSpec] | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.config = config if config is not None else EnvConfig()
        if policy is None:
            traded = self.config.instruments or [spec.instrument for spec in settings.trend.instruments]
            policy = ExternalPolicy(traded)
        self.policy = policy
        self.instruments: tuple[str, ...] = tuple(policy.instruments)
        self._specs = list(instruments) if instruments is not None else default_instruments()
        known = {spec.instrument for spec in self._specs}
        unknown = [i for i in self.instruments if i not in known]
        if unknown:
            raise ValueError(f"the market has no instruments {unknown}")
        benchmark = self.config.reward.benchmark
        if benchmark is not None and benchmark not in self.instruments:
            raise ValueError(
                f"the reward's benchmark {benchmark!r} is not a traded instrument {self.instruments}"
            )
        self.decision_interval_s = self.config.decision_interval_s or settings.run.decision_interval_s
        self._episode_settings = settings.model_copy(
            update={"run": settings.run.model_copy(update={"decision_interval_s": self.decision_interval_s})}
        )

        features = build_feature_engine(EventBus(), settings.features)
        self.feature_names = features.feature_names
        window, dim = settings.state.window, features.dim
        shape = (window * dim,) if self.config.flatten else (window, dim)
        clip = settings.state.clip
        self.observation_space = gym.spaces.Box(-clip, clip, shape=shape, dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(len(self.instruments),), dtype=np.float32)

        self._journal_events: list[Event] | None = None
        self._journal_times: list[int] = []
        self._engine: Engine | None = None
        self._events: Iterator[Event] = iter(())
        self._observation: Observation | None = None
        self._reward = RewardEngine(self.config.reward, step_seconds=self.decision_interval_s)
        self._record = _EpisodeRecord()
        self._steps = 0
        self._done = False
        self._step_fills = 0
        self._step_notional = 0.0
        self._benchmark_mark = math.nan
        self.events_fed = 0
        self.market_seed: int | None = None
        self.episode_start_ns: int | None = None

    # --- gymnasium API -----------------------------------------------------------------------

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start an episode; ``options`` may fix ``market_seed`` and ``start_offset_s`` (evaluation).

        The same ``seed`` gives the same episode, observation for observation.
        """
        super().reset(seed=seed)
        self._events, specs = self._episode_events(options or {})
        engine = build_engine(self._engine_settings(), specs, policy=self.policy)
        engine.bus.subscribe(Fill, self._on_fill)
        self._engine = engine
        self.events_fed = 0
        while engine.decisions.decisions < self.config.warmup_decisions:
            event = next(self._events, None)
            if event is None:
                raise RuntimeError(
                    "the data ended during the warm-up: use a longer window or fewer warm-up decisions"
                )
            engine.feed(event)
            self.events_fed += 1
        observation = self._next_observation()
        if observation is None:
            raise RuntimeError("the data ended before the first decision of the episode")
        self._observation = observation
        equity = engine.portfolio.equity()
        self._reward.reset(equity)
        self._benchmark_mark = self._mark_of_benchmark()
        self._record = _EpisodeRecord()  # warm-up fills are not the agent's
        self._record.start_funding = engine.portfolio.total_funding
        self._sample(observation.ts_ns)
        self._steps = 0
        self._step_fills = 0
        self._step_notional = 0.0
        self._done = False
        return self._array(observation), self._info(equity)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        engine = self._engine
        if engine is None or self._observation is None:
            raise RuntimeError("call reset() before step()")
        if self._done:
            raise RuntimeError("the episode has ended: call reset()")
        self._step_fills = 0
        self._step_notional = 0.0
        engine.decisions.apply(action_targets(action, self.instruments, self.config.max_exposure))
        self._steps += 1
        observation = self._next_observation()
        data_ended = observation is None
        if observation is not None:
            self._observation = observation
        portfolio = engine.portfolio
        equity = portfolio.equity()
        gross = portfolio.gross_exposure() if equity > 0 else 0.0
        terms = self._reward.step(equity, self._step_notional, gross, self._market_return())
        self._sample(engine.bus.clock.now_ns() if observation is None else observation.ts_ns)

        ruined = equity <= self.config.ruin_fraction * portfolio.initial_cash
        terminated = ruined or engine.risk.state is RiskState.HALTED
        truncated = not terminated and (data_ended or self._steps >= self.config.episode_decisions)
        self._done = terminated or truncated
        info = self._info(equity)
        info["reward_terms"] = {
            "pnl": terms.pnl,
            "market": terms.market,
            "turnover": terms.turnover,
            "drawdown": terms.drawdown,
            "leverage": terms.leverage,
            "volatility": terms.volatility,
        }
        if terminated:
            info["end_reason"] = "ruin" if ruined else "halted"
        elif truncated:
            info["end_reason"] = "data_end" if data_ended else "episode_length"
        if self._done:
            info["episode_metrics"] = self.episode_metrics()
        return self._array(self._observation), terms.reward, terminated, truncated, info

    def close(self) -> None:
        self._engine = None
        self._journal_events = None

    # --- what tests and evaluations read -------------------------------------------------------

    @property
    def engine(self) -> Engine:
        """The engine of the current episode."""
        if self._engine is None:
            raise RuntimeError("no episode yet: call reset()")
        return self._engine

    @property
    def observation(self) -> Observation:
        """The full observation (raw features included) behind the latest returned state."""
        if self._observation is None:
            raise RuntimeError("no episode yet: call reset()")
        return self._observation

    def action_for(self, targets: dict[str, float]) -> np.ndarray:
        """The action that asks for ``targets`` (a policy's answer) in this environment's scale."""
        return np.array(
            [targets.get(i, 0.0) / self.config.max_exposure for i in self.instruments], dtype=np.float64
        )

    def episode_metrics(self) -> dict[str, float]:
        """Performance of the episode so far, sampled at every decision (backtest.metrics conventions)."""
        record = self._record
        metrics = compute_metrics(
            record.ts_ns,
            record.equity,
            record.gross,
            fill_notional=record.fill_notional,
            fill_fees=record.fill_fees,
            closing_pnl=(),
            funding_pnl=self.engine.portfolio.total_funding - record.start_funding,
        )
        return {
            "steps": float(self._steps),
            "total_return": metrics.total_return,
            "sharpe": metrics.sharpe,
            "sortino": metrics.sortino,
            "annualised_volatility": metrics.annualised_volatility,
            "max_drawdown": metrics.max_drawdown,
            "turnover": metrics.turnover,
            "fees": metrics.fees,
            "trades": float(metrics.trades),
            "exposure_time": metrics.exposure_time,
        }

    # --- internals ---------------------------------------------------------------------------

    def _engine_settings(self) -> Settings:
        if self.config.journal is not None or self.market_seed is None:
            return self._episode_settings
        seed = self.market_seed
        settings = self._episode_settings
        return settings.model_copy(
            update={
                "market": settings.market.model_copy(update={"seed": seed}),
                "venue": settings.venue.model_copy(update={"seed": seed}),
            }
        )

    def _episode_events(self, options: dict[str, Any]) -> tuple[Iterator[Event], list[InstrumentSpec]]:
        """The episode's inbound events, from its drawn (or given) seed and start, and the market's specs."""
        if self.config.journal is not None:
            return self._journal_episode(options), self._specs
        pool = self.config.market_seeds
        seed = options.get("market_seed")
        self.market_seed = (
            int(seed) if seed is not None else pool.start + int(self.np_random.integers(pool.count))
        )
        offset_ns = self._offset_ns(options, self.config.max_start_offset_s)
        market_config = self.settings.market.model_copy(update={"seed": self.market_seed})
        self.episode_start_ns = market_config.start_ns + offset_ns
        market = SyntheticMarket(market_config, self._specs)
        start = self.episode_start_ns
        # The feed announces itself at the episode's start, as a paper run's does at the market's.
        connected = FeedStatus(ts_event=start, ts_recv=start, feed="synthetic", status=FeedState.CONNECTED)
        later = (e for e in market.events() if e.ts_recv >= start and not isinstance(e, FeedStatus))
        return chain([connected], later), market.instruments()

    def _journal_episode(self, options: dict[str, Any]) -> Iterator[Event]:
        if self._journal_events is None:
            assert self.config.journal is not None
            start, end = self.config.window_start_ns, self.config.window_end_ns
            self._journal_events = [
                event
                for event in read_events(self.config.journal)
                if (start is None or event.ts_recv >= start) and (end is None or event.ts_recv <= end)
            ]
            if not self._journal_events:
                raise ValueError(f"journal {self.config.journal} has no events in the window")
            self._journal_times = [event.ts_recv for event in self._journal_events]
        self.market_seed = None
        first, last = self._journal_times[0], self._journal_times[-1]
        needed_ns = round(
            (self.config.warmup_decisions + self.config.episode_decisions + 1)
            * self.decision_interval_s
            * NANOS_PER_SECOND
        )
        room_s = max(0.0, (last - first - needed_ns) / NANOS_PER_SECOND)
        offset_ns = self._offset_ns(options, min(self.config.max_start_offset_s, room_s))
        self.episode_start_ns = first + offset_ns
        index = bisect.bisect_left(self._journal_times, self.episode_start_ns)
        return iter(self._journal_events[index:])

    def _offset_ns(self, options: dict[str, Any], max_offset_s: float) -> int:
        offset_s = options.get("start_offset_s")
        if offset_s is None:
            offset_s = float(self.np_random.uniform(0.0, max_offset_s)) if max_offset_s > 0 else 0.0
        return round(float(offset_s) * NANOS_PER_SECOND)

    def _next_observation(self) -> Observation | None:
        """Feed events until a decision is queued and take it; None when the data runs out first."""
        engine = self.engine
        pending = engine.decisions.pending
        while not pending:
            event = next(self._events, None)
            if event is None:
                return None
            engine.bus.feed(event)
            self.events_fed += 1
        return pending.popleft()

    def _mark_of_benchmark(self) -> float:
        """The reward benchmark's mark now (NaN without a benchmark or before its first price)."""
        benchmark = self.config.reward.benchmark
        mark = None if benchmark is None else self.engine.portfolio.mark(benchmark)
        return math.nan if mark is None else mark

    def _market_return(self) -> float:
        """What the benchmark's move over the step made on the net exposure, per unit of starting equity.

        With the traded instruments on the benchmark's underlying, a position of ``q`` made
        ``q · ΔP = notional_now · r / (1 + r)`` for the benchmark's return ``r``; positions are
        taken in the first moments of a step, so the step's closing notional is what was held.
        """
        previous, mark = self._benchmark_mark, self._mark_of_benchmark()
        self._benchmark_mark = mark
        if not (previous > 0 and mark > 0):
            return 0.0
        portfolio = self.engine.portfolio
        net = math.fsum(portfolio.notional(instrument) for instrument in self.instruments)
        return net * (mark - previous) / mark / self._reward.equity_before

    def _on_fill(self, fill: Fill) -> None:
        notional = fill.quantity * fill.price
        self._step_fills += 1
        self._step_notional += notional
        self._record.fill_notional.append(notional)
        self._record.fill_fees.append(fill.fee)

    def _sample(self, ts_ns: int) -> None:
        portfolio = self.engine.portfolio
        equity = portfolio.equity()
        self._record.ts_ns.append(ts_ns)
        self._record.equity.append(equity)
        self._record.gross.append(portfolio.gross_exposure() if equity > 0 else math.inf)

    def _array(self, observation: Observation) -> np.ndarray:
        state = observation.state.astype(np.float32)
        return state.reshape(-1) if self.config.flatten else state

    def _info(self, equity: float) -> dict[str, Any]:
        engine = self.engine
        return {
            "ts_ns": self.observation.ts_ns,
            "equity": equity,
            "cash": engine.portfolio.cash,
            "gross_exposure": engine.portfolio.gross_exposure() if equity > 0 else math.inf,
            "drawdown": self._reward.drawdown,
            "fills": self._step_fills,
            "traded_notional": self._step_notional,
            "risk_state": str(engine.risk.state),
            "market_seed": -1 if self.market_seed is None else self.market_seed,
            "decisions": self._steps,
        }
