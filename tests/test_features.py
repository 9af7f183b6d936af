"""Feature engine and modules: values against hand-computed references, order, schema, determinism."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
from pydantic import BaseModel, ConfigDict, ValidationError

from bot.bus import EventBus
from bot.events import (
    AggressorSide,
    Event,
    IVSurface,
    MarketData,
    MarkPrice,
    Quote,
    RegimeLabel,
    Trade,
)
from bot.features import base as feature_base
from bot.features.base import (
    SECONDS_PER_YEAR,
    FeatureModule,
    create_feature_module,
    duration_label,
    import_submodules,
    register_feature_module,
)
from bot.features.engine import FeatureEngine, FeatureEngineConfig, FeatureModuleSpec, build_feature_engine
from bot.features.history import PriceHistory, VolumeHistory
from models.grid import LOG_MONEYNESS, MATURITIES

S = 1_000_000_000
T0 = 472_222 * 3600 * S  # an hour boundary, so decision instants are aligned like the app's timers
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def at(seconds: float) -> int:
    return T0 + round(seconds * S)


def quote(instrument: str, t_s: float, mid: float, bid_size: float = 1.0, ask_size: float = 1.0) -> Quote:
    ts = at(t_s)
    half_spread = mid * 1e-5
    return Quote(
        ts_event=ts,
        ts_recv=ts,
        instrument=instrument,
        bid=mid - half_spread,
        bid_size=bid_size,
        ask=mid + half_spread,
        ask_size=ask_size,
    )


def trade(instrument: str, t_s: float, size: float, side: AggressorSide) -> Trade:
    ts = at(t_s)
    return Trade(
        ts_event=ts,
        ts_recv=ts,
        instrument=instrument,
        price=100.0,
        size=size,
        aggressor_side=side,
        trade_id="t",
    )


def mark(instrument: str, t_s: float, index: float, funding: float) -> MarkPrice:
    ts = at(t_s)
    return MarkPrice(
        ts_event=ts,
        ts_recv=ts,
        instrument=instrument,
        mark_price=index,
        index_price=index,
        funding_rate=funding,
        next_funding_ts=ts + 8 * 3600 * S,
    )


def surface(
    t_s: float,
    iv: np.ndarray,
    log_moneyness: np.ndarray = LOG_MONEYNESS,
    maturities: np.ndarray = MATURITIES,
    underlying: str = "BTC",
) -> IVSurface:
    ts = at(t_s)
    return IVSurface(
        ts_event=ts,
        ts_recv=ts,
        underlying=underlying,
        spot=100.0,
        log_moneyness=tuple(float(k) for k in log_moneyness),
        maturities=tuple(float(t) for t in maturities),
        iv=tuple(tuple(float(v) for v in row) for row in iv),
    )


def engine_with(name: str, **params: object) -> tuple[EventBus, FeatureEngine]:
    bus = EventBus()
    engine = build_feature_engine(
        bus, FeatureEngineConfig(modules=[FeatureModuleSpec(name=name, params=params)])
    )
    return bus, engine


def values_at(engine: FeatureEngine, t_s: float) -> dict[str, float]:
    return dict(zip(engine.feature_names, engine.vector(at(t_s)).tolist(), strict=True))


BTC = "SYNTH:BTCUSDT"
PERP = "SYNTH:BTCUSDT-PERP"


class EmptyConfig(BaseModel):
    """Config of the throwaway modules defined in these tests."""

    model_config = ConfigDict(extra="forbid")


# --- histories ---------------------------------------------------------------------------------


def test_price_history_keeps_the_lookback_after_its_ring_wraps() -> None:
    history = PriceHistory(5 * S, 60 * S)
    for second in range(1000):
        history.add(at(second), float(second))
    assert len(history) == history.capacity  # wrapped many times
    instants = np.array([at(1000), at(940), at(1000 - 65), at(0)])
    # As of t: the last price of the bucket starting before t; the oldest one is long gone.
    assert history.asof(instants)[:3].tolist() == [999.0, 939.0, 934.0]
    assert math.isnan(history.asof(instants)[3])
    assert 60.0 <= history.known_span_s(at(1000)) < 70.0


def test_volume_history_sums_the_window_after_its_ring_wraps() -> None:
    flow = VolumeHistory(5 * S, 60 * S)
    for second in range(1000):
        flow.add(at(second), 1.0, 0.5)
    assert flow.totals(at(1000), 60 * S) == (60.0, 30.0)
    assert flow.totals(at(1000), 30 * S) == (30.0, 15.0)


# --- market module ------------------------------------------------------------------------------


def test_returns_from_bucketed_mids_match_hand_computed_log_returns() -> None:
    bus, engine = engine_with("market", instruments=[BTC], perpetuals=[], return_horizons_s=[60, 300])
    for second in range(600):
        bus.feed(quote(BTC, second, 100.0 * math.exp(0.001 * second)))
    values = values_at(engine, 600)
    # As of t=600 the last mid is the one at 599; as of 540 the one at 539; as of 300 the one at 299.
    assert values[f"market.{BTC}.ret_1m"] == pytest.approx(0.001 * 60, rel=1e-9)
    assert values[f"market.{BTC}.ret_5m"] == pytest.approx(0.001 * 300, rel=1e-9)


def test_returns_are_independent_of_how_many_quotes_arrive() -> None:
    """A price that changes once per bucket gives identical features from a sparse and a busy feed."""
    rng = np.random.default_rng(7)
    prices = 100.0 * np.exp(np.cumsum(rng.normal(0.0, 0.002, size=240)))  # one price per 5 s bucket
    sparse_bus, sparse = engine_with("market", instruments=[BTC], perpetuals=[])
    busy_bus, busy = engine_with("market", instruments=[BTC], perpetuals=[])
    for bucket, price in enumerate(prices):
        sparse_bus.feed(quote(BTC, bucket * 5 + 4.0, float(price)))
        for offset in (0.1, 0.7, 1.3, 2.9, 3.3, 4.5, 4.9):
            busy_bus.feed(quote(BTC, bucket * 5 + offset, float(price)))
    assert np.array_equal(sparse.vector(at(1200)), busy.vector(at(1200)))
    assert values_at(sparse, 1200)[f"market.{BTC}.ret_15m"] == pytest.approx(
        math.log(prices[-1] / prices[-1 - 180])
    )


def test_realised_vol_is_annualised_root_sum_of_squared_bucket_returns() -> None:
    rng = np.random.default_rng(3)
    steps = rng.normal(0.0, 0.001, size=120)  # 10 min of 5 s buckets
    log_prices = np.concatenate([[0.0], np.cumsum(steps)])
    bus, engine = engine_with("market", instruments=[BTC], perpetuals=[], vol_windows_s=[300, 3600])
    for bucket, log_price in enumerate(log_prices):
        bus.feed(quote(BTC, bucket * 5 + 2.0, 100.0 * math.exp(log_price)))
    now = 5 * len(log_prices)  # the last price sits in the bucket just before now
    values = values_at(engine, now)
    last_5m = steps[-60:]
    assert values[f"market.{BTC}.rv_5m"] == pytest.approx(
        math.sqrt(np.sum(last_5m**2) * SECONDS_PER_YEAR / 300.0), rel=1e-9
    )
    # The 1 h window is only partly covered: annualise over the covered 600 s, not over the hour.
    assert values[f"market.{BTC}.rv_1h"] == pytest.approx(
        math.sqrt(np.sum(steps**2) * SECONDS_PER_YEAR / 600.0), rel=1e-9
    )
    assert values[f"market.{BTC}.history_s"] == pytest.approx(600.0)


def test_basis_and_funding_come_from_perp_mid_and_mark_index() -> None:
    bus, engine = engine_with("market", instruments=[BTC, PERP], perpetuals=[PERP])
    assert f"market.{BTC}.basis" not in engine.feature_names
    before = values_at(engine, 10)
    assert before[f"market.{PERP}.basis"] == 0.0 and before[f"market.{PERP}.funding"] == 0.0
    bus.feed(quote(PERP, 1.0, 101.0))
    bus.feed(mark(PERP, 2.0, index=100.0, funding=0.0003))
    values = values_at(engine, 10)
    assert values[f"market.{PERP}.basis"] == pytest.approx(0.01, rel=1e-12)
    assert values[f"market.{PERP}.funding"] == 0.0003


def test_order_flow_imbalance_is_signed_aggressor_volume_share_over_the_window() -> None:
    bus, engine = engine_with("market", instruments=[BTC], perpetuals=[], flow_window_s=300)
    bus.feed(trade(BTC, 0.0, 50.0, AggressorSide.BUY))  # more than 300 s before now: outside the window
    bus.feed(trade(BTC, 400.0, 2.0, AggressorSide.BUY))
    bus.feed(trade(BTC, 500.0, 1.0, AggressorSide.SELL))
    bus.feed(trade(BTC, 550.0, 1.0, AggressorSide.BUY))
    bus.feed(trade(BTC, 560.0, 9.0, AggressorSide.NONE))  # no aggressor: not flow
    assert values_at(engine, 600)[f"market.{BTC}.ofi_5m"] == pytest.approx((3.0 - 1.0) / 4.0)
    assert values_at(engine, 2000)[f"market.{BTC}.ofi_5m"] == 0.0  # nothing left in the window


def test_book_imbalance_uses_top_of_book_sizes() -> None:
    bus, engine = engine_with("market", instruments=[BTC], perpetuals=[])
    bus.feed(quote(BTC, 1.0, 100.0, bid_size=3.0, ask_size=1.0))
    assert values_at(engine, 5)[f"market.{BTC}.book_imbalance"] == pytest.approx(0.5)


def test_market_features_are_neutral_zeros_without_data() -> None:
    _, engine = engine_with("market")
    vector = engine.vector(at(3600))
    assert vector.shape == (len(engine.feature_names),) and np.all(vector == 0.0)


def test_returns_stay_zero_until_history_covers_the_horizon() -> None:
    bus, engine = engine_with("market", instruments=[BTC], perpetuals=[], return_horizons_s=[60, 3600])
    for second in range(0, 600, 5):
        bus.feed(quote(BTC, second, 100.0 + second))
    values = values_at(engine, 600)
    assert values[f"market.{BTC}.ret_1h"] == 0.0
    assert values[f"market.{BTC}.ret_1m"] > 0.0
    assert 60.0 <= values[f"market.{BTC}.history_s"] < 3600.0


# --- surface module -----------------------------------------------------------------------------


def linear_surface(
    log_moneyness: np.ndarray, maturities: np.ndarray, a: float, b: float, c: float
) -> np.ndarray:
    """IV = a + b·k + c·T: linear along k, so interpolation along k is exact."""
    return a + b * log_moneyness[:, None] + c * maturities[None, :]


def test_atm_iv_interpolates_in_moneyness_and_in_total_variance_across_maturities() -> None:
    k = np.array([-0.3, -0.1, 0.05, 0.25])  # no node at ATM
    t = np.array([30.0, 60.0, 120.0, 400.0]) / 365.0
    a, b, c = 0.6, -0.4, 0.2
    bus, engine = engine_with("surface", atm_tenors_days=[30, 90])
    bus.feed(surface(0.0, linear_surface(k, t, a, b, c), log_moneyness=k, maturities=t))
    values = values_at(engine, 60)
    assert values["surface.BTC.available"] == 1.0
    assert values["surface.BTC.atm_iv_30d"] == pytest.approx(a + c * t[0], rel=1e-12)
    iv60, iv120 = a + c * t[1], a + c * t[2]
    total_variance = 0.5 * iv60**2 * t[1] + 0.5 * iv120**2 * t[2]  # 90 d sits halfway between 60 and 120
    assert values["surface.BTC.atm_iv_90d"] == pytest.approx(
        math.sqrt(total_variance / (90 / 365)), rel=1e-12
    )


def test_skew_and_term_slope_on_a_linear_surface() -> None:
    a, b, c = 0.7, -0.5, -0.3  # put skew (b < 0), inverted term structure (c < 0)
    bus, engine = engine_with("surface")
    bus.feed(surface(0.0, linear_surface(LOG_MONEYNESS, MATURITIES, a, b, c)))
    values = values_at(engine, 60)
    assert values["surface.BTC.skew_30d"] == pytest.approx(b * (math.log(0.9) - math.log(1.1)), rel=1e-12)
    assert values["surface.BTC.skew_180d"] == pytest.approx(b * (math.log(0.9) - math.log(1.1)), rel=1e-12)
    assert values["surface.BTC.term_slope"] == pytest.approx(c * (180 - 30) / 365, rel=1e-12)


def test_surface_change_level_and_age() -> None:
    base = linear_surface(LOG_MONEYNESS, MATURITIES, 0.6, -0.2, 0.1)
    bus, engine = engine_with("surface", level_halflife_s=3600.0, max_age_s=900.0)
    bus.feed(surface(0.0, base))
    first = values_at(engine, 60)
    assert first["surface.BTC.change_rms"] == 0.0 and first["surface.BTC.atm_iv_vs_level"] == 0.0
    bus.feed(surface(3600.0, base + 0.01))  # one half-life later, every IV up one point
    values = values_at(engine, 3700)
    assert values["surface.BTC.change_rms"] == pytest.approx(0.01, rel=1e-9)
    assert values["surface.BTC.atm_change"] == pytest.approx(0.01, rel=1e-9)
    atm1 = first["surface.BTC.atm_iv_30d"]
    level = atm1 + 0.5 * 0.01
    assert values["surface.BTC.atm_iv_vs_level"] == pytest.approx((atm1 + 0.01) / level - 1.0, rel=1e-9)
    assert values["surface.BTC.age_s"] == pytest.approx(100.0)
    stale = values_at(engine, 3600 + 901)
    assert stale["surface.BTC.available"] == 0.0
    assert stale["surface.BTC.atm_iv_30d"] == 0.0 and stale["surface.BTC.age_s"] == 900.0


def test_invalid_nodes_are_skipped_and_interpolated_over() -> None:
    """Sources mark nodes they could not invert with 0.0 or NaN (deep OTM, short maturities)."""
    a, b, c = 0.6, -0.3, 0.1
    iv = linear_surface(LOG_MONEYNESS, MATURITIES, a, b, c)
    iv[-3:, 0] = 0.0
    iv[3, 0] = float("nan")  # the 30 d ATM node itself
    iv[:, 1] = 0.0
    iv[5, 1] = 0.5  # 60 d keeps one node only: dropped
    bus, engine = engine_with("surface", atm_tenors_days=[30, 90])
    bus.feed(surface(0.0, iv))
    values = values_at(engine, 60)
    assert values["surface.BTC.available"] == 1.0
    assert values["surface.BTC.atm_iv_30d"] == pytest.approx(a + c * MATURITIES[0], rel=1e-12)
    assert values["surface.BTC.atm_iv_90d"] == pytest.approx(a + c * MATURITIES[2], rel=1e-12)
    assert values["surface.BTC.skew_30d"] == pytest.approx(b * (math.log(0.9) - math.log(1.1)), rel=1e-12)


def test_surface_of_another_underlying_or_without_usable_nodes_is_ignored() -> None:
    bus, engine = engine_with("surface")
    bus.feed(surface(0.0, np.full((10, 6), 0.5), underlying="ETH"))
    bus.feed(surface(1.0, np.zeros((10, 6))))
    bus.feed(surface(2.0, np.full((10, 6), float("nan"))))
    bus.feed(surface(3.0, np.full((10, 5), 0.5), maturities=MATURITIES))  # shape does not match the axes
    assert np.all(engine.vector(at(60)) == 0.0)


# --- pseudo surface -----------------------------------------------------------------------------


def test_pseudo_surface_moments_match_numpy_and_scipy() -> None:
    rng = np.random.default_rng(11)
    minutes = 70
    log_prices = np.cumsum(rng.standard_t(df=4, size=minutes + 1) * 0.003)
    bus, engine = engine_with("pseudo_surface", instrument="SYNTH:DOGEUSDT", windows_s=[900, 3600])
    for minute, log_price in enumerate(log_prices):
        bus.feed(quote("SYNTH:DOGEUSDT", minute * 60 - 2.0, 0.1 * math.exp(log_price)))
    now = 60 * minutes
    values = values_at(engine, now)
    for window, label in ((900, "15m"), (3600, "1h")):
        returns = np.diff(log_prices[-(window // 60 + 1) :])
        prefix = "pseudo_surface.SYNTH:DOGEUSDT."
        per_year = SECONDS_PER_YEAR / 60.0
        assert values[f"{prefix}mean_{label}"] == pytest.approx(np.mean(returns) * per_year, rel=1e-9)
        assert values[f"{prefix}var_{label}"] == pytest.approx(np.var(returns) * per_year, rel=1e-9)
        assert values[f"{prefix}skew_{label}"] == pytest.approx(scipy.stats.skew(returns), rel=1e-9)
        assert values[f"{prefix}kurt_{label}"] == pytest.approx(scipy.stats.kurtosis(returns), rel=1e-9)


def test_pseudo_surface_is_neutral_with_too_few_or_constant_returns() -> None:
    bus, engine = engine_with("pseudo_surface")
    for minute in range(3):
        bus.feed(quote("SYNTH:DOGEUSDT", minute * 60 - 2.0, 0.1))
    assert np.all(engine.vector(at(180))[:-1] == 0.0)
    for minute in range(3, 30):
        bus.feed(quote("SYNTH:DOGEUSDT", minute * 60 - 2.0, 0.1))
    vector = engine.vector(at(1800))
    assert np.all(vector[:-1] == 0.0) and vector[-1] > 0.0  # flat price: moments 0, history known


# --- engine: order, schema, determinism, isolation, extension ----------------------------------


def test_default_feature_order_is_modules_in_config_order_each_in_declared_order() -> None:
    _, engine = engine_with("market")
    bus = EventBus()
    default = build_feature_engine(bus)
    names = default.feature_names
    assert names[: len(engine.feature_names)] == engine.feature_names
    assert names[0] == "market.SYNTH:BTCUSDT.ret_1m"
    modules = [name.split(".", 1)[0] for name in names]
    assert modules == sorted(modules, key=["market", "surface", "pseudo_surface", "position"].index)
    assert len(set(names)) == len(names) == default.dim
    assert default.schema()["feature_names"] == list(names)


def test_schema_hash_changes_with_module_config_and_order() -> None:
    bus = EventBus()
    default = build_feature_engine(bus).schema_hash()
    assert build_feature_engine(EventBus()).schema_hash() == default
    horizons = FeatureEngineConfig(
        modules=[
            FeatureModuleSpec(name="market", params={"return_horizons_s": [60, 300]}),
            FeatureModuleSpec(name="surface"),
            FeatureModuleSpec(name="pseudo_surface"),
        ]
    )
    halflife = FeatureEngineConfig(
        modules=[
            FeatureModuleSpec(name="market"),
            FeatureModuleSpec(name="surface", params={"level_halflife_s": 60.0}),  # same names, new meaning
            FeatureModuleSpec(name="pseudo_surface"),
        ]
    )
    reordered = FeatureEngineConfig(
        modules=[FeatureModuleSpec(name=n) for n in ("surface", "market", "pseudo_surface")]
    )
    hashes = {
        build_feature_engine(EventBus(), config).schema_hash() for config in (horizons, halflife, reordered)
    }
    assert len(hashes) == 3 and default not in hashes
    explicit_defaults = FeatureEngineConfig(
        modules=[
            FeatureModuleSpec(name="market", params={"bucket_s": 5}),
            FeatureModuleSpec(name="surface"),
            FeatureModuleSpec(name="pseudo_surface"),
            FeatureModuleSpec(name="position"),
        ]
    )
    assert build_feature_engine(EventBus(), explicit_defaults).schema_hash() == default


def synthetic_stream(seed: int, minutes: int = 30) -> list[Event]:
    """A small seeded market: quotes, trades, marks for two instruments, a surface per minute."""
    rng = np.random.default_rng(seed)
    events: list[Event] = []
    prices = {BTC: 30_000.0, PERP: 30_010.0, "SYNTH:DOGEUSDT": 0.07, "SYNTH:DOGEUSDT-PERP": 0.0701}
    for second in range(minutes * 60):
        for instrument in prices:
            prices[instrument] *= math.exp(rng.normal(0.0, 3e-4))
            events.append(quote(instrument, second + 0.1, prices[instrument], *rng.uniform(0.1, 2.0, 2)))
            side = AggressorSide.BUY if rng.random() < 0.5 else AggressorSide.SELL
            events.append(trade(instrument, second + 0.2, float(rng.uniform(0.01, 1.0)), side))
        if second % 3 == 0:
            events.append(mark(PERP, second + 0.3, prices[BTC], float(rng.normal(1e-4, 5e-5))))
        if second % 60 == 30:
            iv = linear_surface(LOG_MONEYNESS, MATURITIES, 0.6 + rng.normal(0, 0.02), -0.3, 0.05)
            events.append(surface(second + 0.4, iv))
            events.append(
                RegimeLabel(
                    ts_event=at(second), ts_recv=at(second + 0.4), underlying="BTC", regime=1, name="x"
                )
            )
    return events


def run_stream(
    events: list[Event], bus: EventBus | None = None, engine: FeatureEngine | None = None
) -> np.ndarray:
    """Feed the stream, take a vector at every minute boundary (as the decision timer would)."""
    if bus is None or engine is None:
        bus = EventBus()
        engine = build_feature_engine(bus)
    vectors: list[np.ndarray] = []
    bus.clock.set_timer("decision", 60 * S, lambda now: vectors.append(engine.vector(now)))
    for event in events:
        bus.feed(event)
    return np.stack(vectors)


def test_same_events_give_bit_identical_vectors() -> None:
    events = synthetic_stream(seed=5, minutes=20)
    first, second = run_stream(events), run_stream(events)
    assert first.shape == (19, build_feature_engine(EventBus()).dim)  # ticks at minutes 1..19
    assert first.tobytes() == second.tobytes()
    assert np.count_nonzero(first[-1]) > 40  # the stream exercises most features


def test_schema_and_vectors_do_not_depend_on_hash_randomisation() -> None:
    """Two interpreters with different hash seeds agree on the schema hash and on the vectors."""
    script = textwrap.dedent(
        """
        import hashlib, sys
        sys.path.insert(0, sys.argv[1])
        from test_features import build_feature_engine, EventBus, run_stream, synthetic_stream
        vectors = run_stream(synthetic_stream(seed=9, minutes=3))
        print(build_feature_engine(EventBus()).schema_hash(), hashlib.sha256(vectors.tobytes()).hexdigest())
        """
    )
    outputs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(PROJECT_ROOT)}
        result = subprocess.run(
            [sys.executable, "-c", script, str(Path(__file__).parent)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            cwd=PROJECT_ROOT,
        )
        outputs.add(result.stdout.strip())
    assert len(outputs) == 1
    schema_hash, vector_digest = outputs.pop().split()
    assert schema_hash == build_feature_engine(EventBus()).schema_hash()
    in_process = hashlib.sha256(run_stream(synthetic_stream(seed=9, minutes=3)).tobytes()).hexdigest()
    assert vector_digest == in_process


def test_regime_labels_never_reach_a_feature_module() -> None:
    bus = EventBus()
    config = FeatureEngineConfig()
    modules = [create_feature_module(spec.name, spec.params) for spec in config.modules]
    seen: list[type[Event]] = []
    for module in modules:
        original = module.on_event

        def spy(event: Event, original=original) -> None:
            seen.append(type(event))
            original(event)

        module.on_event = spy  # type: ignore[method-assign]
    engine = FeatureEngine(bus, modules)
    events = synthetic_stream(seed=2, minutes=3)
    with_labels = run_stream(events, bus, engine)
    assert RegimeLabel not in seen and IVSurface in seen and Quote in seen
    without_labels = run_stream([e for e in events if not isinstance(e, RegimeLabel)])
    assert with_labels.tobytes() == without_labels.tobytes()


@pytest.mark.parametrize("event_type", [RegimeLabel, Event])
def test_engine_refuses_a_module_that_would_receive_regime_labels(event_type: type[Event]) -> None:
    class Leaky(FeatureModule):
        name = "leaky"
        config_type = EmptyConfig

        event_types = (event_type,)  # type: ignore[assignment]
        feature_names = ("x",)  # type: ignore[assignment]

        def on_event(self, event: Event) -> None: ...

        def compute(self, now_ns: int) -> dict[str, float]:
            return {"x": 0.0}

    with pytest.raises(ValueError, match="RegimeLabel"):
        FeatureEngine(EventBus(), [Leaky(EmptyConfig())])


def test_a_module_file_dropped_in_a_package_is_found_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One-file extension: a new module file registers itself; the config names it; the engine uses it."""
    monkeypatch.setattr(feature_base, "_REGISTRY", dict(feature_base._REGISTRY))
    package = tmp_path / "extra_features"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "last_trade.py").write_text(
        textwrap.dedent(
            """
            from pydantic import BaseModel, ConfigDict
            from bot.events import Trade
            from bot.features.base import FeatureModule, register_feature_module

            class LastTradeConfig(BaseModel):
                model_config = ConfigDict(extra="forbid")
                instrument: str = "SYNTH:BTCUSDT"

            @register_feature_module("last_trade")
            class LastTrade(FeatureModule):
                config_type = LastTradeConfig

                def __init__(self, config):
                    super().__init__(config)
                    self.price = 0.0

                event_types = (Trade,)
                feature_names = ("price",)

                def on_event(self, event):
                    if event.instrument == self.config.instrument:
                        self.price = event.price

                def compute(self, now_ns):
                    return {"price": self.price}
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_submodules("extra_features") == ["extra_features.last_trade"]
    config = FeatureEngineConfig(
        modules=[
            FeatureModuleSpec(name="market"),
            FeatureModuleSpec(name="last_trade", params={"instrument": BTC}),
        ]
    )
    bus = EventBus()
    engine = build_feature_engine(bus, config)
    assert engine.feature_names[-1] == "last_trade.price"
    bus.feed(trade(BTC, 1.0, 1.0, AggressorSide.BUY))
    assert engine.vector(at(2))[-1] == 100.0
    with pytest.raises(ValidationError):
        FeatureModuleSpec(name="last_trade", params={"instrument": BTC, "typo": 1})
    sys.modules.pop("extra_features.last_trade", None)
    sys.modules.pop("extra_features", None)


def test_unknown_module_or_bad_params_fail_at_config_time() -> None:
    with pytest.raises(ValidationError, match="unknown feature module"):
        FeatureModuleSpec(name="nope")
    with pytest.raises(ValidationError):
        FeatureModuleSpec(name="market", params={"instruments": ["not-an-id"]})
    with pytest.raises(ValidationError):
        FeatureModuleSpec(name="market", params={"vol_windows_s": [301]})  # not a multiple of the bucket


def test_non_finite_module_output_is_replaced_by_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(feature_base, "_REGISTRY", dict(feature_base._REGISTRY))

    @register_feature_module("broken")
    class Broken(FeatureModule):
        config_type = EmptyConfig
        event_types = (MarketData,)  # type: ignore[assignment]
        feature_names = ("bad", "good")  # type: ignore[assignment]

        def on_event(self, event: Event) -> None: ...

        def compute(self, now_ns: int) -> dict[str, float]:
            return {"bad": float("nan"), "good": 2.0}

    _, engine = engine_with("broken")
    assert engine.vector(at(0)).tolist() == [0.0, 2.0]


def test_duration_labels() -> None:
    assert [duration_label(s) for s in (30, 60, 900, 3600, 14400, 2_592_000, 90)] == [
        "30s",
        "1m",
        "15m",
        "1h",
        "4h",
        "30d",
        "90s",
    ]
    with pytest.raises(ValueError):
        duration_label(1.5)


def test_schema_is_json_with_module_configs() -> None:
    engine = build_feature_engine(EventBus())
    schema = json.loads(json.dumps(engine.schema()))
    assert [m["name"] for m in schema["modules"]] == ["market", "surface", "pseudo_surface", "position"]
    assert schema["modules"][1]["config"]["underlying"] == "BTC"
    canonical = json.dumps(schema, sort_keys=True, separators=(",", ":"))
    assert hashlib.sha256(canonical.encode()).hexdigest() == engine.schema_hash()
