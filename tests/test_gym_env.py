"""The gym environment: API checks, reproducible resets, actions through the engine, how episodes end."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import structlog
from gymnasium.utils.env_checker import check_env as gymnasium_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from adapters.synthetic import SyntheticMarket
from backtest.gym_env import EnvConfig, ExternalPolicy, SeedRange, TradingEnv
from backtest.reward import RewardConfig, RewardEngine
from backtest.train import make_vec_env, quiet_logging
from bot.events import TargetExposure
from bot.journal import JournalWriter
from config.settings import Settings, load_settings

MINUTE_NS = 60 * 1_000_000_000


@pytest.fixture(autouse=True, scope="module")
def quiet_engine_logs() -> Iterator[None]:
    """Replays log every order: keep errors only, then restore whatever logging was configured."""
    saved = structlog.get_config()
    quiet_logging()
    yield
    structlog.configure(**saved)


def small_config(**changes: object) -> EnvConfig:
    config = EnvConfig(episode_decisions=6, warmup_decisions=3, market_seeds=SeedRange(start=40, count=50))
    return config.model_copy(update=changes)


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings()


def rollout(env: TradingEnv, seed: int, actions: np.ndarray) -> list[tuple[np.ndarray, float, dict]]:
    observation, info = env.reset(seed=seed)
    steps = [(observation, 0.0, info)]
    for action in actions:
        observation, reward, terminated, truncated, info = env.step(action)
        steps.append((observation, reward, info))
        if terminated or truncated:
            break
    return steps


def test_passes_gymnasium_and_sb3_env_checkers(settings: Settings) -> None:
    env = TradingEnv(settings, small_config())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any complaint of either checker fails the test
        gymnasium_check_env(env, skip_render_check=True)
        sb3_check_env(env, warn=True)
    assert env.observation_space.shape == (settings.state.window * len(env.feature_names),)
    assert env.action_space.shape == (len(settings.trend.instruments),)


def test_unflattened_observation_is_the_state_builders_window(settings: Settings) -> None:
    env = TradingEnv(settings, small_config(flatten=False))
    observation, _ = env.reset(seed=0)
    assert observation.shape == (settings.state.window, len(env.feature_names))
    np.testing.assert_array_equal(observation, env.observation.state.astype(np.float32))


def test_same_seed_same_episode_other_seed_other_market(settings: Settings) -> None:
    actions = np.random.default_rng(3).uniform(-1, 1, size=(6, 3))
    first = rollout(TradingEnv(settings, small_config()), 11, actions)
    again = rollout(TradingEnv(settings, small_config()), 11, actions)
    other = rollout(TradingEnv(settings, small_config()), 12, actions)
    assert len(first) == len(again) == 7
    for (obs_a, reward_a, info_a), (obs_b, reward_b, info_b) in zip(first, again, strict=True):
        np.testing.assert_array_equal(obs_a, obs_b)
        assert reward_a == reward_b
        assert info_a["equity"] == info_b["equity"]
    assert first[0][2]["market_seed"] != other[0][2]["market_seed"]
    assert not np.array_equal(first[-1][0], other[-1][0])


def test_market_seeds_come_from_the_pool(settings: Settings) -> None:
    env = TradingEnv(settings, small_config(market_seeds=SeedRange(start=70, count=3)))
    seen = {env.reset(seed=seed)[1]["market_seed"] for seed in range(12)}
    assert seen <= {70, 71, 72} and len(seen) > 1


def test_actions_become_scaled_targets_through_the_decision_loop(settings: Settings) -> None:
    env = TradingEnv(settings, small_config(max_exposure=0.2))
    env.reset(seed=1)
    published: list[TargetExposure] = []
    env.engine.bus.subscribe(TargetExposure, published.append)
    decision_ts = env.observation.ts_ns
    env.step(np.array([1.0, -0.5, math.nan]))
    assert [(t.instrument, t.target) for t in published] == [
        (spec.instrument, target)
        for spec, target in zip(settings.trend.instruments, (0.2, -0.1, 0.0), strict=True)
    ]
    # all at the time of the event that crossed the decision tick, under the engine policy's name
    assert len({t.ts_event for t in published}) == 1
    assert decision_ts <= published[0].ts_event < decision_ts + 1_000_000_000
    assert all(t.policy == "agent" for t in published)


def test_steps_advance_one_decision_interval_and_report_fills(settings: Settings) -> None:
    env = TradingEnv(settings, small_config(max_exposure=0.2))
    _, info = env.reset(seed=2)
    start = info["ts_ns"]
    _, _, _, _, info = env.step(np.array([1.0, 0.0, 1.0]))
    assert info["ts_ns"] - start == MINUTE_NS
    assert info["fills"] == 2 and info["traded_notional"] > 0
    assert info["gross_exposure"] == pytest.approx(0.4, abs=0.03)
    assert info["reward_terms"]["turnover"] > 0


def test_truncated_at_the_episode_length_never_terminated(settings: Settings) -> None:
    env = TradingEnv(settings, small_config(episode_decisions=3))
    env.reset(seed=4)
    flags = [env.step(np.zeros(3))[2:4] for _ in range(3)]
    assert flags == [(False, False), (False, False), (False, True)]
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(3))


def test_truncated_when_the_data_ends(settings: Settings) -> None:
    start = settings.market.start_ns
    short = settings.model_copy(
        update={"market": settings.market.model_copy(update={"until_ns": start + 8 * MINUTE_NS})}
    )
    env = TradingEnv(short, small_config(episode_decisions=100))
    env.reset(seed=0)
    steps = 0
    while True:
        _, _, terminated, truncated, info = env.step(np.zeros(3))
        steps += 1
        if terminated or truncated:
            break
    assert (terminated, truncated, info["end_reason"]) == (False, True, "data_end")
    assert steps == 8 - 3  # decisions at minutes 1..8, the first three answered in the warm-up
    assert info["episode_metrics"]["steps"] == steps


def crash_settings(**risk: float) -> Settings:
    """A crash from the first second, caps lifted so a full position can be bought."""
    return load_settings(
        overrides={
            "market": {"switch_times": [[0.0, 1]]},
            "risk": {"max_order_notional": 1e7, "max_position_notional": 1e7, **risk},
        }
    )


def run_until_done(env: TradingEnv, actions: list[float], seed: int) -> tuple[bool, bool, dict]:
    """Play ``actions`` in a loop until the episode ends."""
    env.reset(seed=seed)
    step = 0
    while True:
        _, _, terminated, truncated, info = env.step(np.array([actions[step % len(actions)]]))
        step += 1
        if terminated or truncated:
            return terminated, truncated, info


def test_kill_switch_halt_terminates(settings: Settings) -> None:
    halting = crash_settings(reduce_drawdown=0.002, max_drawdown=0.004)
    env = TradingEnv(
        halting, small_config(episode_decisions=300), policy=ExternalPolicy(["SYNTH:BTCUSDT-PERP"])
    )
    terminated, truncated, info = run_until_done(env, [0.9], seed=0)
    assert (terminated, truncated) == (True, False)
    assert info["end_reason"] == "halted" and info["risk_state"] == "HALTED"
    assert env.engine.risk.drawdown >= 0.004


def test_ruin_terminates(settings: Settings) -> None:
    env = TradingEnv(
        crash_settings(),
        small_config(episode_decisions=300, ruin_fraction=0.997),
        policy=ExternalPolicy(["SYNTH:BTCUSDT-PERP"]),
    )
    # in and out every minute: fees and slippage alone eat 0.3 % of equity within a few round trips
    terminated, truncated, info = run_until_done(env, [0.9, 0.0], seed=0)
    assert (terminated, truncated, info["end_reason"]) == (True, False, "ruin")
    assert info["equity"] <= 0.997 * 100_000.0
    assert info["risk_state"] != "HALTED"


def test_start_offsets_are_drawn_within_the_bound(settings: Settings) -> None:
    env = TradingEnv(settings, small_config(max_start_offset_s=600.0))
    offsets = set()
    for seed in range(5):
        env.reset(seed=seed)
        assert env.episode_start_ns is not None
        offset = env.episode_start_ns - settings.market.start_ns
        assert 0 <= offset <= 600 * 1_000_000_000
        offsets.add(offset)
    assert len(offsets) == 5


def test_journal_episodes_stay_in_their_window(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    writer = JournalWriter(path, "test-run", meta={"feed": "synthetic"})
    start = settings.market.start_ns
    for event in SyntheticMarket(settings.market.model_copy(update={"seed": 3})).events():
        if event.ts_recv > start + 40 * MINUTE_NS:
            break
        writer.write(event)
    writer.close()
    window = (start + 10 * MINUTE_NS, start + 30 * MINUTE_NS)
    config = small_config(
        journal=path, window_start_ns=window[0], window_end_ns=window[1], max_start_offset_s=300.0
    )
    env = TradingEnv(settings, config)
    observation, info = env.reset(seed=5)
    assert window[0] <= env.episode_start_ns <= window[0] + 300 * 1_000_000_000
    assert info["market_seed"] == -1
    done = False
    while not done:
        _, _, terminated, truncated, info = env.step(np.zeros(3))
        done = terminated or truncated
        assert info["ts_ns"] <= window[1]
    again = TradingEnv(settings, config)
    np.testing.assert_array_equal(again.reset(seed=5)[0], observation)


def test_subprocess_vector_env_with_two_workers(settings: Settings) -> None:
    zeros = np.zeros(3, dtype=np.float32)
    vec_env = make_vec_env(settings, small_config(), n_envs=2)
    try:
        vec_env.seed(21)  # worker i: seed 21 + i
        vec_env.reset()
        ended_at = []
        for step in range(1, 8):  # through an episode end: workers reset themselves
            observations, _, dones, infos = vec_env.step(np.stack([zeros, zeros]))
            if dones.all():
                assert all("episode_metrics" in info and "terminal_observation" in info for info in infos)
                ended_at.append(step)
    finally:
        vec_env.close()
    assert ended_at == [6]
    assert not np.array_equal(observations[0], observations[1])
    for worker in range(2):  # each worker is the same episode stream as an environment in this process
        env = TradingEnv(settings, small_config())
        env.reset(seed=21 + worker)
        for _ in range(6):
            env.step(zeros)
        env.reset()
        np.testing.assert_array_equal(env.step(zeros)[0], observations[worker])



def test_benchmark_reward_removes_the_market_move_of_the_net_exposure(settings: Settings) -> None:
    """Holding the benchmark outright earns its move and nothing else: the excess reward is zero."""
    reward = RewardConfig(
        benchmark="SYNTH:BTCUSDT", vol_penalty=0.0, turnover_penalty=0.0, drawdown_penalty=0.0
    )
    traded = ["SYNTH:BTCUSDT", "SYNTH:BTCUSDT-PERP"]
    config = small_config(instruments=traded, max_exposure=0.5, reward=reward)
    env = TradingEnv(settings, config)
    env.reset(seed=5)
    env.step(np.array([1.0, 0.0]))  # buys spot: fees and the first minute's move are the agent's own
    held = [env.step(np.array([1.0, 0.0]))[4] for _ in range(3)]  # inside the no-trade band: no fills
    assert all(info["fills"] == 0 for info in held)
    assert all(abs(info["reward_terms"]["pnl"]) > 1e-6 for info in held)  # the market moved
    for info in held:
        assert info["reward_terms"]["market"] == pytest.approx(info["reward_terms"]["pnl"], rel=1e-9)
    # spot against perp: the market's move cancels, the step keeps its basis and funding
    env.reset(seed=5)
    env.step(np.array([1.0, -1.0]))
    hedged = env.step(np.array([1.0, -1.0]))[4]["reward_terms"]
    assert abs(hedged["market"]) < 0.05 * max(abs(info["reward_terms"]["market"]) for info in held)


def test_benchmark_must_be_a_traded_instrument(settings: Settings) -> None:
    config = small_config(reward=RewardConfig(benchmark="SYNTH:ETHUSDT"))
    with pytest.raises(ValueError, match="benchmark"):
        TradingEnv(settings, config)


# --- the reward engine ----------------------------------------------------------------------------

STEP_YEARS = 60.0 / (365.0 * 86_400.0)


def quiet_reward(**weights: float) -> RewardEngine:
    """Every penalty off unless given; percent units."""
    off = {"turnover_penalty": 0.0, "drawdown_penalty": 0.0, "leverage_penalty": 0.0, "vol_penalty": 0.0}
    config = RewardConfig(pnl_scale=100.0, **{**off, **weights})
    engine = RewardEngine(config, step_seconds=60.0)
    engine.reset(100.0)
    return engine


def test_reward_is_the_scaled_relative_equity_change() -> None:
    engine = quiet_reward()
    assert engine.step(101.0, 0.0, 0.0).reward == pytest.approx(1.0, rel=1e-12)
    assert engine.step(99.99, 0.0, 0.0).reward == pytest.approx(100 * (99.99 / 101.0 - 1), rel=1e-12)


def test_turnover_costs_per_unit_of_notional_traded() -> None:
    engine = quiet_reward(turnover_penalty=0.001)
    terms = engine.step(100.0, 250.0, 0.0)
    assert terms.turnover == pytest.approx(100 * 0.001 * 2.5, rel=1e-12)
    assert terms.reward == pytest.approx(-terms.turnover, rel=1e-12)


def test_drawdown_is_charged_when_the_maximum_drawdown_grows() -> None:
    engine = quiet_reward(drawdown_penalty=0.5)
    charges = [engine.step(value, 0.0, 0.0).drawdown for value in (90.0, 95.0, 85.0, 110.0, 99.0, 88.0)]
    # 10 % under the peak of 100; recovering is free; 15 % extends the maximum by 5 points; a new
    # peak of 110; 10 % under it is within the maximum; 20 % under it extends the maximum by 5 points
    assert charges == pytest.approx([5.0, 0.0, 2.5, 0.0, 0.0, 2.5], rel=1e-9)
    assert sum(charges) == pytest.approx(100 * 0.5 * 0.20, rel=1e-9)
    assert engine.drawdown == pytest.approx(0.20, rel=1e-12)


def test_leverage_above_one_costs_an_annual_rate_pro_rata() -> None:
    engine = quiet_reward(leverage_penalty=2.0)
    assert engine.step(100.0, 0.0, 0.9).leverage == 0.0
    assert engine.step(100.0, 0.0, 1.5).leverage == pytest.approx(100 * 2.0 * 0.5 * STEP_YEARS, rel=1e-12)


def test_volatility_off_target_once_the_window_is_full() -> None:
    engine = quiet_reward(vol_penalty=3.0, target_vol=0.2, vol_window=3)
    equity = [101.0, 99.99, 100.9899]  # returns +1 %, -1 %, +1 %
    terms = [engine.step(value, 0.0, 0.0) for value in equity]
    assert terms[0].volatility == terms[1].volatility == 0.0 and math.isnan(terms[1].realised_vol)
    returns = [0.01, 99.99 / 101.0 - 1, 100.9899 / 99.99 - 1]
    realised = math.sqrt(sum(r * r for r in returns) / 3 / STEP_YEARS)
    assert terms[2].realised_vol == pytest.approx(realised, rel=1e-12)
    assert terms[2].volatility == pytest.approx(100 * 3.0 * (realised - 0.2) ** 2 * STEP_YEARS, rel=1e-9)
    # the window rolls: the oldest return leaves it
    later = engine.step(100.9899, 0.0, 0.0)
    assert later.realised_vol == pytest.approx(math.sqrt(sum(r * r for r in returns[1:]) / 3 / STEP_YEARS))


def test_market_term_only_with_a_benchmark() -> None:
    plain = quiet_reward().step(101.0, 0.0, 0.0, market_return=0.004)
    assert plain.market == 0.0 and plain.reward == pytest.approx(1.0, rel=1e-12)
    engine = RewardEngine(RewardConfig(benchmark="SYNTH:BTCUSDT", vol_penalty=0.0, turnover_penalty=0.0,
                                       drawdown_penalty=0.0, leverage_penalty=0.0), step_seconds=60.0)
    engine.reset(100.0)
    terms = engine.step(101.0, 0.0, 0.0, market_return=0.004)
    assert terms.market == pytest.approx(0.4, rel=1e-12)
    assert terms.reward == pytest.approx(1.0 - 0.4, rel=1e-12)


def test_reward_sums_its_terms_and_needs_a_reset() -> None:
    engine = RewardEngine(RewardConfig(vol_window=2), step_seconds=60.0)
    with pytest.raises(ValueError, match="reset"):
        engine.step(100.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="positive"):
        engine.reset(0.0)
    engine.reset(100.0)
    engine.step(99.0, 10.0, 1.2)
    terms = engine.step(98.0, 30.0, 1.3)
    parts = terms.pnl - terms.market - terms.turnover - terms.drawdown - terms.leverage - terms.volatility
    assert terms.reward == pytest.approx(parts, rel=1e-12)
    assert min(terms.turnover, terms.drawdown, terms.leverage, terms.volatility) > 0
