"""Regime detector: selective scan, learning on synthetic paths, metrics, save/load, fine-tuning, feature."""

from __future__ import annotations

import math
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from adapters.synthetic import SyntheticMarket, SyntheticMarketConfig
from bot.events import IVSurface, Quote
from bot.features.regime import RegimeFeatures, RegimeFeaturesConfig
from models.regime import (
    FEATURES,
    IV_FEATURES,
    CloseSampler,
    RegimeConfig,
    RegimeData,
    RegimeDetector,
    VolRule,
    atm_iv,
    bar_features,
    closes_from_events,
    detection_delays,
    evaluate_probabilities,
    false_alarms,
    fine_tune,
    iv_maturity,
    online_probabilities,
    regime_paths,
    roc_auc,
    roc_curve,
    selective_scan,
    trailing_mean,
    train_detector,
)

T0 = 1_767_225_600_000_000_000
MINUTE = 60_000_000_000
SMALL = RegimeConfig(n_bars=1500, window=96, block=32, warmup=24, d_model=8, d_state=4, n_layers=1,
                     dt_rank=2, batch=16, steps=150, lr=1e-2, progress=False, max_seconds=None,
                     features=FEATURES)
SMALL_IV = replace(SMALL, features=IV_FEATURES)


@pytest.fixture(scope="module")
def data() -> tuple[RegimeData, RegimeData]:
    torch.set_num_threads(1)
    return (regime_paths(24, SMALL.n_bars, seed=1, iv_tenor_days=30.0),
            regime_paths(12, SMALL.n_bars, seed=2, iv_tenor_days=30.0))


@pytest.fixture(scope="module")
def ssm(data: tuple[RegimeData, RegimeData]) -> RegimeDetector:
    return train_detector("ssm", data[0], SMALL)


def naive_scan(u: np.ndarray, delta: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray,
               d: np.ndarray) -> np.ndarray:
    """The recurrence element by element, in float64."""
    batch, length, channels = u.shape
    y = np.zeros_like(u)
    for i in range(batch):
        for e in range(channels):
            h = np.zeros(a.shape[1])
            for t in range(length):
                for n in range(a.shape[1]):
                    drive = delta[i, t, e] * b[i, t, n] * u[i, t, e]
                    h[n] = math.exp(delta[i, t, e] * a[e, n]) * h[n] + drive
                y[i, t, e] = float(np.dot(c[i, t], h)) + d[e] * u[i, t, e]
    return y


def test_selective_scan_matches_the_naive_recurrence_across_chunks() -> None:
    g = torch.Generator().manual_seed(0)
    u, delta = torch.randn(2, 37, 3, generator=g), torch.rand(2, 37, 3, generator=g)
    a = -torch.rand(3, 4, generator=g) * 3
    b, c = torch.randn(2, 37, 4, generator=g), torch.randn(2, 37, 4, generator=g)
    d = torch.randn(3, generator=g)
    expected = naive_scan(*(x.double().numpy() for x in (u, delta, a, b, c, d)))
    for chunk in (8, 256):
        got = selective_scan(u, delta, a, b, c, d, chunk=chunk).double().numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_simulated_bars_have_exact_labels_and_many_switches(data: tuple[RegimeData, RegimeData]) -> None:
    train, _ = data
    assert train.features.shape == (24, SMALL.n_bars, 2) and set(np.unique(train.labels)) == {0, 1}
    switches = ((train.labels[:, 1:] == 1) & (train.labels[:, :-1] == 0)).sum()
    assert switches >= 24  # ≈ 2 bull → crash switches per path of two months
    # entering a crash jumps the variance to ≥ 0.16: the first crash bar is far wilder than the bar before
    s = np.argwhere((train.labels[:, 1:] == 1) & (train.labels[:, :-1] == 0))
    before, after = train.rv[s[:, 0], s[:, 1] - 1], train.rv[s[:, 0], s[:, 1] + 2]
    assert np.median(after) > 1.5 * np.median(before)


def test_short_training_beats_chance_and_the_vol_rule_on_held_out_seeds(
    data: tuple[RegimeData, RegimeData], ssm: RegimeDetector
) -> None:
    train, test = data
    p = online_probabilities(ssm, test.features)
    m = evaluate_probabilities(p, test.labels, SMALL.warmup, SMALL.bar_s)
    rule = VolRule.fit(train.rv, train.labels, SMALL.vol_windows, SMALL.warmup)
    vol = evaluate_probabilities(rule.alarm(test.rv), test.labels, SMALL.warmup, SMALL.bar_s,
                                 score=rule.score(test.rv))
    assert m["roc_auc"] > 0.7, m
    assert vol["roc_auc"] > 0.6 and rule.window in SMALL.vol_windows
    assert m["detection_rate"] > 0.5


def test_vol_rule_is_a_trailing_mean_with_the_best_youden_threshold() -> None:
    rv = np.array([[1.0, 3.0, 2.0, 8.0, 6.0, 1.0]])
    np.testing.assert_allclose(trailing_mean(rv, 2), [[1.0, 2.0, 2.5, 5.0, 7.0, 3.5]])
    labels = np.array([[0, 0, 0, 1, 1, 0]])
    rule = VolRule.fit(rv, labels, windows=(1, 2), warmup=0)
    assert rule.window == 1 and 3.0 <= rule.threshold < 6.0
    np.testing.assert_array_equal(rule.alarm(rv), labels.astype(float))


def test_metrics_on_hand_made_examples() -> None:
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert roc_auc([0.5, 0.5, 0.9], [0, 1, 1]) == pytest.approx(0.75)  # a tie counts half
    fpr, tpr, _ = roc_curve([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1.0, 1.0])
    labels = np.array([0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0])
    prob = np.array([0, 0, 0, 0.6, 0.7, 0.8, 0.1, 0.2, 0.3, 0.9, 0.2])
    np.testing.assert_array_equal(detection_delays(prob, labels), [1.0, math.inf])  # 2nd crash missed
    assert false_alarms(prob, labels) == 1  # 0.3 → 0.9 in bull; 0 → 0.6 was in a crash
    assert false_alarms(prob, labels, start=9) == 0
    m = evaluate_probabilities(prob[None], labels[None], 0, 3600.0)
    assert m["median_delay_bars"] == math.inf and m["detection_rate"] == 0.5
    assert m["false_alarms_per_year"] == pytest.approx(1 / (11 / 8760))


def test_save_load_round_trip_gives_identical_probabilities(
    data: tuple[RegimeData, RegimeData], ssm: RegimeDetector, tmp_path: Path
) -> None:
    gru = train_detector("gru", data[0], replace(SMALL, steps=5))
    window = data[1].features[0, :300]
    for detector in (ssm, gru):
        detector.save(tmp_path)
    loaded = RegimeDetector.load(tmp_path)
    assert loaded.kind == "ssm"
    np.testing.assert_array_equal(loaded.predict_proba(window), ssm.predict_proba(window))
    loaded_gru = RegimeDetector.load(tmp_path / "regime_gru.pt")
    np.testing.assert_array_equal(loaded_gru.predict_proba(window), gru.predict_proba(window))
    with pytest.raises(ValueError, match="no regime detector"):
        RegimeDetector.load(tmp_path / "missing")


def test_fine_tune_on_a_tiny_real_array(ssm: RegimeDetector) -> None:
    rng = np.random.default_rng(3)
    closes = 60_000.0 * np.exp(np.cumsum(rng.normal(0.0, 0.004, 40 * 12 + 1)))
    features, _ = bar_features(closes, 12, 3600.0)
    before = ssm.predict_proba(features)
    tuned = fine_tune(ssm, features, steps=5)
    assert tuned.info["fine_tune"][-1]["targets"].startswith("pseudo-labels")
    np.testing.assert_array_equal(ssm.predict_proba(features), before)  # the pre-trained model is untouched
    assert not np.array_equal(tuned.predict_proba(features), before)
    labelled = fine_tune(ssm, features, labels=np.ones(40), steps=20)
    assert labelled.predict_proba(features)[-20:].mean() > before[-20:].mean()
    assert labelled.info["fine_tune"][-1]["lr"] == pytest.approx(SMALL.lr * SMALL.fine_tune_lr_scale)


def test_close_sampler_carries_prices_forward_and_aligns_bars() -> None:
    sampler = CloseSampler(300, capacity=100)
    sampler.add(T0 + 1 * MINUTE, 10.0)
    sampler.add(T0 + 2 * MINUTE, 11.0)
    sampler.add(T0 + 16 * MINUTE, 12.0)  # buckets 0 and 1 closed (1 carried forward), bucket 3 open
    assert list(sampler.closes) == [11.0, 11.0, 11.0]
    sampler.advance(T0 + 20 * MINUTE)
    assert list(sampler.closes) == [11.0, 11.0, 11.0, 12.0]
    assert sampler.bar_closes(2, 10).tolist() == [11.0, 11.0, 12.0]  # bars of 2 buckets, the close before


def quotes(n_minutes: int, seed: int) -> list[Quote]:
    rng = np.random.default_rng(seed)
    mids = 60_000.0 * np.exp(np.cumsum(rng.normal(0.0, 0.0015, n_minutes)))
    return [Quote(ts_event=T0 + k * MINUTE, ts_recv=T0 + k * MINUTE, instrument=instrument, bid=mid - 1.0,
                  bid_size=1.0, ask=mid + 1.0, ask_size=1.0)
            for k, mid in enumerate(mids) for instrument in ("SYNTH:BTCUSDT", "SYNTH:DOGEUSDT")]


def run_module(path: Path, events: list[Quote]) -> list[tuple[float, ...]]:
    module = RegimeFeatures(RegimeFeaturesConfig(model_path=path, min_bars=24))
    out = []
    for event in events:
        if event.ts_recv % (15 * MINUTE) == 0:
            out.append(tuple(module.compute(event.ts_recv).values()))
        module.on_event(event)
    return out


def test_feature_module_is_deterministic_and_matches_the_detector(ssm: RegimeDetector,
                                                                  tmp_path: Path) -> None:
    ssm.save(tmp_path)
    events = quotes(5 * 24 * 60, seed=4)
    first, second = run_module(tmp_path, events), run_module(tmp_path, events)
    assert first == second
    assert first[0] == (0.0, 0.0) and first[-1][0] == 1.0
    # the last value is the online probability of the last full hour, from the bars' 5-minute closes
    closes = closes_from_events(events, "SYNTH:BTCUSDT")
    n_bars = (events[-1].ts_recv - T0) // (60 * MINUTE)
    features, _ = bar_features(closes[11 : n_bars * 12], 12, 3600.0)  # bar 0 has no close before it
    last = T0 // (60 * MINUTE) + n_bars - 1  # the bot counts bars from the epoch; features[0] is bar 1
    start = last // SMALL.block * SMALL.block - (SMALL.window - SMALL.block) - (T0 // (60 * MINUTE) + 1)
    expected = ssm.predict_proba(features[max(0, start) :])[-1]
    assert first[-1][1] == pytest.approx(float(expected), abs=1e-6)


def test_online_probabilities_restart_every_block(ssm: RegimeDetector,
                                                  data: tuple[RegimeData, RegimeData]) -> None:
    features = data[1].features[:2, :200]
    online = online_probabilities(ssm, features)
    context, block = SMALL.window - SMALL.block, SMALL.block
    for i in (0, 5, 63, 64, 100, 130, 199):
        lo = max(0, i // block * block - context)
        np.testing.assert_allclose(online[:, i], ssm.predict_proba(features[:, lo : i + 1])[:, -1], atol=1e-6)


def test_feature_module_refuses_a_missing_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs model_path"):
        RegimeFeatures(RegimeFeaturesConfig())
    with pytest.raises(ValueError, match="--model regime"):
        RegimeFeatures(RegimeFeaturesConfig(model_path=tmp_path / "nowhere"))


@pytest.fixture(scope="module")
def ssm_iv(data: tuple[RegimeData, RegimeData]) -> RegimeDetector:
    return train_detector("ssm", data[0], SMALL_IV)


def test_iv_does_not_change_the_price_paths_and_is_priced_at_the_bar_close(
    data: tuple[RegimeData, RegimeData]
) -> None:
    train = data[0]
    plain = regime_paths(2, 200, seed=1)
    with_iv = regime_paths(2, 200, seed=1, iv_tenor_days=30.0)
    np.testing.assert_array_equal(with_iv.features, plain.features)
    assert plain.atm_iv is None and with_iv.atm_iv is not None and with_iv.atm_iv.shape == (2, 200)
    assert iv_maturity(30.0) == pytest.approx(30 / 365) and iv_maturity(40.0) == pytest.approx(30 / 365)
    assert train.inputs(IV_FEATURES).shape == (24, SMALL.n_bars, 3)
    # implied vol in a crash is far above the bull's: the surface reflects the regime's parameters
    assert np.median(train.atm_iv[train.labels == 1]) > 1.5 * np.median(train.atm_iv[train.labels == 0])
    with pytest.raises(ValueError, match="not simulated"):
        plain.inputs(IV_FEATURES)


def test_a_small_iv_model_beats_chance_and_round_trips_its_metadata(
    data: tuple[RegimeData, RegimeData], ssm_iv: RegimeDetector, tmp_path: Path
) -> None:
    train, test = data
    inputs = test.inputs(IV_FEATURES)
    p = online_probabilities(ssm_iv, inputs)
    m = evaluate_probabilities(p, test.labels, SMALL.warmup, SMALL.bar_s)
    assert m["roc_auc"] > 0.7, m
    rule = VolRule.fit(train.atm_iv**2, train.labels, (1, *SMALL.vol_windows), SMALL.warmup)
    iv_m = evaluate_probabilities(rule.alarm(test.atm_iv**2), test.labels, SMALL.warmup, SMALL.bar_s,
                                  score=rule.score(test.atm_iv**2))
    assert iv_m["roc_auc"] > 0.6
    ssm_iv.iv_rule = rule
    ssm_iv.save(tmp_path)
    loaded = RegimeDetector.load(tmp_path)
    assert loaded.features == IV_FEATURES and loaded.config.iv_tenor_days == 30.0
    assert loaded.iv_rule == rule and loaded.vol_rule is None
    window = inputs[0, :300]
    np.testing.assert_array_equal(loaded.predict_proba(window), ssm_iv.predict_proba(window))
    with pytest.raises(ValueError, match="features"):
        loaded.predict_proba(test.features[0, :300])  # two columns for a three-feature model
    # a model saved before the IV option has no "features" in its config: it reads prices only
    old = {k: v for k, v in asdict(RegimeConfig()).items() if k != "features"}
    assert RegimeConfig.from_dict(old).features == FEATURES


def test_iv_feature_of_the_module_matches_the_simulation_pricing_on_a_synthetic_market(
    ssm_iv: RegimeDetector, tmp_path: Path
) -> None:
    ssm_iv.save(tmp_path)
    hour = 60 * MINUTE
    start = SyntheticMarketConfig().start_ns
    config = SyntheticMarketConfig(seed=5, step_s=10.0, until_ns=start + 5 * hour,
                                   switch_times=[(2.5 * 3600.0, 1)])  # bull, then a crash
    market = SyntheticMarket(config)
    events, truth = [], []  # truth: (ts, regime, BTC variance) behind each surface
    for event in market.events():
        events.append(event)
        if isinstance(event, IVSurface):
            state = market.debug_state()
            truth.append((event.ts_recv, state.regime, state.variances["BTC"]))

    def run() -> tuple[list[tuple[float, ...]], RegimeFeatures]:
        module = RegimeFeatures(RegimeFeaturesConfig(model_path=tmp_path, min_bars=2))
        out = []
        for event in events:
            if event.ts_recv % hour == 0:
                out.append(tuple(module.compute(event.ts_recv).values()))
            if isinstance(event, module.event_types):
                module.on_event(event)
        out.append(tuple(module.compute(start + 5 * hour).values()))
        return out, module

    first, module = run()
    assert first == run()[0]  # deterministic on replay
    assert first[-1][0] == 1.0 and 0.0 <= first[-1][1] <= 1.0
    got = module.last_inputs
    assert got is not None and got.shape[1] == 3
    # bar b (hours after start) reads the last surface received before its end, priced by the simulation
    ts, regime, variance = (np.array(column) for column in zip(*truth, strict=True))
    bars = np.arange(5 - got.shape[0], 5)
    last = np.array([np.flatnonzero(ts < start + (b + 1) * hour)[-1] for b in bars])
    expected = atm_iv(regime[last], variance[last], iv_maturity(30.0))
    np.testing.assert_allclose(got[:, 2], np.log(expected), rtol=0, atol=1e-9)
    assert set(regime[last]) == {0, 1}  # both regimes were priced
