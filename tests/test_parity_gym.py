"""Parity: a gym rollout that plays a policy's own actions is the plain replay of that policy, bit for bit.

The environment must not own a second copy of any component: if it did, its observations,
fills or equity would drift from what :meth:`Engine.feed` (paper, live) and the backtester
produce on the same events.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import structlog
from stable_baselines3 import PPO

from adapters.synthetic import SyntheticMarket
from backtest.engine import run_backtest
from backtest.gym_env import EnvConfig, SeedRange, TradingEnv
from backtest.train import quiet_logging, save_model
from bot.app import Engine, build_engine
from bot.events import Event
from config.settings import Settings, load_settings
from strategies.base import Policy, load_policy
from strategies.ppo import PPOPolicy
from strategies.trend import TrendPolicy

SEED = 17


@pytest.fixture(autouse=True, scope="module")
def quiet_engine_logs() -> Iterator[None]:
    """Replays log every order: keep errors only, then restore whatever logging was configured."""
    saved = structlog.get_config()
    quiet_logging()
    yield
    structlog.configure(**saved)


WARMUP, DECISIONS = 20, 100  # two hours of event time at one decision a minute
DAYS = (WARMUP + DECISIONS) / (24 * 60)


def parity_settings() -> Settings:
    """One market seed ending exactly at the last decision; the venue seeded like the market (as the env)."""
    settings = load_settings(overrides={"market": {"seed": SEED}, "venue": {"seed": SEED}})
    end = settings.market.start_ns + (WARMUP + DECISIONS) * 60 * 1_000_000_000
    return settings.model_copy(update={"market": settings.market.model_copy(update={"until_ns": end})})


def env_config(max_exposure: float = 1.0) -> EnvConfig:
    # more decisions than the data holds: the episode is cut by the data's end, after every event
    return EnvConfig(
        episode_decisions=10 * DECISIONS,
        warmup_decisions=WARMUP,
        market_seeds=SeedRange(start=SEED, count=1),
        max_exposure=max_exposure,
    )


def synthetic_events(settings: Settings) -> Iterator[Event]:
    """What paper mode and the backtester feed: the market's stream, led by its CONNECTED status."""
    return SyntheticMarket(settings.market).events()


def plain_replay(settings: Settings, policy: Policy) -> Engine:
    engine = build_engine(settings, SyntheticMarket(settings.market).instruments(), policy=policy)
    for event in synthetic_events(settings):
        engine.feed(event)
    return engine


def gym_rollout(settings: Settings, policy: Policy, act: object, max_exposure: float = 1.0) -> TradingEnv:
    """Play ``act(env, observation)`` to the end of the data, ``policy`` answering the warm-up."""
    env = TradingEnv(settings, env_config(max_exposure), policy=policy)
    observation, _ = env.reset(seed=0)
    while True:
        observation, _, terminated, truncated, info = env.step(act(env, observation))  # type: ignore[operator]
        if terminated or truncated:
            assert (terminated, info["end_reason"]) == (False, "data_end")
            return env


def assert_same_run(env: TradingEnv, engine: Engine) -> None:
    assert env.engine.fingerprint.fill_count > 5, "parity on a run without fills would prove little"
    assert env.engine.fingerprint.observation_count == engine.fingerprint.observation_count
    assert env.engine.fingerprint.obs_sha256 == engine.fingerprint.obs_sha256
    assert env.engine.fingerprint.fills_sha256 == engine.fingerprint.fills_sha256
    assert env.engine.portfolio.equity() == engine.portfolio.equity()
    assert env.engine.portfolio.cash == engine.portfolio.cash


def trend_actions(env: TradingEnv, observation: np.ndarray) -> np.ndarray:
    return env.action_for(env.policy.act(env.observation))


def test_gym_rollout_of_trend_actions_equals_the_plain_replay() -> None:
    settings = parity_settings()
    env = gym_rollout(settings, TrendPolicy(), trend_actions)
    assert_same_run(env, plain_replay(settings, TrendPolicy()))


def test_gym_rollout_of_trend_actions_equals_the_backtester() -> None:
    settings = parity_settings()
    env = gym_rollout(settings, TrendPolicy(), trend_actions)
    result = run_backtest(settings, synthetic_seed=SEED, days=DAYS, policy=TrendPolicy(), progress=False)
    assert env.engine.fingerprint.fill_count == len(result.fills) > 5
    assert env.engine.fingerprint.obs_sha256 == result.obs_sha256
    assert env.engine.fingerprint.fills_sha256 == result.fills_sha256
    assert env.engine.portfolio.equity() == result.equity[-1].equity


@pytest.fixture(scope="module")
def trading_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained PPO whose mean action is pushed to trade, saved with its metadata."""
    settings = parity_settings()
    config = env_config(max_exposure=0.2)
    env = TradingEnv(settings, config)
    model = PPO("MlpPolicy", env, seed=3, device="cpu", policy_kwargs={"net_arch": [16]})
    # an untrained net's actions are too small to trade, and too steady to change their minds
    model.policy.action_net.bias.data[:] = 0.5
    model.policy.action_net.weight.data *= 300.0
    path = tmp_path_factory.mktemp("model") / "ppo.zip"
    save_model(model, path, settings=settings, env_config=config, instruments=env.instruments)
    return path


def test_ppo_policy_replays_the_agents_gym_rollout(trading_model: Path) -> None:
    settings = parity_settings()
    policy = load_policy(f"ppo:{trading_model}", settings=settings)
    assert isinstance(policy, PPOPolicy)

    def agent(env: TradingEnv, observation: np.ndarray) -> np.ndarray:
        action, _ = policy.model.predict(observation, deterministic=True)
        return action

    env = gym_rollout(settings, policy, agent, max_exposure=policy.max_exposure)
    assert_same_run(env, plain_replay(settings, policy))
