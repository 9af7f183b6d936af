"""The ``heston`` feature module: calibrated parameters of the latest surface, deltas, freshness, replay."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import models.calibration
from adapters.synthetic import SyntheticMarket
from bot.bus import EventBus
from bot.events import IVSurface
from bot.features.engine import FeatureEngineConfig, FeatureModuleSpec, build_feature_engine
from bot.features.heston import HestonFeatures, HestonFeaturesConfig, pseudo_iv_grid
from models import grid
from models.calibration import CalibrationResult, calibrate
from models.heston import PARAM_NAMES, HestonParams, iv_surface
from models.inverse import InverseConfig, train_inverse
from models.surrogate import (
    ParameterDomain,
    SurrogateConfig,
    SurrogateModel,
    generate_surfaces,
    train_surrogate,
)

T0 = 1_767_225_600_000_000_000
SECOND = 1_000_000_000
CALM = HestonParams(kappa=2.0, theta=0.25, sigma=0.8, rho=-0.6, v0=0.36)
STRESSED = HestonParams(kappa=1.0, theta=0.4, sigma=1.5, rho=-0.3, v0=0.8)
DOMAIN = ParameterDomain()


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def surrogate_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny surrogate trained in a few seconds."""
    config = SurrogateConfig(n_train=1024, n_val=256, seed=1, width=32, n_blocks=2, epochs=20,
                             batch_size=64, lr=5e-3, warmup_epochs=1, cache_dir=None, progress=False)
    train = generate_surfaces(DOMAIN, 1024, seed=3, progress=False)
    val = generate_surfaces(DOMAIN, 256, seed=4, progress=False)
    return train_surrogate(config, DOMAIN, train, val).save(tmp_path_factory.mktemp("surrogate") / "s.pt")


@pytest.fixture(scope="module")
def inverse_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny inverse model (~20 s): a fair first guess, not a final answer."""
    config = InverseConfig(n_train=4096, n_val=512, seed=3, epochs=15, batch_size=128, lr=3e-3,
                           cache_dir=None, progress=False)
    train = generate_surfaces(DOMAIN, 4096, 101, progress=False)
    val = generate_surfaces(DOMAIN, 512, 202, progress=False)
    return train_inverse(config, DOMAIN, train, val).save(tmp_path_factory.mktemp("inverse") / "i.pt")


def surface(params: HestonParams, ts: int, underlying: str = "BTC") -> IVSurface:
    iv = iv_surface(params)
    return IVSurface(
        ts_event=ts,
        ts_recv=ts,
        underlying=underlying,
        spot=50_000.0,
        log_moneyness=tuple(grid.LOG_MONEYNESS),
        maturities=tuple(grid.MATURITIES),
        iv=tuple(tuple(float(v) for v in row) for row in iv),
    )


def with_iv(event: IVSurface, iv: np.ndarray | list[list[float]]) -> IVSurface:
    return IVSurface(**{**{f: getattr(event, f) for f in event.__struct_fields__},
                        "iv": tuple(tuple(float(v) for v in row) for row in iv)})


def features(module: HestonFeatures, now: int) -> dict[str, float]:
    values = module.compute(now)
    assert list(values) == list(module.feature_names)
    return values


def params_of(values: dict[str, float], prefix: str = "BTC.") -> np.ndarray:
    return np.array([values[prefix + name] for name in PARAM_NAMES])


def test_engine_fit_recovers_the_parameters_and_the_deltas_follow() -> None:
    module = HestonFeatures(HestonFeaturesConfig())
    assert set(features(module, T0).values()) == {0.0}  # nothing yet: neutral, unavailable
    module.on_event(surface(CALM, T0))
    first = features(module, T0 + SECOND)
    assert first["BTC.available"] == 1.0 and first["BTC.feller"] == 1.0 and first["BTC.fit_rmse"] < 1e-5
    np.testing.assert_allclose(params_of(first), CALM.to_array(), rtol=1e-4)
    assert all(first[f"BTC.d_{name}"] == 0.0 for name in PARAM_NAMES)

    module.on_event(surface(STRESSED, T0 + 60 * SECOND))
    second = features(module, T0 + 61 * SECOND)
    np.testing.assert_allclose(params_of(second), STRESSED.to_array(), rtol=1e-4)
    assert second["BTC.feller"] == 0.0  # 2·1.0·0.4 < 1.5²
    deltas = np.array([second[f"BTC.d_{name}"] for name in PARAM_NAMES])
    np.testing.assert_allclose(deltas, params_of(second) - params_of(first), rtol=0, atol=1e-12)


def test_other_underlyings_are_ignored_and_old_fits_expire() -> None:
    module = HestonFeatures(HestonFeaturesConfig(max_age_s=300.0))
    module.on_event(surface(CALM, T0, underlying="ETH"))
    assert features(module, T0 + SECOND)["BTC.available"] == 0.0
    module.on_event(surface(CALM, T0))
    assert features(module, T0 + 300 * SECOND)["BTC.available"] == 1.0
    assert set(features(module, T0 + 301 * SECOND).values()) == {0.0}


def test_nodes_a_source_could_not_invert_are_left_out_of_the_fit() -> None:
    event = surface(CALM, T0)
    damaged = [list(row) for row in event.iv]
    damaged[0][0], damaged[9][5], damaged[4][2] = 0.0, float("nan"), 0.0
    module = HestonFeatures(HestonFeaturesConfig())
    module.on_event(with_iv(event, damaged))
    values = features(module, T0 + SECOND)
    np.testing.assert_allclose(params_of(values), CALM.to_array(), rtol=1e-4)


def test_replayed_synthetic_market_gives_identical_heston_features() -> None:
    """Through the feature engine on the synthetic market's surfaces: available, bit-identical twice."""
    from config.settings import load_settings

    settings = load_settings(overrides={"market": {"seed": 5}})
    config = FeatureEngineConfig(modules=[FeatureModuleSpec(name="heston")])

    def run() -> list[np.ndarray]:
        bus = EventBus()
        engine = build_feature_engine(bus, config)
        vectors = []
        end = settings.market.start_ns + 181 * SECOND
        for event in SyntheticMarket(settings.market).events():
            if event.ts_recv > end:
                break
            bus.feed(event)
            if isinstance(event, IVSurface):
                vectors.append(engine.vector(event.ts_recv + SECOND))
        return vectors

    first, second = run(), run()
    assert len(first) == 4  # a surface a minute, the first at the start
    names = build_feature_engine(EventBus(), config).feature_names
    available = names.index("heston.BTC.available")
    rmse = names.index("heston.BTC.fit_rmse")
    assert all(vector[available] == 1.0 for vector in first)
    assert all(vector[rmse] < 1e-3 for vector in first)  # the market prices its surfaces with Heston itself
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_surrogate_method_fits_a_surface_of_the_surrogate_itself(surrogate_path: Path) -> None:
    truth = CALM.to_array()
    market = SurrogateModel.load(surrogate_path).predict(truth[None, :])[0]
    module = HestonFeatures(HestonFeaturesConfig(method="surrogate", surrogate_path=surrogate_path))
    module.on_event(with_iv(surface(CALM, T0), market))
    values = features(module, T0 + SECOND)
    assert values["BTC.available"] == 1.0 and values["BTC.fit_rmse"] < 1e-4
    np.testing.assert_allclose(params_of(values), truth, rtol=0.05)


def test_surrogate_method_needs_a_model_path() -> None:
    with pytest.raises(ValueError, match="surrogate_path"):
        HestonFeatures(HestonFeaturesConfig(method="surrogate"))


def test_inverse_method_reads_parameters_close_to_the_truth_deterministically(inverse_path: Path) -> None:
    """A tiny model: the level (theta, v0) is read well, the weakly identified kappa only roughly."""
    config = HestonFeaturesConfig(method="inverse", inverse_path=inverse_path)
    runs = []
    for _ in range(2):
        module = HestonFeatures(config)
        module.on_event(surface(CALM, T0))
        runs.append(features(module, T0 + SECOND))
    values = runs[0]
    assert runs[0] == runs[1]
    assert values["BTC.available"] == 1.0 and 0.0 < values["BTC.fit_rmse"] < 0.03
    unit_error = np.abs(DOMAIN.to_unit(params_of(values)) - DOMAIN.to_unit(CALM.to_array()))
    assert (unit_error < [0.45, 0.1, 0.25, 0.25, 0.1]).all(), dict(zip(PARAM_NAMES, unit_error, strict=True))


def test_inverse_warm_start_reaches_the_cold_fit_in_fewer_iterations(
    inverse_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    strikes = np.exp(grid.LOG_MONEYNESS)
    module = HestonFeatures(HestonFeaturesConfig(method="inverse+engine", inverse_path=inverse_path))
    fits: list[CalibrationResult] = []

    def recorded(*args: object, **kwargs: object) -> CalibrationResult:
        fits.append(calibrate(*args, **kwargs))  # type: ignore[arg-type]
        return fits[-1]

    monkeypatch.setattr(models.calibration, "calibrate", recorded)
    for n, params in enumerate((CALM, STRESSED)):
        cold = calibrate(iv_surface(params), 1.0, strikes, grid.MATURITIES)
        module.on_event(surface(params, T0 + n * 60 * SECOND))
        values = features(module, T0 + (n * 60 + 1) * SECOND)
        assert fits[-1].iterations < cold.iterations
        assert values["BTC.fit_rmse"] <= cold.rmse_iv + 1e-6
        np.testing.assert_allclose(params_of(values), params.to_array(), rtol=1e-3)


def test_inverse_methods_need_a_usable_model(tmp_path: Path, surrogate_path: Path) -> None:
    with pytest.raises(ValueError, match="needs inverse_path"):
        HestonFeaturesConfig(method="inverse+engine")
    with pytest.raises(ValueError, match="is not a file"):
        HestonFeatures(HestonFeaturesConfig(method="inverse", inverse_path=tmp_path / "missing.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a model")
    for wrong in (garbage, surrogate_path):
        with pytest.raises(ValueError, match="not a usable model"):
            HestonFeatures(HestonFeaturesConfig(method="inverse", inverse_path=wrong))
    with pytest.raises(ValueError, match="not a usable model"):
        HestonFeatures(HestonFeaturesConfig(method="surrogate", surrogate_path=garbage))


def test_pseudo_iv_grid_follows_the_moments_and_waits_for_every_window() -> None:
    windows = [3600, 900, 14400]  # config order need not be sorted
    moments = np.array([[0.0, 0.16, 0.0, 0.0], [0.0, 0.25, 0.0, 0.0], [0.0, 0.09, 0.0, 0.0]])
    flat = pseudo_iv_grid(moments, windows)
    assert flat is not None and flat.shape == grid.SHAPE
    np.testing.assert_allclose(flat[:, 0], 0.5)  # shortest window (900 s) at the shortest tenor
    np.testing.assert_allclose(flat[:, -1], 0.3)  # longest window at the longest tenor
    skewed = pseudo_iv_grid(moments + np.array([0.0, 0.0, -0.5, 1.0]), windows)
    assert skewed is not None and (skewed[0] > skewed[3]).all()  # negative skew lifts low strikes
    assert ((skewed >= 0.5 * flat) & (skewed <= 2.0 * flat)).all()
    moments[2, 1] = 0.0
    assert pseudo_iv_grid(moments, windows) is None


DOGE = "SYNTH:DOGEUSDT"


def two_heston_modules(inverse_path: Path, doge_method: str = "inverse+engine") -> FeatureEngineConfig:
    return FeatureEngineConfig(modules=[
        FeatureModuleSpec(name="heston", params={"method": "inverse", "inverse_path": str(inverse_path)}),
        FeatureModuleSpec(name="heston", params={
            "source": "pseudo_surface", "pseudo_surface": {"instrument": DOGE},
            "method": doge_method, "inverse_path": str(inverse_path)}),
    ])


def test_btc_surface_and_doge_pseudo_surface_modules_coexist_and_replay_bit_for_bit(
    inverse_path: Path,
) -> None:
    from config.settings import load_settings

    settings = load_settings(overrides={"market": {"seed": 7}})
    config = two_heston_modules(inverse_path)

    def run() -> tuple[tuple[str, ...], list[np.ndarray]]:
        bus = EventBus()
        engine = build_feature_engine(bus, config)
        vectors, next_decision = [], settings.market.start_ns + 300 * SECOND
        for event in SyntheticMarket(settings.market).events():
            if event.ts_recv >= next_decision:
                vectors.append(engine.vector(next_decision))
                next_decision += 60 * SECOND
                if len(vectors) == 6:
                    break
            bus.feed(event)
        return engine.feature_names, vectors

    (names, first), (_, second) = run(), run()
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert len(set(names)) == len(names) == 26
    assert {"heston.BTC.kappa", f"heston.{DOGE}.kappa"} <= set(names)
    doge = np.array([[v[names.index(f"heston.{DOGE}.{f}")] for f in ("available", *PARAM_NAMES, "fit_rmse")]
                     for v in first])
    assert np.isfinite(doge).all() and (doge[:, 0] == 1.0).all() and (doge[:, 1:6] != 0.0).all()
    assert len({tuple(row) for row in doge}) == len(doge)  # refitted at each new return step


def test_two_heston_modules_on_the_same_source_are_refused() -> None:
    config = FeatureEngineConfig(modules=[FeatureModuleSpec(name="heston"), FeatureModuleSpec(name="heston")])
    with pytest.raises(ValueError, match="appear twice"):
        build_feature_engine(EventBus(), config)


# --- trained models in paper mode -------------------------------------------------------------


def stored_features(url: str, config: FeatureEngineConfig) -> dict[str, float]:
    """Each feature's running mean from the run's last checkpoint (the normaliser's state)."""
    from bot.store import Store

    async def fetch() -> dict[str, dict[str, object]] | None:
        store = Store(url)
        await store.open()
        try:
            return await store.latest_component_states(mode="paper")
        finally:
            await store.close()

    states = asyncio.run(fetch())
    assert states is not None
    mean = states["state_builder"]["normalizer"]["mean"]  # type: ignore[index]
    return dict(zip(build_feature_engine(EventBus(), config).feature_names, mean, strict=True))


def assert_heston_available(means: dict[str, float], prefix: str) -> None:
    fields = ("available", *PARAM_NAMES, "fit_rmse")
    values = np.array([means[f"heston.{prefix}.{field}"] for field in fields])
    assert np.isfinite(values).all() and values[0] > 0.0 and (values[1:6] != 0.0).all(), values


def test_a_paper_session_runs_the_surrogate_fit(tmp_path: Path, surrogate_path: Path) -> None:
    from bot.app import PaperOptions, PaperSession
    from config.settings import load_settings

    url = f"sqlite:///{tmp_path / 'volbot.db'}"
    heston = {"name": "heston", "params": {"method": "surrogate", "surrogate_path": str(surrogate_path)}}
    settings = load_settings(overrides={
        "store": {"url": url},
        "journal": {"dir": str(tmp_path / "journal")},
        "logging": {"dir": str(tmp_path / "logs"), "console": False},
        "run": {"var_dir": str(tmp_path / "var")},
        "features": {"modules": [*FeatureEngineConfig().model_dump()["modules"], heston]},
    })
    summary = asyncio.run(PaperSession(settings, PaperOptions(duration_s=3.0, speed=600.0)).run())
    assert summary.status == "completed" and summary.decisions >= 5
    assert_heston_available(stored_features(url, settings.features), "BTC")


def test_the_cli_paper_run_loads_inverse_models_for_btc_and_doge(tmp_path: Path, inverse_path: Path) -> None:
    """``python main.py --mode paper --duration 5 --speed 600 --config FILE`` with two heston modules."""
    modules = "".join(f'[[features.modules]]\nname = "{name}"\nparams = {{}}\n\n'
                      for name in ("market", "surface", "pseudo_surface"))
    modules += (
        f'[[features.modules]]\nname = "heston"\n'
        f'params = {{ method = "inverse", inverse_path = "{inverse_path}" }}\n\n'
        f'[[features.modules]]\nname = "heston"\nparams = {{ source = "pseudo_surface", pseudo_surface = '
        f'{{ instrument = "{DOGE}" }}, method = "inverse", inverse_path = "{inverse_path}" }}\n'
    )
    config_file = tmp_path / "heston.toml"
    config_file.write_text(f"[features]\n{modules}")
    db = tmp_path / "volbot.db"
    env = dict(os.environ) | {
        "VOLBOT_LOGGING__DIR": str(tmp_path / "logs"),
        "VOLBOT_JOURNAL__DIR": str(tmp_path / "journal"),
        "VOLBOT_RUN__VAR_DIR": str(tmp_path / "var"),
    }
    result = subprocess.run(
        [sys.executable, "main.py", "--mode", "paper", "--duration", "5", "--speed", "600",
         "--config", str(config_file), "--db", f"sqlite:///{db}"],
        cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    from config.settings import load_settings

    means = stored_features(f"sqlite:///{db}", load_settings(config_file).features)
    assert_heston_available(means, "BTC")
    assert_heston_available(means, DOGE)
