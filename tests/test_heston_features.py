"""The ``heston`` feature module: calibrated parameters of the latest surface, deltas, freshness, replay."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from adapters.synthetic import SyntheticMarket
from bot.bus import EventBus
from bot.events import IVSurface
from bot.features.engine import FeatureEngineConfig, FeatureModuleSpec, build_feature_engine
from bot.features.heston import HestonFeatures, HestonFeaturesConfig
from models import grid
from models.heston import PARAM_NAMES, HestonParams, iv_surface
from models.surrogate import ParameterDomain, SurrogateConfig, generate_surfaces, train_surrogate

T0 = 1_767_225_600_000_000_000
SECOND = 1_000_000_000
CALM = HestonParams(kappa=2.0, theta=0.25, sigma=0.8, rho=-0.6, v0=0.36)
STRESSED = HestonParams(kappa=1.0, theta=0.4, sigma=1.5, rho=-0.3, v0=0.8)


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
    module.on_event(IVSurface(**{**{f: getattr(event, f) for f in event.__struct_fields__},
                                 "iv": tuple(tuple(row) for row in damaged)}))
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


def test_surrogate_method_fits_a_surface_of_the_surrogate_itself(tmp_path: Path) -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        domain = ParameterDomain()
        config = SurrogateConfig(n_train=1024, n_val=256, seed=1, width=32, n_blocks=2, epochs=20,
                                 batch_size=64, lr=5e-3, warmup_epochs=1, cache_dir=None, progress=False)
        train = generate_surfaces(domain, 1024, seed=3, progress=False)
        val = generate_surfaces(domain, 256, seed=4, progress=False)
        model = train_surrogate(config, domain, train, val)
        path = model.save(tmp_path / "surrogate.pt")
        truth = CALM.to_array()
        market = model.predict(truth[None, :])[0]
        module = HestonFeatures(HestonFeaturesConfig(method="surrogate", surrogate_path=path))
        event = surface(CALM, T0)
        module.on_event(IVSurface(**{**{f: getattr(event, f) for f in event.__struct_fields__},
                                     "iv": tuple(tuple(float(v) for v in row) for row in market)}))
        values = features(module, T0 + SECOND)
    finally:
        torch.set_num_threads(previous)
    assert values["BTC.available"] == 1.0 and values["BTC.fit_rmse"] < 1e-4
    np.testing.assert_allclose(params_of(values), truth, rtol=0.05)


def test_surrogate_method_needs_a_model_path() -> None:
    with pytest.raises(ValueError, match="surrogate_path"):
        HestonFeatures(HestonFeaturesConfig(method="surrogate"))
