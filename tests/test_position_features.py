"""The ``position`` feature module: the account's exposure as the policy sees it."""

from __future__ import annotations

import pytest

from adapters.synthetic import SyntheticMarket, default_instruments
from backtest.engine import run_backtest
from bot.app import build_engine
from bot.events import PortfolioSnapshot, PositionUpdate, Quote
from bot.features.position import PositionFeatures, PositionFeaturesConfig
from config.settings import Settings, load_settings
from strategies.hold import HoldPolicy, HoldPolicyConfig

BTC, PERP = "SYNTH:BTCUSDT", "SYNTH:BTCUSDT-PERP"


def quote(instrument: str, bid: float, ask: float, ts: int = 1) -> Quote:
    return Quote(ts_event=ts, ts_recv=ts, instrument=instrument, bid=bid, bid_size=1.0, ask=ask, ask_size=1.0)


def position(instrument: str, quantity: float, ts: int = 1) -> PositionUpdate:
    return PositionUpdate(
        ts_event=ts, ts_recv=ts, instrument=instrument, quantity=quantity, avg_price=100.0,
        realized_pnl=0.0, unrealized_pnl=0.0,
    )


def snapshot(equity: float, ts: int = 1) -> PortfolioSnapshot:
    return PortfolioSnapshot(
        ts_event=ts, ts_recv=ts, equity=equity, cash=equity, unrealized_pnl=0.0, realized_pnl=0.0,
        fees=0.0, funding=0.0, gross_exposure=0.0,
    )


def test_exposure_is_signed_quantity_times_mid_over_equity_and_zero_until_known() -> None:
    module = PositionFeatures(PositionFeaturesConfig(instruments=[BTC, PERP]))
    assert module.feature_names == (f"{BTC}.exposure", f"{PERP}.exposure")
    module.on_event(position(PERP, -2.0))
    assert module.compute(1) == {f"{BTC}.exposure": 0.0, f"{PERP}.exposure": 0.0}  # no mid, no equity
    module.on_event(quote(PERP, 99.0, 101.0))
    assert module.compute(1)[f"{PERP}.exposure"] == 0.0  # still no equity
    module.on_event(snapshot(1_000.0))
    module.on_event(quote("SYNTH:OTHERUSDT", 1.0, 2.0))  # not configured: ignored
    assert module.compute(1) == {f"{BTC}.exposure": 0.0, f"{PERP}.exposure": -0.2}
    module.on_event(position(PERP, 0.0))
    assert module.compute(1)[f"{PERP}.exposure"] == 0.0


def test_config_refuses_duplicate_and_malformed_instruments() -> None:
    with pytest.raises(ValueError, match="unique"):
        PositionFeaturesConfig(instruments=[BTC, BTC])
    with pytest.raises(ValueError):
        PositionFeaturesConfig(instruments=["BTCUSDT"])


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings()


def test_a_backtest_policy_sees_the_exposure_the_portfolio_holds(settings: Settings) -> None:
    seen: list[tuple[float, float]] = []

    class Recorder(HoldPolicy):
        def targets(self, observation):  # type: ignore[no-untyped-def]
            seen.append((observation.features[f"position.{BTC}.exposure"],
                         observation.features[f"position.{PERP}.exposure"]))
            return super().targets(observation)

    policy = Recorder(HoldPolicyConfig(targets={BTC: 0.3, PERP: -0.3}))
    result = run_backtest(settings, synthetic_seed=7, days=0.02, policy=policy, progress=False)
    assert seen[0] == (0.0, 0.0)  # the first decision: nothing held yet
    spot, perp = seen[-1]
    final = result.equity[-1].exposures
    assert spot == pytest.approx(0.3, abs=0.03) and perp == pytest.approx(-0.3, abs=0.03)
    assert (spot, perp) == pytest.approx(final, abs=0.01)


def test_a_resumed_engine_announces_its_positions_to_the_features(settings: Settings) -> None:
    policy = HoldPolicy(HoldPolicyConfig(targets={BTC: 0.3}))
    first = build_engine(settings, default_instruments(), policy=policy)
    saved = None
    market = SyntheticMarket(settings.market.model_copy(update={"seed": 3}))
    for count, event in enumerate(market.events()):
        first.feed(event)
        if count > 5_000 and first.portfolio.positions:
            first.portfolio.snapshot()
            saved = first.state_dicts()
            break
    assert saved is not None, "the hold policy never filled"
    held = first.portfolio.positions[BTC].quantity

    second = build_engine(settings, default_instruments(), policy=policy)
    module = next(m for m in second.features.modules if isinstance(m, PositionFeatures))
    second.load_state_dicts(saved)
    module.on_event(quote(BTC, 100.0, 100.0))
    module.on_event(snapshot(10_000.0))
    assert module.compute(0)[f"{BTC}.exposure"] == pytest.approx(held * 100.0 / 10_000.0)
