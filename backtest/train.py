"""Training a PPO agent in the trading environment, and judging it against the rule policies.

:func:`train_ppo` trains stable-baselines3's PPO (an MLP on the flattened state) in
:class:`~backtest.gym_env.TradingEnv` episodes, vectorised over worker processes, with:

- **pinned seeds**: SB3's :func:`set_random_seed` (Python, numpy, torch), the PPO seed,
  environment ``i`` seeded ``seed + i`` (its episodes draw market seeds and start offsets
  from that), and each episode's venue seeded with its market seed;
- **held-out validation**: every ``eval_every_steps`` the deterministic agent plays one
  episode per validation seed (never a training seed) — or the later window of a journal
  (walk-forward: train on the earlier part, a gap, validate on the later part) — and the
  model with the best mean Sharpe is kept at ``out``; the last model goes beside it;
- **TensorBoard** logs of SB3's losses, episode rewards and each finished training
  episode's Sharpe, return, drawdown and turnover (``episode/*``), and the validation
  figures (``validation/*``);
- **metadata** beside each saved model (:mod:`strategies.ppo`): instruments, action scale,
  observation schema and its hash, redacted settings, configs and training figures, so
  ``ppo:PATH`` refuses to run on an engine whose observations mean something else.

:func:`evaluate_policies` is the headline comparison: PPO, buy-and-hold and the trend
policy through the backtester (:func:`backtest.engine.run_backtest`, the deployment path)
on held-out synthetic seeds, by Sharpe ratio.

The training world (:data:`TRAINING_WORLD`) is the default synthetic market — its regimes,
drifts, basis and funding — sampled every 5 minutes instead of every second, with trades
and option surfaces thinned to match. The agent decides every 8 hours and an episode is 30 days,
long enough to hold a carry position across 90 funding payments and to meet a crash in
about a quarter of the episodes; at 1-second steps that much simulated time would cost ~30×
more replay. Market settings do not enter the observation schema, so the agent runs on any
world; the decision interval does, so it runs at the interval it was trained with.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import math
import multiprocessing
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import gymnasium as gym
import stable_baselines3
import structlog
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.utils import set_random_seed
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv, VecMonitor

from backtest.gym_env import EnvConfig, SeedRange, TradingEnv
from backtest.reward import RewardConfig
from bot.journal import read_events
from config.settings import Settings, load_settings
from strategies.base import Policy, load_policy
from strategies.ppo import (
    METADATA_FORMAT,
    METADATA_VERSION,
    file_sha256,
    metadata_path,
    observation_schema,
    schema_hash,
)
from strategies.ppo_network import EpisodeNoiseCallback, EpisodeNoisePolicy, RecentFramesExtractor

NANOS_PER_SECOND = 1_000_000_000
# The default market at 5-minute steps, one trade per instrument per ~8 min, a surface every 15 min
# (the surface features' freshness limit, so every decision sees the option market).
TRAINING_WORLD: dict[str, Any] = {"step_s": 300.0, "trade_rate_per_s": 0.002, "surface_interval_s": 900.0}
# The agent's instruments: BTC spot and perpetual, so it can hold spot against the perp (carry).
TRAINING_INSTRUMENTS = ["SYNTH:BTCUSDT", "SYNTH:BTCUSDT-PERP"]
# The headline's seeds: never in a training or validation pool (TrainConfig checks).
TEST_SEEDS = SeedRange(start=900_000, count=20)


class PPOConfig(BaseModel):
    """PPO hyperparameters (SB3 names)."""

    model_config = ConfigDict(extra="forbid")

    learning_rate: float = Field(3e-4, gt=0)
    n_steps: int = Field(180, ge=8, description="steps per environment between updates (two episodes)")
    batch_size: int = Field(90, ge=2)
    n_epochs: int = Field(5, ge=1, description="passes over each rollout: more fits the rollout's noise")
    gamma: float = Field(
        0.9, gt=0, le=1, description="0.9: ~10 decisions (3 days); a position is re-decided every step"
    )
    gae_lambda: float = Field(0.9, gt=0, le=1)
    clip_range: float = Field(0.2, gt=0)
    ent_coef: float = Field(0.0, ge=0)
    vf_coef: float = Field(0.5, gt=0)
    max_grad_norm: float = Field(0.5, gt=0)
    net_arch: list[int] = Field(default_factory=lambda: [64, 64], min_length=1)
    log_std_init: float = Field(
        -1.5,
        description="initial log std of the actions: wide enough to cross the no-trade band, not to churn",
    )
    frames: int | None = Field(
        1, ge=1, description="newest rows of the state window the network reads; None: the whole window"
    )
    inputs: list[str] | None = Field(
        default_factory=lambda: ["market.{instrument}.funding"],
        min_length=1,
        description=(
            "globs of the feature names the network reads of each row (feature order kept; "
            "{instrument} stands for each traded instrument); None: all. The observation stays the "
            "full state, so the model runs on the same schema"
        ),
    )
    episode_noise: bool = Field(
        True, description="exploration noise drawn once per episode (held offsets) instead of every step"
    )
    use_sde: bool = Field(False, description="state-dependent exploration (gSDE) instead of per-step noise")
    sde_sample_freq: int = Field(
        -1, ge=-1, description="with gSDE: steps between noise draws; -1 once per rollout"
    )


class WalkForwardConfig(BaseModel):
    """How a journal is split: the earlier ``train_fraction`` to train on, a gap, the rest to validate."""

    model_config = ConfigDict(extra="forbid")

    train_fraction: float = Field(0.7, gt=0, lt=1)
    gap_s: float = Field(3600.0, ge=0, description="event time left out between the two windows")


def default_training_env() -> EnvConfig:
    """30 days of decisions every 8 hours (one per funding payment) after a 3-day warm-up.

    ±0.5 of equity in BTC spot and perp; starts spread over one funding interval. The reward
    penalises variance (volatility target near zero) rather than steering to a volatility
    level, and hard (100 per unit of squared step return: an unhedged half-equity position in
    the bull market costs ~10× its drift), so a hedged position that earns little but steadily
    is preferred to an outright one that earns as much. Its window is a day (3 steps), so a
    step's variance is charged within a day of the step rather than only once a 60-step window
    has filled. No leverage charge: spot against perp is 1× gross by design, and the risk
    engine's limits bind anyway; the venue's fees are the turnover cost, plus 2 bps.
    """
    return EnvConfig(
        episode_decisions=90,
        warmup_decisions=9,
        decision_interval_s=28_800.0,
        instruments=list(TRAINING_INSTRUMENTS),
        max_exposure=0.5,
        max_start_offset_s=28_800.0,
        reward=RewardConfig(
            target_vol=0.01,
            vol_penalty=100.0,
            vol_window=3,
            turnover_penalty=0.0002,
            leverage_penalty=0.0,
            benchmark=TRAINING_INSTRUMENTS[0],
        ),
    )


class TrainConfig(BaseModel):
    """One training run: budget, seeds, data, validation, outputs and PPO's hyperparameters."""

    model_config = ConfigDict(extra="forbid")

    timesteps: int = Field(
        5_000,
        ge=1,
        description=(
            "agent decisions to train on, over all environments (~15 min on 2 cores); validation Sharpe "
            "peaked at 2,500 and fell after it in every longer run"
        ),
    )
    seed: int = Field(0, ge=0, description="seed of torch, SB3, PPO and the environments' episode draws")
    n_envs: int = Field(2, ge=1, description="environments, each in its own process when more than one")
    env: EnvConfig = Field(default_factory=default_training_env)
    world: dict[str, Any] = Field(
        default_factory=lambda: dict(TRAINING_WORLD), description="overrides of the market settings"
    )
    rebalance_threshold: float | None = Field(
        0.1,
        gt=0,
        lt=1,
        description=(
            "the order manager's no-trade band (fraction of equity) in training and in the comparison: "
            "exploration noise inside it costs no fees; None keeps the settings' own"
        ),
    )
    validation_seeds: SeedRange = Field(default_factory=lambda: SeedRange(start=500_000, count=12))
    eval_every_steps: int = Field(2_500, ge=1)
    events: Path | None = Field(None, description="train on this journal (walk-forward) instead of synthetic")
    walk_forward: WalkForwardConfig = Field(default_factory=WalkForwardConfig)
    out: Path = Field(Path("var/models/ppo.zip"), description="the best model; metadata beside it")
    tensorboard: bool = True
    progress_bar: bool = True
    ppo: PPOConfig = Field(default_factory=PPOConfig)

    @model_validator(mode="after")
    def _checks(self) -> TrainConfig:
        if self.out.suffix != ".zip":
            raise ValueError(f"out must name a .zip file, got {self.out}")
        pools = {
            "training": self.env.market_seeds,
            "validation": self.validation_seeds,
            "test": TEST_SEEDS,
        }
        names = list(pools)
        for i, first in enumerate(names):
            for second in names[i + 1 :]:
                if pools[first].overlaps(pools[second]):
                    raise ValueError(f"the {first} and {second} seed pools overlap")
        return self


@dataclass(frozen=True)
class ValidationResult:
    """The deterministic agent's episodes on held-out data."""

    sharpe: list[float]
    total_return: list[float]
    reward: list[float]

    @property
    def mean_sharpe(self) -> float:
        return statistics.fmean(sharpe_or_zero(s) for s in self.sharpe)


def sharpe_or_zero(sharpe: float) -> float:
    """A run whose equity never moved has no Sharpe ratio; it counts as 0 in means and comparisons."""
    return sharpe if math.isfinite(sharpe) else 0.0


def quiet_logging(level: int = logging.ERROR) -> None:
    """Replays log every order and risk verdict: in training only errors are worth the time."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(level))


# --- environments ---------------------------------------------------------------------------------


def world_settings(
    settings: Settings,
    world: dict[str, Any],
    decision_interval_s: float | None,
    rebalance_threshold: float | None = None,
) -> Settings:
    """``settings`` in a synthetic ``world`` (market overrides), deciding every ``decision_interval_s``.

    The risk engine refuses orders on data older than ``stale_after_s``; in a world that
    quotes every ``step_s`` that must allow for one step in flight, so it becomes at least
    two steps; equity snapshots come at most once a step (the portfolio changes no faster).
    ``rebalance_threshold`` replaces the order manager's when given.
    """
    market = type(settings.market).model_validate({**settings.market.model_dump(), **world})
    snapshot_s = max(settings.run.snapshot_interval_s, market.step_s)
    run_update: dict[str, float] = {"snapshot_interval_s": snapshot_s}
    if decision_interval_s is not None:
        run_update["decision_interval_s"] = decision_interval_s
    run = settings.run.model_copy(update=run_update)
    risk = settings.risk.model_copy(
        update={"stale_after_s": max(settings.risk.stale_after_s, 2.0 * market.step_s)}
    )
    orders = settings.orders
    if rebalance_threshold is not None:
        orders = orders.model_copy(update={"rebalance_threshold": rebalance_threshold})
    return settings.model_copy(update={"market": market, "run": run, "risk": risk, "orders": orders})


def training_settings(settings: Settings, config: TrainConfig) -> Settings:
    """``settings`` in the training world, with the environment's decision interval and trade band."""
    return world_settings(settings, config.world, config.env.decision_interval_s, config.rebalance_threshold)


def walk_forward_windows(journal: Path, config: WalkForwardConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """(train, validation) windows of event time: the earlier part, a gap, the later part."""
    first = last = None
    for event in read_events(journal):
        first = event.ts_recv if first is None else first
        last = event.ts_recv
    if first is None or last is None or last <= first:
        raise ValueError(f"journal {journal} has no span of events to split")
    split = first + int((last - first) * config.train_fraction)
    validation_start = split + round(config.gap_s * NANOS_PER_SECOND)
    if validation_start >= last:
        raise ValueError(
            f"journal {journal} is too short for a {config.gap_s} s gap after the training window"
        )
    return (first, split), (validation_start, last)


def _env_factory(settings: Settings, env_config: EnvConfig, in_subprocess: bool) -> Callable[[], gym.Env]:
    def make() -> gym.Env:
        if in_subprocess:
            torch.set_num_threads(1)
            quiet_logging()
        return TradingEnv(settings, env_config)

    return make


def make_vec_env(settings: Settings, env_config: EnvConfig, n_envs: int) -> VecEnv:
    """``n_envs`` environments: in worker processes (one torch thread each) when more than one."""
    if n_envs == 1:
        return VecMonitor(DummyVecEnv([_env_factory(settings, env_config, in_subprocess=False)]))
    factories = [_env_factory(settings, env_config, in_subprocess=True) for _ in range(n_envs)]
    return VecMonitor(SubprocVecEnv(factories))


def _validation_setup(settings: Settings, config: TrainConfig) -> tuple[EnvConfig, EnvConfig, list[dict]]:
    """Training and validation environment configs, and the reset options of the validation episodes."""
    if config.events is None:
        episodes = [{"market_seed": s, "start_offset_s": 0.0} for s in config.validation_seeds.seeds()]
        return config.env, config.env, episodes
    (train_start, train_end), (valid_start, valid_end) = walk_forward_windows(
        config.events, config.walk_forward
    )
    train_env = config.env.model_copy(
        update={
            "journal": config.events,
            "window_start_ns": train_start,
            "window_end_ns": train_end,
            "max_start_offset_s": (train_end - train_start) / NANOS_PER_SECOND,
        }
    )
    valid_env = config.env.model_copy(
        update={
            "journal": config.events,
            "window_start_ns": valid_start,
            "window_end_ns": valid_end,
            "max_start_offset_s": 0.0,
            "episode_decisions": 10**9,  # the whole window: the data ends it
        }
    )
    return train_env, valid_env, [{"start_offset_s": 0.0}]


def validate(model: PPO, env: TradingEnv, episodes: Sequence[dict[str, Any]]) -> ValidationResult:
    """Play one deterministic episode per reset-options dict; Sharpe, return and reward of each."""
    sharpe, returns, rewards = [], [], []
    for options in episodes:
        observation, _ = env.reset(options=dict(options))
        total, done, info = 0.0, False, {}
        while not done:
            action, _ = model.predict(observation, deterministic=True)
            observation, reward, terminated, truncated, info = env.step(action)
            total += float(reward)
            done = terminated or truncated
        sharpe.append(info["episode_metrics"]["sharpe"])
        returns.append(info["episode_metrics"]["total_return"])
        rewards.append(total)
    return ValidationResult(sharpe, returns, rewards)


# --- callbacks ------------------------------------------------------------------------------------


class EpisodeMetricsCallback(BaseCallback):
    """Logs each finished training episode's financial figures to TensorBoard (means per rollout)."""

    KEYS = ("sharpe", "total_return", "max_drawdown", "turnover", "fees", "exposure_time")

    def _on_step(self) -> bool:
        for info in self.locals["infos"]:
            metrics = info.get("episode_metrics")
            if metrics is None:
                continue
            for key in self.KEYS:
                value = metrics[key]
                if math.isfinite(value):
                    self.logger.record_mean(f"episode/{key}", value)
            self.logger.record_mean(f"episode/ended_{info['end_reason']}", 1.0)
        return True


class ValidationCallback(BaseCallback):
    """Every ``every_steps``, and at the end, validates the agent and keeps the best model."""

    def __init__(
        self,
        run_validation: Callable[[PPO], ValidationResult],
        save_best: Callable[[PPO, ValidationResult], None],
        every_steps: int,
    ) -> None:
        super().__init__()
        self.run_validation = run_validation
        self.save_best = save_best
        self.every_steps = every_steps
        self.best: ValidationResult | None = None
        self.latest: ValidationResult | None = None
        self.history: list[tuple[int, float]] = []
        self._last = 0

    def _on_step(self) -> bool:
        if self.num_timesteps - self._last >= self.every_steps:
            self._validate()
        return True

    def _on_training_end(self) -> None:
        if self._last != self.num_timesteps:
            self._validate()

    def _validate(self) -> None:
        self._last = self.num_timesteps
        result = self.latest = self.run_validation(self.model)
        self.history.append((self.num_timesteps, result.mean_sharpe))
        self.logger.record("validation/sharpe_mean", result.mean_sharpe)
        self.logger.record("validation/return_mean", statistics.fmean(result.total_return))
        self.logger.record("validation/reward_mean", statistics.fmean(result.reward))
        self.logger.dump(self.num_timesteps)
        if self.best is None or result.mean_sharpe > self.best.mean_sharpe:
            self.best = result
            self.save_best(self.model, result)


# --- saving ---------------------------------------------------------------------------------------


def save_model(
    model: PPO,
    path: Path,
    *,
    settings: Settings,
    env_config: EnvConfig,
    instruments: Sequence[str],
    train_config: TrainConfig | None = None,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write ``path`` (the model) and its metadata JSON beside it; returns ``path``.

    ``train_config`` and ``training`` (figures of the run) are recorded when the model
    comes from :func:`train_ppo`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    schema = observation_schema(settings)
    metadata = {
        "format": METADATA_FORMAT,
        "version": METADATA_VERSION,
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "algorithm": "PPO",
        "stable_baselines3": stable_baselines3.__version__,
        "torch": torch.__version__,
        "model_sha256": file_sha256(path),
        "instruments": list(instruments),
        "max_exposure": env_config.max_exposure,
        "flatten": env_config.flatten,
        "observation_schema": schema,
        "observation_schema_hash": schema_hash(schema),
        "feature_schema_hash": schema["feature_schema_hash"],
        "settings": settings.redacted_dict(),
        "env": env_config.model_dump(mode="json"),
        "train": None if train_config is None else train_config.model_dump(mode="json"),
        "training": training,
    }
    metadata_path(path).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    return path


def last_model_path(out: Path) -> Path:
    """Where the final model of a run goes, beside the best one."""
    return out.with_name(f"{out.stem}-last.zip")


# --- training -------------------------------------------------------------------------------------


def policy_kwargs(hyper: PPOConfig, env: TradingEnv) -> dict[str, Any]:
    """SB3 policy arguments: the network, the initial action noise and what part of the state it reads."""
    kwargs: dict[str, Any] = {"net_arch": list(hyper.net_arch), "log_std_init": hyper.log_std_init}
    if hyper.frames is not None:
        if not env.config.flatten:
            raise ValueError("ppo.frames needs flattened observations (env.flatten = true)")
        kwargs["features_extractor_class"] = RecentFramesExtractor
        columns = None
        if hyper.inputs is not None:
            columns = input_columns(env.feature_names, hyper.inputs, env.instruments)
        kwargs["features_extractor_kwargs"] = {
            "dim": len(env.feature_names),
            "frames": hyper.frames,
            "columns": columns,
        }
    elif hyper.inputs is not None:
        raise ValueError("ppo.inputs needs ppo.frames (the network reads the newest rows)")
    return kwargs


def input_columns(
    feature_names: Sequence[str], patterns: Sequence[str], instruments: Sequence[str]
) -> list[int]:
    """Indices of the features matching any of ``patterns`` (fnmatch globs), in feature order.

    ``{instrument}`` in a pattern stands for each of ``instruments``; each pattern must match a feature.
    """
    matched: dict[str, set[int]] = {}
    for pattern in patterns:
        globs = [pattern]
        if "{instrument}" in pattern:
            globs = [pattern.replace("{instrument}", instrument) for instrument in instruments]
        matched[pattern] = {
            i for i, name in enumerate(feature_names) if any(fnmatch.fnmatchcase(name, g) for g in globs)
        }
    unmatched = [pattern for pattern, columns in matched.items() if not columns]
    if unmatched:
        raise ValueError(f"ppo.inputs {unmatched} match no feature of the state")
    return sorted(set().union(*matched.values()))


def train_ppo(settings: Settings, config: TrainConfig) -> Path:
    """Train PPO as configured; returns the path of the best model by validation Sharpe (see module)."""
    started = time.perf_counter()
    settings = training_settings(settings, config)
    train_env_config, valid_env_config, validation_episodes = _validation_setup(settings, config)
    set_random_seed(config.seed)
    torch.set_num_threads(1)
    vec_env = make_vec_env(settings, train_env_config, config.n_envs)
    validation_env = TradingEnv(settings, valid_env_config)
    instruments = validation_env.instruments
    hyper = config.ppo
    tensorboard_dir = config.out.parent / "tensorboard" if config.tensorboard else None
    if hyper.episode_noise and hyper.use_sde:
        raise ValueError("ppo.episode_noise and ppo.use_sde are two exploration schemes: choose one")
    model = PPO(
        EpisodeNoisePolicy if hyper.episode_noise else "MlpPolicy",
        vec_env,
        learning_rate=hyper.learning_rate,
        n_steps=hyper.n_steps,
        batch_size=hyper.batch_size,
        n_epochs=hyper.n_epochs,
        gamma=hyper.gamma,
        gae_lambda=hyper.gae_lambda,
        clip_range=hyper.clip_range,
        ent_coef=hyper.ent_coef,
        vf_coef=hyper.vf_coef,
        max_grad_norm=hyper.max_grad_norm,
        use_sde=hyper.use_sde,
        sde_sample_freq=hyper.sde_sample_freq,
        policy_kwargs=policy_kwargs(hyper, validation_env),
        tensorboard_log=str(tensorboard_dir) if tensorboard_dir is not None else None,
        seed=config.seed,
        device="cpu",
        verbose=0,
    )

    def save(model: PPO, path: Path, result: ValidationResult | None) -> None:
        training = {
            "timesteps": int(model.num_timesteps),
            "wall_time_s": round(time.perf_counter() - started, 1),
            "validation_sharpe": None if result is None else result.sharpe,
            "validation_sharpe_mean": None if result is None else result.mean_sharpe,
            "validation_return": None if result is None else result.total_return,
            "validation_history": [{"timesteps": t, "sharpe_mean": s} for t, s in validation.history],
        }
        save_model(
            model,
            path,
            settings=settings,
            env_config=train_env_config,
            instruments=instruments,
            train_config=config,
            training=training,
        )

    validation = ValidationCallback(
        lambda m: validate(m, validation_env, validation_episodes),
        lambda m, result: save(m, config.out, result),
        config.eval_every_steps,
    )
    callbacks: list[BaseCallback] = [EpisodeMetricsCallback(), validation]
    if hyper.episode_noise:
        callbacks.append(EpisodeNoiseCallback())
    try:
        model.learn(
            total_timesteps=config.timesteps,
            callback=CallbackList(callbacks),
            tb_log_name="ppo",
            progress_bar=config.progress_bar,
        )
        save(model, last_model_path(config.out), validation.latest)
    finally:
        vec_env.close()
        validation_env.close()
    return config.out


def train_main(
    settings: Settings,
    *,
    timesteps: int,
    out: Path,
    model: str = "ppo",
    events: Path | None = None,
    synthetic_seed: int | None = None,
) -> int:
    """``main.py --mode train``: train and print where the model went; returns the exit status.

    ``synthetic_seed`` (default ``run.seed``) seeds the run — torch, SB3, PPO and the draws
    of training episodes; ``events`` trains on a journal with a walk-forward split instead of
    the synthetic market. Raises ValueError with a one-line message on bad arguments.
    """
    if model != "ppo":
        raise ValueError(f"unknown model {model!r} (known: ppo)")
    if events is not None and synthetic_seed is not None:
        raise ValueError("give either --events PATH or --synthetic-seed N, not both")
    quiet_logging()
    seed = settings.run.seed if synthetic_seed is None else synthetic_seed
    config = TrainConfig(timesteps=timesteps, out=out, events=events, seed=seed)
    started = time.perf_counter()
    best = train_ppo(settings, config)
    metadata = json.loads(metadata_path(best).read_text())
    print(f"trained {timesteps:,} steps in {time.perf_counter() - started:,.0f} s")
    print(f"best model: {best} (validation Sharpe {metadata['training']['validation_sharpe_mean']:.2f})")
    print(f"last model: {last_model_path(best)}; run it with --policy ppo:{best}")
    return 0


# --- the headline comparison ----------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyComparison:
    """Sharpe ratio of each policy on each held-out seed (undefined Sharpe counted as 0)."""

    seeds: list[int]
    sharpe: dict[str, list[float]]
    days: float

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            name: {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else math.nan,
                "median": statistics.median(values),
                "min": min(values),
                "max": max(values),
            }
            for name, values in self.sharpe.items()
        }

    def wins(self, name: str = "ppo") -> int:
        """Seeds on which ``name`` has a strictly higher Sharpe than every other policy."""
        others = [other for other in self.sharpe if other != name]
        return sum(
            all(self.sharpe[name][i] > self.sharpe[other][i] for other in others)
            for i in range(len(self.seeds))
        )

    def lines(self) -> list[str]:
        rows = [f"Sharpe on {len(self.seeds)} held-out seeds, {self.days:g} days each:"]
        for name, stats in self.summary().items():
            rows.append(
                f"  {name:<6} mean {stats['mean']:+7.2f}  std {stats['std']:6.2f}  "
                f"median {stats['median']:+7.2f}  range [{stats['min']:+.2f}, {stats['max']:+.2f}]"
            )
        for name in self.sharpe:
            rows.append(f"  {name} best of all on {self.wins(name)}/{len(self.seeds)} seeds")
        return rows


def _evaluate_seed(task: tuple[Settings, str, int, float]) -> dict[str, float]:
    """Sharpe of PPO, buy-and-hold (the backtester's benchmark) and trend on one seed."""
    from backtest.engine import run_backtest

    settings, model_spec, seed, days = task
    torch.set_num_threads(1)
    quiet_logging()
    policies: dict[str, Policy] = {
        "ppo": load_policy(model_spec, settings=settings),
        "trend": load_policy("trend", settings=settings),
    }
    scores: dict[str, float] = {}
    for name, policy in policies.items():
        result = run_backtest(settings, synthetic_seed=seed, days=days, policy=policy, progress=False)
        scores[name] = sharpe_or_zero(result.metrics.sharpe)
        scores.setdefault("hold", sharpe_or_zero(result.benchmark_metrics.sharpe))
    return scores


def evaluate_policies(
    settings: Settings,
    model_path: Path,
    seeds: Sequence[int] = TEST_SEEDS.seeds(),
    days: float = 30.0,
    workers: int = 2,
    world: dict[str, Any] | None = None,
) -> PolicyComparison:
    """PPO (``ppo:model_path``) vs buy-and-hold vs trend, by Sharpe, through the backtester on each seed.

    Each seed replays ``days`` of the synthetic market in ``world`` (default: the training
    world) from its start, venue seeded like the market, every policy deciding at the
    model's decision interval and trading with the no-trade band it was trained with; the
    PPO policy is loaded through the policy registry with its schema check, exactly as a
    paper or live run would load it.
    """
    metadata = json.loads(metadata_path(model_path).read_text())
    settings = world_settings(
        settings,
        TRAINING_WORLD if world is None else world,
        metadata["observation_schema"]["decision_interval_s"],
        metadata["settings"]["orders"]["rebalance_threshold"],
    )
    tasks = [
        (
            settings.model_copy(update={"venue": settings.venue.model_copy(update={"seed": seed})}),
            f"ppo:{model_path}",
            seed,
            days,
        )
        for seed in seeds
    ]
    if workers > 1:
        with multiprocessing.get_context("forkserver").Pool(workers) as pool:
            scores = pool.map(_evaluate_seed, tasks)
    else:
        scores = [_evaluate_seed(task) for task in tasks]
    names = ("ppo", "hold", "trend")
    return PolicyComparison(list(seeds), {name: [score[name] for score in scores] for name in names}, days)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m backtest.train {train,evaluate}``: the training run and the headline comparison."""
    parser = argparse.ArgumentParser(prog="python -m backtest.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="TOML settings file (default: config/default.toml)")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train PPO")
    train.add_argument("--timesteps", type=int, default=TrainConfig.model_fields["timesteps"].default)
    train.add_argument("--out", type=Path, default=TrainConfig.model_fields["out"].default)
    train.add_argument("--events", type=Path)
    train.add_argument("--synthetic-seed", type=int)
    evaluate = commands.add_parser("evaluate", help="PPO vs buy-and-hold vs trend on held-out seeds")
    evaluate.add_argument("--model", type=Path, required=True)
    evaluate.add_argument("--seeds", type=int, default=TEST_SEEDS.count, help="first N test seeds")
    evaluate.add_argument("--days", type=float, default=30.0)
    evaluate.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    settings = load_settings(args.config)
    if args.command == "train":
        return train_main(
            settings,
            timesteps=args.timesteps,
            out=args.out,
            events=args.events,
            synthetic_seed=args.synthetic_seed,
        )
    quiet_logging()
    started = time.perf_counter()
    comparison = evaluate_policies(
        settings, args.model, TEST_SEEDS.seeds()[: args.seeds], days=args.days, workers=args.workers
    )
    for line in comparison.lines():
        print(line)
    print(f"per seed: {json.dumps({'seeds': comparison.seeds, **comparison.sharpe})}")
    print(f"evaluated in {time.perf_counter() - started:,.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
