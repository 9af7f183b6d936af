"""Training: a tiny PPO run saves a model and metadata that load as ``ppo:PATH``, or are refused."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import structlog
import torch
from pydantic import ValidationError
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from adapters.synthetic import SyntheticMarket
from backtest.engine import run_backtest
from backtest.gym_env import EnvConfig, SeedRange, TradingEnv
from backtest.train import (
    TRAINING_WORLD,
    PolicyComparison,
    PPOConfig,
    TrainConfig,
    WalkForwardConfig,
    evaluate_policies,
    input_columns,
    last_model_path,
    quiet_logging,
    train_main,
    train_ppo,
    training_settings,
    walk_forward_windows,
    world_settings,
)
from bot.journal import JournalWriter
from config.settings import Settings, load_settings
from strategies.base import load_policy
from strategies.ppo import ModelSchemaError, PPOPolicy, metadata_path, observation_schema, schema_hash
from strategies.ppo_network import EpisodeNoiseCallback, EpisodeNoisePolicy

MINUTE_NS = 60 * 1_000_000_000


@pytest.fixture(autouse=True, scope="module")
def quiet_engine_logs() -> Iterator[None]:
    """Replays log every order: keep errors only, then restore whatever logging was configured."""
    saved = structlog.get_config()
    quiet_logging()
    yield
    structlog.configure(**saved)


def tiny_config(out: Path, **changes: object) -> TrainConfig:
    """Four 8-decision episodes, one update, one validation seed: seconds, not minutes."""
    config = TrainConfig(
        timesteps=32,
        n_envs=1,
        env=EnvConfig(episode_decisions=8, warmup_decisions=2, max_exposure=0.2),
        rebalance_threshold=0.01,
        validation_seeds=SeedRange(start=500_000, count=1),
        eval_every_steps=16,
        out=out,
        progress_bar=False,
        ppo=PPOConfig(n_steps=16, batch_size=16, n_epochs=1, net_arch=[16]),
    )
    return config.model_copy(update=changes)


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings()


@pytest.fixture(scope="module")
def trained(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_ppo(settings, tiny_config(tmp_path_factory.mktemp("run") / "ppo.zip"))


def test_training_saves_best_and_last_models_with_metadata(settings: Settings, trained: Path) -> None:
    assert trained.is_file() and last_model_path(trained).is_file()
    metadata = json.loads(metadata_path(trained).read_text())
    assert metadata["instruments"] == [spec.instrument for spec in settings.trend.instruments]
    assert metadata["max_exposure"] == 0.2 and metadata["flatten"] is True
    schema = observation_schema(settings)
    assert metadata["observation_schema"] == schema
    assert metadata["observation_schema_hash"] == schema_hash(schema)
    assert metadata["feature_schema_hash"] == schema["feature_schema_hash"]
    assert metadata["observation_schema"]["window"] == settings.state.window
    assert metadata["settings"]["market"]["step_s"] == TRAINING_WORLD["step_s"]
    assert metadata["settings"]["orders"]["rebalance_threshold"] == 0.01  # the run's band, not the settings'

    assert "password" not in json.dumps(metadata["settings"]["store"])
    assert len(metadata["training"]["validation_sharpe"]) == 1
    assert metadata["train"]["seed"] == 0 and metadata["training"]["timesteps"] in (16, 32)


def test_tensorboard_has_financial_episode_metrics_and_validation(trained: Path) -> None:
    runs = sorted((trained.parent / "tensorboard").glob("ppo_*"))
    assert runs, "no TensorBoard run written"
    accumulator = EventAccumulator(str(runs[-1]))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"episode/sharpe", "episode/max_drawdown", "episode/turnover"} <= tags
    assert {"validation/sharpe_mean", "rollout/ep_rew_mean", "train/value_loss"} <= tags


def test_trained_model_loads_as_a_policy_and_acts_deterministically(
    settings: Settings, trained: Path
) -> None:
    policy = load_policy(f"ppo:{trained}", settings=settings)
    assert isinstance(policy, PPOPolicy)
    env = TradingEnv(settings, EnvConfig(episode_decisions=2, warmup_decisions=2))
    env.reset(seed=0)
    first, again = policy.act(env.observation), policy.act(env.observation)
    assert first == again
    assert list(first) == list(policy.instruments)
    assert all(-0.2 <= target <= 0.2 for target in first.values())


def mean_action(policy: PPOPolicy, state: np.ndarray) -> np.ndarray:
    """The deterministic action for a ``[window, dim]`` state, as the bot would flatten it."""
    return policy.model.predict(state.reshape(-1), deterministic=True)[0]


def with_inputs(config: TrainConfig, inputs: list[str]) -> TrainConfig:
    return config.model_copy(update={"ppo": config.ppo.model_copy(update={"inputs": inputs})})


def test_the_agent_reads_only_the_newest_row_of_the_state_window(settings: Settings, trained: Path) -> None:
    policy = load_policy(f"ppo:{trained}", settings=settings)
    assert isinstance(policy, PPOPolicy)
    window = settings.state.window
    dim = policy.model.observation_space.shape[0] // window
    state = np.random.default_rng(5).uniform(-2.0, 2.0, (window, dim)).astype(np.float32)
    older_changed = state.copy()
    older_changed[:-1] = -older_changed[:-1]
    newest_changed = state.copy()
    newest_changed[-1] = -newest_changed[-1]

    assert np.array_equal(mean_action(policy, state), mean_action(policy, older_changed))
    assert not np.array_equal(mean_action(policy, state), mean_action(policy, newest_changed))


def test_the_agent_reads_only_the_features_named_in_ppo_inputs(settings: Settings, tmp_path: Path) -> None:
    config = with_inputs(tiny_config(tmp_path / "ppo.zip"), ["*.funding", "position.*"])
    policy = load_policy(f"ppo:{train_ppo(settings, config)}", settings=settings)
    assert isinstance(policy, PPOPolicy)
    names = TradingEnv(settings, EnvConfig(episode_decisions=2, warmup_decisions=2)).feature_names
    read = [i for i, name in enumerate(names) if name.endswith(".funding") or name.startswith("position.")]
    assert policy.model.policy.features_extractor.features_dim == len(read) < len(names)
    shape = (settings.state.window, len(names))
    state = np.random.default_rng(6).uniform(-2.0, 2.0, shape).astype(np.float32)
    unread_changed, read_changed = state.copy(), state.copy()
    unread = [i for i in range(len(names)) if i not in read]
    unread_changed[-1, unread] = -unread_changed[-1, unread]
    read_changed[-1, read] = -read_changed[-1, read]

    assert np.array_equal(mean_action(policy, state), mean_action(policy, unread_changed))
    assert not np.array_equal(mean_action(policy, state), mean_action(policy, read_changed))


def test_instrument_placeholder_in_ppo_inputs_stands_for_each_traded_instrument() -> None:
    names = ["market.A.ret_1m", "market.A-PERP.funding", "market.B-PERP.funding", "position.A.exposure"]
    assert input_columns(names, ["market.{instrument}.funding"], ["A", "A-PERP"]) == [1]
    assert input_columns(names, ["position.*", "market.{instrument}.funding"], ["B-PERP"]) == [2, 3]
    with pytest.raises(ValueError, match="match no feature"):
        input_columns(names, ["market.{instrument}.funding"], ["A"])


def test_ppo_inputs_that_match_no_feature_are_refused(settings: Settings, tmp_path: Path) -> None:
    config = with_inputs(tiny_config(tmp_path / "ppo.zip"), ["*.fundng"])
    with pytest.raises(ValueError, match=r"\['\*\.fundng'\] match no feature"):
        train_ppo(settings, config)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"state": {"window": 8}}, "window 16 → 8"),
        ({"state": {"fixed_scales": {"*.funding": 1e-3}}}, "fixed_scales"),
        ({"run": {"decision_interval_s": 30.0}}, "decision_interval_s 60.0 → 30.0"),
        (
            {"features": {"modules": [{"name": "market", "params": {}}, {"name": "surface", "params": {}}]}},
            "feature_schema_hash",
        ),
    ],
)
def test_a_model_from_another_observation_schema_is_refused(
    trained: Path, overrides: dict, named: str
) -> None:
    other = load_settings(overrides=overrides)
    with pytest.raises(ModelSchemaError) as refused:
        load_policy(f"ppo:{trained}", settings=other)
    message = str(refused.value)
    assert "\n" not in message and named in message and "retrain" in message


def test_a_replaced_model_file_is_refused(settings: Settings, trained: Path, tmp_path: Path) -> None:
    copy = tmp_path / "ppo.zip"
    copy.write_bytes(last_model_path(trained).read_bytes())  # another model under the best one's metadata
    metadata_path(copy).write_text(metadata_path(trained).read_text())
    with pytest.raises(ModelSchemaError, match="sha256"):
        load_policy(f"ppo:{copy}", settings=settings)
    with pytest.raises(ModelSchemaError, match="not found"):
        load_policy(f"ppo:{tmp_path / 'missing.zip'}", settings=settings)


def test_same_seed_trains_the_same_model(settings: Settings, tmp_path: Path) -> None:
    def parameters(name: str) -> dict[str, torch.Tensor]:
        path = train_ppo(settings, tiny_config(tmp_path / name / "ppo.zip", tensorboard=False))
        policy = load_policy(f"ppo:{last_model_path(path)}", settings=settings)
        assert isinstance(policy, PPOPolicy)
        return policy.model.policy.state_dict()

    first, second = parameters("a"), parameters("b")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_seed_pools_must_be_disjoint(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="validation and test"):
        TrainConfig(validation_seeds=SeedRange(start=900_010, count=5))
    with pytest.raises(ValidationError, match="training and validation"):
        TrainConfig(validation_seeds=SeedRange(start=1_500, count=5))
    with pytest.raises(ValidationError, match=r"\.zip"):
        TrainConfig(out=tmp_path / "model.pt")


def write_journal(settings: Settings, path: Path, minutes: int) -> None:
    writer = JournalWriter(path, "test-run", meta={"feed": "synthetic"})
    start = settings.market.start_ns
    for event in SyntheticMarket(settings.market.model_copy(update={"seed": 8})).events():
        if event.ts_recv > start + minutes * MINUTE_NS:
            break
        writer.write(event)
    writer.close()


def test_walk_forward_trains_on_the_earlier_window_and_validates_on_the_later(
    settings: Settings, tmp_path: Path
) -> None:
    journal = tmp_path / "run.jsonl"
    write_journal(settings, journal, minutes=60)
    split = WalkForwardConfig(train_fraction=0.5, gap_s=300.0)
    (train_start, train_end), (valid_start, valid_end) = walk_forward_windows(journal, split)
    start = settings.market.start_ns
    assert train_start == start and valid_end == start + 60 * MINUTE_NS
    assert train_end == start + 30 * MINUTE_NS and valid_start == train_end + 5 * MINUTE_NS

    out = train_ppo(settings, tiny_config(tmp_path / "wf" / "ppo.zip", events=journal, walk_forward=split))
    metadata = json.loads(metadata_path(out).read_text())
    assert metadata["env"]["journal"] == str(journal)
    assert (metadata["env"]["window_start_ns"], metadata["env"]["window_end_ns"]) == (train_start, train_end)
    assert len(metadata["training"]["validation_sharpe"]) == 1
    with pytest.raises(ValueError, match="too short"):
        walk_forward_windows(journal, WalkForwardConfig(train_fraction=0.9, gap_s=3600.0))


def test_train_main_refuses_unknown_models_and_two_sources(settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model 'sac'"):
        train_main(settings, timesteps=10, out=tmp_path / "m.zip", model="sac")
    with pytest.raises(ValueError, match="not both"):
        train_main(
            settings, timesteps=10, out=tmp_path / "m.zip", events=tmp_path / "j.jsonl", synthetic_seed=1
        )


def test_policy_comparison_statistics_and_wins() -> None:
    comparison = PolicyComparison(
        seeds=[1, 2, 3],
        sharpe={"ppo": [1.0, 0.5, -1.0], "hold": [0.0, 0.7, -2.0], "trend": [0.5, 0.1, -1.5]},
        days=0.5,
    )
    summary = comparison.summary()
    assert summary["ppo"]["mean"] == pytest.approx(1 / 6)
    assert summary["hold"]["std"] == pytest.approx(np.std([0.0, 0.7, -2.0], ddof=1))
    assert (comparison.wins("ppo"), comparison.wins("hold"), comparison.wins("trend")) == (2, 1, 0)
    assert any("ppo best of all on 2/3 seeds" in line for line in comparison.lines())


def test_evaluate_policies_scores_ppo_hold_and_trend_through_the_backtester(
    settings: Settings, trained: Path
) -> None:
    days = 1 / 4
    comparison = evaluate_policies(settings, trained, seeds=[900_000], days=days, workers=1)
    assert set(comparison.sharpe) == {"ppo", "hold", "trend"}
    world = world_settings(settings, TRAINING_WORLD, settings.run.decision_interval_s, 0.01)
    direct = run_backtest(
        world.model_copy(update={"venue": settings.venue.model_copy(update={"seed": 900_000})}),
        synthetic_seed=900_000,
        days=days,
        policy="trend",
        progress=False,
    )
    expected_hold = direct.benchmark_metrics.sharpe
    assert comparison.sharpe["hold"] == [expected_hold if math.isfinite(expected_hold) else 0.0]
    assert comparison.sharpe["trend"] == [
        direct.metrics.sharpe if math.isfinite(direct.metrics.sharpe) else 0.0
    ]


def test_episode_noise_holds_one_draw_per_episode_and_trains_like_ppo(settings: Settings) -> None:
    """Actions minus the policy's mean are one σ·ε per episode, redrawn when an episode ends."""
    config = tiny_config(Path("unused.zip"))
    env = TradingEnv(training_settings(settings, config), config.env)
    model = PPO(
        EpisodeNoisePolicy,
        env,
        n_steps=16,
        batch_size=16,
        n_epochs=1,
        seed=3,
        device="cpu",
        policy_kwargs={"net_arch": [16], "log_std_init": -1.0},
    )

    class Record(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.offsets: list[np.ndarray] = []
            self.dones: list[bool] = []

        def _on_step(self) -> bool:
            observation = torch.as_tensor(self.locals["obs_tensor"])
            with torch.no_grad():
                gaussian = self.model.policy.get_distribution(observation).distribution
            offset = (self.locals["actions"] - gaussian.mean.numpy()) / gaussian.stddev.numpy()
            self.offsets.append(offset[0])
            self.dones.append(bool(self.locals["dones"][0]))
            return True

    record = Record()
    before = {k: v.clone() for k, v in model.policy.state_dict().items()}
    model.learn(total_timesteps=32, callback=[EpisodeNoiseCallback(), record])
    # episodes of 8 decisions: the callback order records each step's offset before the redraw
    episodes = np.array(record.offsets).reshape(4, 8, -1)
    assert record.dones == ([False] * 7 + [True]) * 4
    for episode in episodes:
        np.testing.assert_allclose(episode, np.broadcast_to(episode[0], episode.shape), atol=1e-5)
    assert len({tuple(np.round(episode[0], 6)) for episode in episodes}) == 4
    changed = [k for k, v in model.policy.state_dict().items() if not torch.equal(v, before[k])]
    assert changed  # PPO's update ran on the stored actions' likelihoods
    observation, _ = env.reset(seed=0)
    mean, _ = model.predict(observation, deterministic=True)
    with torch.no_grad():
        expected = model.policy.get_distribution(torch.as_tensor(observation[None])).distribution.mean
    np.testing.assert_allclose(mean, np.clip(expected.numpy()[0], -1, 1), atol=1e-6)


def test_episode_noise_needs_its_policy_and_excludes_gsde(settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="choose one"):
        both = PPOConfig(episode_noise=True, use_sde=True)
        train_ppo(settings, tiny_config(tmp_path / "ppo.zip", ppo=both))
    config = tiny_config(Path("unused.zip"))
    env = TradingEnv(training_settings(settings, config), config.env)
    with pytest.raises(TypeError, match="EpisodeNoisePolicy"):
        plain = PPO("MlpPolicy", env, n_steps=16, batch_size=16, device="cpu")
        plain.learn(16, callback=EpisodeNoiseCallback())
