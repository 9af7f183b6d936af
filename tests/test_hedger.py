"""The world-model hedger: world features from a tiny trained model, the trigger, limits, replays, loading."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import structlog

from backtest.engine import run_backtest
from backtest.hedging import WORLD, crash_schedule, evaluation_settings
from backtest.train import quiet_logging
from bot.events import IVSurface
from bot.features.base import NANOS_PER_SECOND
from bot.features.world import WorldFeatures, WorldFeaturesConfig
from config.settings import Settings
from models import grid
from models.heston import HestonParams, iv_surface
from models.simulation import BULL, CRASH, Regime
from models.world_model import WorldModelConfig, surface_sequences, train_world_model
from strategies.base import Observation, load_policy
from strategies.hedger import HedgerConfig, HedgerPolicy

TINY = WorldModelConfig(
    n_paths=48,
    steps=16,
    latent_dim=4,
    channels=8,
    hidden=64,
    vae_epochs=40,
    vae_batch=32,
    dyn_hidden=16,
    dyn_epochs=15,
    dyn_batch=8,
    seed=7,
    max_seconds=60.0,
)
PREFIX = "world.BTC."


@pytest.fixture(autouse=True, scope="module")
def quiet_engine_logs() -> Iterator[None]:
    """Replays log every order: keep errors only, then restore whatever logging was configured."""
    saved = structlog.get_config()
    quiet_logging()
    yield
    structlog.configure(**saved)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny world model trained on the synthetic market's regimes, saved the way the CLI saves one."""
    folder = tmp_path_factory.mktemp("world_model")
    data = surface_sequences(TINY.n_paths, TINY.steps, TINY.dt, seed=3)
    train_world_model(TINY, data).save(folder / "world_model.pt")
    return folder


def surface(regime: Regime, variance: float, ts_s: float) -> IVSurface:
    """The IV surface the synthetic market shows in ``regime`` at ``variance``, ``ts_s`` after the epoch."""
    p = regime.params
    iv = iv_surface(HestonParams(p.kappa, p.theta, p.sigma, p.rho, variance), spot=60_000.0)
    ts = round(ts_s * NANOS_PER_SECOND)
    return IVSurface(
        ts_event=ts,
        ts_recv=ts,
        underlying="BTC",
        spot=60_000.0,
        log_moneyness=tuple(grid.LOG_MONEYNESS),
        maturities=tuple(grid.MATURITIES),
        iv=tuple(tuple(row) for row in np.asarray(iv).tolist()),
        source="synthetic",
    )


def observation(features: dict[str, float], ts_ns: int = 0) -> Observation:
    names = tuple(features)
    return Observation(ts_ns, np.zeros((1, len(names))), features, names, ())


def ratio_after(policy: HedgerPolicy, features: dict[str, float]) -> float:
    """The hedge ratio the policy holds after deciding on ``features``."""
    policy.act(observation(features))
    return policy.hedge_ratio


def world(signal: float, name: str = "tail_atm_iv") -> dict[str, float]:
    """World features with one fresh reading of ``name``."""
    values = {PREFIX + f: 0.0 for f in ("age_s", "energy", "tail_energy", "atm_iv", "tail_atm_iv", "history")}
    return {**values, PREFIX + "available": 1.0, PREFIX + name: signal}


def test_crash_surfaces_raise_the_imagined_tail_and_the_hedge(model_dir: Path) -> None:
    module = WorldFeatures(WorldFeaturesConfig(model_path=model_dir, history_interval_s=3600.0))
    policy = HedgerPolicy()
    ratios, tails = [], []
    for k, (regime, variance) in enumerate([(BULL, 0.02)] * 6 + [(CRASH, 0.16)] * 6):
        module.on_event(surface(regime, variance, 600.0 * k))
        values = {f"world.{name}": value for name, value in module.compute(round(600.0 * k * 1e9)).items()}
        tails.append(values[PREFIX + "tail_atm_iv"])
        ratios.append(policy.act(observation(values))["SYNTH:BTCUSDT-PERP"])
    assert max(tails[:6]) < 0.25 < 0.30 < min(tails[6:])  # the default band lies between calm and crash
    assert ratios[:6] == [0.0] * 6 and ratios[6:] == [-0.5] * 6


def test_hedge_ratio_rises_with_energy() -> None:
    policy = HedgerPolicy(HedgerConfig(signal="energy", enter_level=20.0, exit_level=10.0))
    ratios = [ratio_after(policy, world(e, "energy")) for e in (2, 8, 15, 25, 40)]
    assert ratios == [0.0, 0.0, 0.0, 1.0, 1.0]


def test_hysteresis_holds_inside_the_band() -> None:
    policy = HedgerPolicy(HedgerConfig(enter_level=0.30, exit_level=0.25))
    inside = [0.26, 0.29, 0.27, 0.295, 0.255] * 4
    off = [ratio_after(policy, world(x)) for x in inside]
    assert set(off) == {0.0}  # never reached enter_level: stays unhedged
    policy.act(observation(world(0.31)))
    on = [ratio_after(policy, world(x)) for x in inside]
    assert set(on) == {1.0}  # on until the signal falls to exit_level
    policy.act(observation(world(0.24)))
    assert policy.hedge_ratio == 0.0


def test_missing_or_stale_readings_hold_the_ratio_and_an_absent_module_is_an_error() -> None:
    policy = HedgerPolicy()
    policy.act(observation(world(0.5)))
    stale = {**world(0.1), PREFIX + "available": 0.0}
    assert policy.act(observation(stale))["SYNTH:BTCUSDT-PERP"] == -0.5
    with pytest.raises(ValueError, match="world"):
        policy.act(observation({"market.x": 1.0}))


def test_targets_keep_the_base_book_and_stay_within_limits() -> None:
    config = HedgerConfig(
        base_targets={"SYNTH:BTCUSDT": 0.8, "SYNTH:BTCUSDT-PERP": 0.4}, max_hedge_ratio=0.75
    )
    policy = HedgerPolicy(config)
    assert policy.instruments == ("SYNTH:BTCUSDT", "SYNTH:BTCUSDT-PERP")
    for level in (0.1, 0.5, 0.2, 0.9):
        targets = policy.act(observation(world(level)))
        assert targets["SYNTH:BTCUSDT"] == 0.8
        assert all(-1.0 <= v <= 1.0 for v in targets.values())
        assert targets["SYNTH:BTCUSDT-PERP"] == pytest.approx(0.4 - policy.hedge_ratio * 1.2)
    assert policy.hedge_ratio == 0.75 and targets["SYNTH:BTCUSDT-PERP"] == pytest.approx(-0.5)


def test_loading_refuses_a_missing_model_or_features_without_it(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no world model at"):
        load_policy(f"hedger:{tmp_path / 'nothing'}")
    with pytest.raises(ValueError, match="hedger:PATH"):
        load_policy("hedger")
    with pytest.raises(ValueError, match=r"\[\[features.modules\]\] name = \"world\""):
        load_policy(f"hedger:{model_dir}", settings=Settings())
    settings = evaluation_settings(Settings(), 1, 1.0, model_dir)
    assert isinstance(load_policy(f"hedger:{model_dir / 'world_model.pt'}", settings=settings), HedgerPolicy)
    with_trend = load_policy(
        f"hedger:{model_dir}", settings=settings.model_copy(update={"hedger": HedgerConfig(trend=True)})
    )
    assert set(with_trend.instruments) == {"SYNTH:BTCUSDT", "SYNTH:BTCUSDT-PERP", "SYNTH:DOGEUSDT-PERP"}
    targets = with_trend.act(observation(world(0.5)))  # no market features: the trend part is flat
    assert targets == {"SYNTH:BTCUSDT": 0.5, "SYNTH:DOGEUSDT-PERP": 0.0, "SYNTH:BTCUSDT-PERP": -0.5}


def test_backtest_end_to_end_hedges_the_crash_and_replays_bit_for_bit(model_dir: Path) -> None:
    world_settings = {**WORLD, "crash_start_fraction": [0.3, 0.3], "crash_mean_days": 1000.0}
    settings = evaluation_settings(Settings(), 910_000, 0.5, model_dir, world_settings)
    assert crash_schedule(910_000, 0.5, world_settings) == [(0.3 * 0.5 * 86_400.0, 1)]
    runs = [
        run_backtest(settings, synthetic_seed=910_000, days=0.5, policy=f"hedger:{model_dir}", progress=False)
        for _ in range(2)
    ]
    first, second = runs
    assert first.strategy.fills_sha256 == second.strategy.fills_sha256
    assert first.strategy.obs_sha256 == second.strategy.obs_sha256
    perp = first.strategy.instruments.index("SYNTH:BTCUSDT-PERP")
    exposures = [point.exposures[perp] for point in first.strategy.equity]
    assert exposures[0] == 0.0 and exposures[-1] == pytest.approx(-0.5, abs=0.05)
    assert first.strategy.risk_state == "ACTIVE"
