"""Policy contract, loader and the trend policy, fed by the real feature engine where it matters."""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.bus import EventBus
from bot.events import Event, IVSurface, Quote
from bot.features.engine import build_feature_engine
from models.grid import LOG_MONEYNESS, MATURITIES
from strategies.base import Observation, Policy, clip_exposure, load_policy
from strategies.trend import TrendInstrument, TrendPolicy, TrendPolicyConfig

S = 1_000_000_000
T0 = 472_222 * 3600 * S
BTC, BTC_PERP, DOGE_PERP = "SYNTH:BTCUSDT", "SYNTH:BTCUSDT-PERP", "SYNTH:DOGEUSDT-PERP"
START = {BTC: 30_000.0, BTC_PERP: 30_010.0, DOGE_PERP: 0.07}


def observe(features: Mapping[str, float], instruments: tuple[str, ...]) -> Observation:
    names = tuple(features)
    return Observation(
        ts_ns=T0,
        state=np.zeros((16, len(names))),
        features=features,
        feature_names=names,
        instruments=instruments,
    )


def iv_surface(t_s: int, atm: float, term: float) -> IVSurface:
    """A surface with put skew; ``term`` > 0 is contango, < 0 inverted."""
    iv = atm - 0.2 * LOG_MONEYNESS[:, None] + term * (MATURITIES[None, :] - MATURITIES[0])
    ts = T0 + t_s * S
    return IVSurface(
        ts_event=ts,
        ts_recv=ts,
        underlying="BTC",
        spot=30_000.0,
        log_moneyness=tuple(LOG_MONEYNESS.tolist()),
        maturities=tuple(MATURITIES.tolist()),
        iv=tuple(tuple(row) for row in iv.tolist()),
    )


def market_features(
    drift_per_s: float,
    minutes: int = 90,
    stressed_surface: bool = False,
    with_surface: bool = True,
) -> dict[str, float]:
    """Raw features at the end of a trending market (5 s quotes, noise ~50 % annualised)."""
    rng = np.random.default_rng(17)
    bus = EventBus()
    engine = build_feature_engine(bus)
    events: list[Event] = []
    log_moves = {instrument: 0.0 for instrument in START}
    for step in range(minutes * 12):
        t_s = step * 5
        for instrument, start in START.items():
            log_moves[instrument] += drift_per_s * 5 + rng.normal(0.0, 2e-4)
            mid = start * math.exp(log_moves[instrument])
            ts = T0 + t_s * S + S
            events.append(
                Quote(
                    ts_event=ts,
                    ts_recv=ts,
                    instrument=instrument,
                    bid=mid * (1 - 1e-5),
                    bid_size=1.0,
                    ask=mid * (1 + 1e-5),
                    ask_size=1.0,
                )
            )
        if with_surface and t_s % 60 == 30:
            last = t_s == minutes * 60 - 30
            events.append(
                iv_surface(t_s, 0.9, -0.3) if stressed_surface and last else iv_surface(t_s, 0.5, 0.1)
            )
    for event in events:
        bus.feed(event)
    vector = engine.vector(T0 + minutes * 60 * S)
    return dict(zip(engine.feature_names, vector.tolist(), strict=True))


def act(policy: Policy, features: Mapping[str, float]) -> dict[str, float]:
    return policy.act(observe(features, policy.instruments))


@pytest.fixture(scope="module")
def uptrend() -> dict[str, float]:
    return market_features(drift_per_s=2e-5)


@pytest.fixture(scope="module")
def downtrend() -> dict[str, float]:
    return market_features(drift_per_s=-2e-5)


def test_trend_follows_a_clear_up_trend(uptrend: dict[str, float]) -> None:
    targets = act(TrendPolicy(), uptrend)
    assert list(targets) == [BTC_PERP, DOGE_PERP, BTC]
    assert targets[BTC_PERP] > 0.3 and targets[BTC] > 0.3 and targets[DOGE_PERP] > 0.15
    assert targets[BTC_PERP] <= 0.5 and targets[DOGE_PERP] <= 0.25  # per-instrument caps


def test_trend_follows_a_clear_down_trend_and_spot_stays_long_only(downtrend: dict[str, float]) -> None:
    targets = act(TrendPolicy(), downtrend)
    assert targets[BTC_PERP] < -0.3 and targets[DOGE_PERP] < -0.15
    assert targets[BTC] == 0.0


def hand_features(z_by_horizon: dict[int, float], rv: float, history_s: float = 3600.0) -> dict[str, float]:
    """Features of one instrument whose returns are ``z`` expected standard deviations per horizon."""
    features = {
        f"market.{BTC_PERP}.ret_{label}": z * rv * math.sqrt(h / (365 * 86400))
        for (h, z), label in zip(z_by_horizon.items(), ("5m", "15m", "1h"), strict=True)
    }
    features |= {f"market.{BTC_PERP}.rv_1h": rv, f"market.{BTC_PERP}.history_s": history_s}
    return features | {
        "surface.BTC.available": 1.0,
        "surface.BTC.atm_iv_vs_level": 0.0,
        "surface.BTC.term_slope": 0.05,
    }


def test_trend_exposure_matches_the_documented_formula() -> None:
    policy = TrendPolicy(
        TrendPolicyConfig(instruments=[TrendInstrument(instrument=BTC_PERP, max_exposure=0.8)])
    )
    # z-scores 1, 3 (capped at 2) and -0.5 → mean of 0.5, 1.0, -0.25; rv 1.0 is twice the 0.5 target.
    targets = act(policy, hand_features({300: 1.0, 900: 3.0, 3600: -0.5}, rv=1.0))
    assert targets[BTC_PERP] == pytest.approx((0.5 + 1.0 - 0.25) / 3 * (0.5 / 1.0) * 0.8, rel=1e-12)
    # Below the vol target the scale stays 1: no leverage beyond max_exposure.
    calm = act(policy, hand_features({300: 2.0, 900: 2.0, 3600: 2.0}, rv=0.2))
    assert calm[BTC_PERP] == pytest.approx(0.8, rel=1e-12)


def test_weak_signal_means_no_position() -> None:
    policy = TrendPolicy(TrendPolicyConfig(instruments=[TrendInstrument(instrument=BTC_PERP)]))
    assert (
        act(policy, hand_features({300: 0.3, 900: 0.3, 3600: 0.3}, rv=0.6))[BTC_PERP] == 0.0
    )  # |0.15| < 0.2
    assert act(policy, hand_features({300: 0.5, 900: 0.5, 3600: 0.5}, rv=0.6))[BTC_PERP] > 0.0  # 0.25 >= 0.2
    assert (
        act(policy, hand_features({300: 2.0, 900: 2.0, 3600: 2.0}, rv=0.0))[BTC_PERP] == 0.0
    )  # no vol known


def test_iv_filter_cuts_exposure_when_iv_spikes_and_the_term_structure_inverts(
    uptrend: dict[str, float],
) -> None:
    stressed = market_features(drift_per_s=2e-5, stressed_surface=True)
    assert stressed["surface.BTC.term_slope"] < -0.02 and stressed["surface.BTC.atm_iv_vs_level"] > 0.25
    assert all(t == 0.0 for t in act(TrendPolicy(), stressed).values())
    half = TrendPolicy(TrendPolicyConfig(risk_off_scale=0.5))
    calm_targets, stressed_targets = act(half, uptrend), act(half, stressed)
    for instrument in half.instruments:
        assert stressed_targets[instrument] == pytest.approx(0.5 * calm_targets[instrument])
        assert calm_targets[instrument] != 0.0


def test_flat_when_features_are_missing(uptrend: dict[str, float]) -> None:
    policy = TrendPolicy()
    assert all(t == 0.0 for t in act(policy, {}).values())
    no_surface = {k: v for k, v in uptrend.items() if not k.startswith("surface.")}
    assert all(t == 0.0 for t in act(policy, no_surface).values())
    optional = TrendPolicy(TrendPolicyConfig(require_surface=False))
    assert act(optional, no_surface)[BTC_PERP] > 0.0
    no_doge = {k: v for k, v in uptrend.items() if DOGE_PERP not in k}
    targets = act(policy, no_doge)
    assert targets[DOGE_PERP] == 0.0 and targets[BTC_PERP] > 0.0


def test_flat_until_history_covers_the_shortest_horizon() -> None:
    early = market_features(drift_per_s=5e-5, minutes=4)  # shortest horizon is 5 min
    assert early[f"market.{BTC_PERP}.ret_1m"] > 0.0
    assert all(t == 0.0 for t in act(TrendPolicy(), early).values())


def test_trend_reads_features_by_name_not_position(uptrend: dict[str, float]) -> None:
    shuffled = dict(reversed(list(uptrend.items())))
    assert act(TrendPolicy(), shuffled) == act(TrendPolicy(), uptrend)


finite_or_not = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 1.0, -1e-300])


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_targets_are_always_within_bounds_and_spot_never_short(data: st.DataObject) -> None:
    policy = TrendPolicy()
    names = [f"market.{i}.{f}" for i in policy.instruments for f in ("ret_5m", "ret_15m", "ret_1h", "rv_1h")]
    names += [f"market.{i}.history_s" for i in policy.instruments]
    names += [f"surface.BTC.{f}" for f in ("available", "atm_iv_vs_level", "term_slope")]
    features = {name: data.draw(finite_or_not, label=name) for name in names}
    targets = act(policy, features)
    assert list(targets) == list(policy.instruments)
    for spec in policy.config.instruments:
        value = targets[spec.instrument]
        assert math.isfinite(value) and -spec.max_exposure <= value <= spec.max_exposure
        if spec.long_only:
            assert value >= 0.0


class Wild(Policy):
    """A policy that proposes whatever it was given, to test the contract's validation."""

    name = "wild"

    def __init__(self, proposal: dict[str, float], instruments: tuple[str, ...]) -> None:
        self.proposal = proposal
        self.instruments = instruments

    def targets(self, observation: Observation) -> dict[str, float]:
        return self.proposal


def test_act_clips_fills_and_validates_targets() -> None:
    policy = Wild({"A": float("nan"), "B": 3.0, "C": -float("inf")}, ("A", "B", "C", "D"))
    assert act(policy, {}) == {"A": 0.0, "B": 1.0, "C": -1.0, "D": 0.0}
    with pytest.raises(ValueError, match="does not trade"):
        act(Wild({"X": 0.5}, ("A",)), {})
    assert clip_exposure(-0.25) == -0.25
    assert math.copysign(1.0, clip_exposure(-0.0)) == 1.0  # a flat target is +0.0, whatever the sign of zero


def test_load_policy_specs() -> None:
    assert isinstance(load_policy("trend"), TrendPolicy)
    custom = TrendPolicyConfig(instruments=[TrendInstrument(instrument=BTC_PERP, max_exposure=0.1)])
    assert load_policy("trend", settings=SimpleNamespace(trend=custom)).instruments == (BTC_PERP,)
    from_dict = load_policy("trend", settings=SimpleNamespace(trend={"horizons_s": [3600, 300]}))
    assert from_dict.config.horizons_s == [300, 3600]
    with pytest.raises(ValueError, match="takes no path"):
        load_policy("trend:var/models/x.zip")
    with pytest.raises(ValueError, match=r"unknown policy .nope.*trend"):
        load_policy("nope:some/path")
    with pytest.raises(ValueError, match="NAME"):
        load_policy(":path")


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        TrendPolicyConfig(instruments=[TrendInstrument(instrument=BTC), TrendInstrument(instrument=BTC)])
    with pytest.raises(ValueError):
        TrendInstrument(instrument=BTC, max_exposure=1.5)
    with pytest.raises(ValueError):
        TrendPolicyConfig(horizons_s=[300, 300])
