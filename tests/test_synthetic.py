"""The synthetic market: determinism, book, funding formula, surface/path consistency, regimes, pacing."""

from __future__ import annotations

import asyncio
import itertools
import math
import time

import numpy as np
import pytest

from adapters.synthetic import (
    DEFAULT_START_NS,
    RegimeConfig,
    SyntheticMarket,
    SyntheticMarketConfig,
    paced,
)
from bot.events import (
    AggressorSide,
    Event,
    IVSurface,
    MarkPrice,
    Quote,
    RegimeLabel,
    Trade,
    encode,
)
from models import grid
from models.heston import HestonParams, iv_surface

S = 1_000_000_000
HOUR = 3_600 * S
SPOT_IDS = ("SYNTH:BTCUSDT", "SYNTH:DOGEUSDT")
PERP_IDS = ("SYNTH:BTCUSDT-PERP", "SYNTH:DOGEUSDT-PERP")


def run(hours: float, **overrides: object) -> tuple[SyntheticMarket, list[Event]]:
    config = SyntheticMarketConfig(**overrides)
    config = config.model_copy(update={"until_ns": config.start_ns + round(hours * HOUR)})
    market = SyntheticMarket(config)
    return market, list(market.events())


@pytest.fixture(scope="module")
def two_hours() -> list[Event]:
    return run(2.0, seed=11)[1]


def test_same_seed_gives_the_same_stream_bit_for_bit_and_another_seed_does_not(
    two_hours: list[Event],
) -> None:
    again = run(2.0, seed=11)[1]
    assert [encode(e) for e in again] == [encode(e) for e in two_hours]
    other = itertools.islice(SyntheticMarket(SyntheticMarketConfig(seed=12)).events(), 200)
    assert [encode(e) for e in other] != [encode(e) for e in two_hours[:200]]


def test_each_random_purpose_has_its_own_stream() -> None:
    """Trades draw from their own generator: switching them off leaves every other event unchanged."""
    with_trades = [e for e in run(0.5, seed=5)[1] if not isinstance(e, Trade)]
    without = run(0.5, seed=5, trade_rate_per_s=0.0)[1]
    assert not any(isinstance(e, Trade) for e in without)
    assert [encode(e) for e in with_trades] == [encode(e) for e in without]


def test_timestamps_never_decrease_and_the_stream_covers_every_instrument(two_hours: list[Event]) -> None:
    stamps = [e.ts_recv for e in two_hours]
    assert all(e.ts_event == e.ts_recv for e in two_hours)
    assert stamps == sorted(stamps)
    assert stamps[0] == DEFAULT_START_NS and stamps[-1] < DEFAULT_START_NS + 2 * HOUR + S
    quotes_per_step: dict[int, set[str]] = {}
    for e in two_hours:
        if isinstance(e, Quote):
            quotes_per_step.setdefault(e.ts_recv, set()).add(e.instrument)
    assert len(quotes_per_step) == 2 * 3_600 + 1
    assert all(ids == set(SPOT_IDS + PERP_IDS) for ids in quotes_per_step.values())
    marks = {e.instrument for e in two_hours if isinstance(e, MarkPrice)}
    assert marks == set(PERP_IDS)


def test_the_stream_runs_on_until_stopped() -> None:
    market = SyntheticMarket(SyntheticMarketConfig(seed=1))
    events = list(itertools.islice(market.events(), 5_000))
    assert len(events) == 5_000 and events[-1].ts_recv > DEFAULT_START_NS + 500 * S


def test_quotes_respect_the_spread_and_the_tick(two_hours: list[Event]) -> None:
    market = SyntheticMarket()
    specs = {spec.instrument: spec for spec in market.instruments()}
    spread_bps = {"BTC": 1.0, "DOGE": 3.0}
    for e in two_hours:
        if not isinstance(e, Quote):
            continue
        spec = specs[e.instrument]
        assert 0.0 < e.bid < e.ask
        assert spec.is_price_valid(e.bid) and spec.is_price_valid(e.ask)
        assert e.bid_size > 0 and e.ask_size > 0 and spec.is_qty_valid(e.bid_size)
        mid = 0.5 * (e.bid + e.ask)
        configured = spread_bps[spec.base] * 1e-4
        # Rounded outwards to the tick: at least the configured spread, at most two ticks more.
        assert configured * mid * (1 - 1e-9) <= e.ask - e.bid <= configured * mid + 2 * spec.tick_size + 1e-12


def test_trades_print_at_the_touch_with_sequential_ids(two_hours: list[Event]) -> None:
    last_quote: dict[str, Quote] = {}
    ids: dict[str, list[int]] = {}
    for e in two_hours:
        if isinstance(e, Quote):
            last_quote[e.instrument] = e
        elif isinstance(e, Trade):
            quote = last_quote[e.instrument]
            assert e.price == (quote.ask if e.aggressor_side is AggressorSide.BUY else quote.bid)
            assert e.size > 0
            ids.setdefault(e.instrument, []).append(int(e.trade_id))
    assert set(ids) == set(SPOT_IDS + PERP_IDS)
    for sequence in ids.values():
        assert sequence == list(range(1, len(sequence) + 1))
        # Poisson at 0.5/s for 7200 s: 3600 expected, standard deviation 60.
        assert abs(len(sequence) - 3_600) < 300
    sides = [e.aggressor_side for e in two_hours if isinstance(e, Trade)]
    assert 0.45 < sides.count(AggressorSide.BUY) / len(sides) < 0.55


def test_instrument_specs_are_binance_like() -> None:
    specs = {s.instrument: s for s in SyntheticMarket().instruments()}
    assert set(specs) == set(SPOT_IDS + PERP_IDS)
    assert (specs["SYNTH:BTCUSDT"].tick_size, specs["SYNTH:BTCUSDT"].lot_size) == (0.01, 0.00001)
    assert (specs["SYNTH:BTCUSDT-PERP"].tick_size, specs["SYNTH:BTCUSDT-PERP"].lot_size) == (0.1, 0.001)
    assert (specs["SYNTH:DOGEUSDT"].tick_size, specs["SYNTH:DOGEUSDT"].lot_size) == (0.00001, 1.0)
    assert (specs["SYNTH:DOGEUSDT-PERP"].tick_size, specs["SYNTH:DOGEUSDT-PERP"].lot_size) == (0.00001, 1.0)
    assert all(s.min_notional == 5.0 for s in specs.values())
    assert specs["SYNTH:BTCUSDT-PERP"].is_perp and not specs["SYNTH:BTCUSDT"].is_perp


def _binance_rate(average_premium: float) -> float:
    interest, clamp, cap = 0.0001, 0.0005, 0.0075
    rate = average_premium + min(max(interest - average_premium, -clamp), clamp)
    return min(max(rate, -cap), cap)


@pytest.mark.parametrize("basis_bps", [3.0, 12.0, -10.0, 100.0])
def test_funding_rate_and_mark_follow_the_binance_formula_from_the_emitted_quotes(basis_bps: float) -> None:
    regimes = [
        RegimeConfig(name=name, mu=0.0, kappa=3.0, theta=0.02, sigma=0.1, rho=-0.7, basis_mean_bps=basis_bps)
        for name in ("a", "b")
    ]
    start = DEFAULT_START_NS + 7 * HOUR + 30 * 60 * S  # 07:30 UTC: the 08:00 funding falls inside
    _, events = run(
        1.0, seed=2, start_ns=start, regimes=regimes, trade_rate_per_s=0.0, surface_interval_s=1e6
    )
    alpha = 1.0 - math.exp(-1.0 / 1_800.0)
    spot_mid: dict[str, float] = {}
    perp_mid: dict[str, float] = {}
    premia: dict[str, list[float]] = {pid: [] for pid in PERP_IDS}
    ema: dict[str, float] = {pid: basis_bps * 1e-4 for pid in PERP_IDS}
    interval_start: dict[str, int] = {}
    rates, boundaries_seen = [], set()
    for e in events:
        if isinstance(e, Quote):
            (spot_mid if e.instrument in SPOT_IDS else perp_mid)[e.instrument] = e.mid
        elif isinstance(e, MarkPrice):
            index = spot_mid[e.instrument.removesuffix("-PERP")]
            assert e.index_price == index
            assert e.next_funding_ts % (8 * HOUR) == 0 and 0 < e.next_funding_ts - e.ts_event <= 8 * HOUR
            this_interval = e.next_funding_ts - 8 * HOUR
            if interval_start.get(e.instrument) != this_interval:
                interval_start[e.instrument] = this_interval
                premia[e.instrument] = []
            premium = (perp_mid[e.instrument] - index) / index
            premia[e.instrument].append(premium)
            ema[e.instrument] += alpha * (premium - ema[e.instrument])
            expected = _binance_rate(float(np.mean(premia[e.instrument])))
            assert e.funding_rate == pytest.approx(expected, abs=1e-13)
            assert e.mark_price == pytest.approx(index * (1.0 + ema[e.instrument]), rel=1e-12)
            rates.append(e.funding_rate)
            boundaries_seen.add(e.next_funding_ts)
    eight, sixteen = DEFAULT_START_NS + 8 * HOUR, DEFAULT_START_NS + 16 * HOUR
    assert boundaries_seen == {eight, sixteen}
    assert len(premia["SYNTH:BTCUSDT-PERP"]) == 30 * 60 + 1  # reset at 08:00, sampled every second since
    if basis_bps == 100.0:
        assert max(rates) == 0.0075  # the overall cap binds
    if basis_bps == 3.0:  # mostly |I − P| < 0.05 %, where F = I
        assert np.mean(np.isclose(rates, 0.0001, rtol=0, atol=1e-15)) > 0.5


def _surfaces_with_truth(market: SyntheticMarket) -> list[tuple[IVSurface, int, float, float]]:
    """Each surface with the labelled regime, the hidden BTC variance and the BTC spot mid at that step."""
    out, regime, btc_mid = [], -1, 0.0
    for e in market.events():
        if isinstance(e, RegimeLabel):
            regime = e.regime
        elif isinstance(e, Quote) and e.instrument == "SYNTH:BTCUSDT":
            btc_mid = e.mid
        elif isinstance(e, IVSurface):
            out.append((e, regime, market.debug_state().variances["BTC"], btc_mid))
    return out


@pytest.fixture(scope="module")
def forced_crash() -> tuple[SyntheticMarket, list[Event]]:
    """An hour of bull, then a crash forced at 30 minutes."""
    return run(1.0, seed=3, switch_times=[(1_800.0, 1)])


def test_the_surface_is_heston_of_the_labelled_regime_at_the_path_variance() -> None:
    config = SyntheticMarketConfig(seed=3, switch_times=[(1_800.0, 1)], until_ns=DEFAULT_START_NS + HOUR)
    market = SyntheticMarket(config)
    surfaces = _surfaces_with_truth(market)
    assert len(surfaces) == 61 and {regime for _, regime, _, _ in surfaces} == {0, 1}
    for surface, regime, variance, btc_mid in surfaces:
        r = config.regimes[regime]
        params = HestonParams(kappa=r.kappa, theta=r.theta, sigma=r.sigma, rho=r.rho, v0=variance)
        assert np.array_equal(np.array(surface.iv), iv_surface(params, spot=btc_mid))
        assert surface.spot == btc_mid and surface.underlying == "BTC" and surface.source == "synthetic"
        assert surface.log_moneyness == tuple(grid.LOG_MONEYNESS) and surface.maturities == tuple(
            grid.MATURITIES
        )
        assert surface.ts_event % (60 * S) == 0


def test_atm_short_tenor_iv_tracks_the_path_volatility() -> None:
    config = SyntheticMarketConfig(seed=4, switch_times=[(1_800.0, 1)], until_ns=DEFAULT_START_NS + HOUR)
    surfaces = _surfaces_with_truth(SyntheticMarket(config))
    atm = int(np.flatnonzero(grid.LOG_MONEYNESS == 0.0)[0])
    ratios = np.array([s.iv[atm][0] / math.sqrt(v) for s, _, v, _ in surfaces])
    # The ATM implied variance of a Heston smile is close to the expected average variance over
    # the tenor; at 30 days that is within a few percent of the spot variance in both regimes.
    assert np.all(np.abs(ratios - 1.0) < 0.05)
    atm_vols = np.array([s.iv[atm][0] for s, _, _, _ in surfaces])
    path_vols = np.sqrt([v for _, _, v, _ in surfaces])
    assert atm_vols[-1] / atm_vols[0] == pytest.approx(path_vols[-1] / path_vols[0], rel=0.05)


def test_a_forced_crash_is_labelled_at_the_switch_and_raises_realised_volatility(
    forced_crash: tuple[SyntheticMarket, list[Event]],
) -> None:
    _, events = forced_crash
    labels = [e for e in events if isinstance(e, RegimeLabel)]
    assert [(e.ts_event, e.regime, e.name) for e in labels] == [
        (DEFAULT_START_NS, 0, "bull"),
        (DEFAULT_START_NS + 1_800 * S, 1, "crash"),
    ]
    mids = np.array([e.mid for e in events if isinstance(e, Quote) and e.instrument == "SYNTH:BTCUSDT"])
    returns = np.diff(np.log(mids))
    before, after = returns[:1_800].std(), returns[1_800:].std()
    assert after > 2.0 * before
    # Per-second volatility in line with the regimes: sqrt(0.02) before, sqrt(0.16) after the jump.
    per_second = 1.0 / math.sqrt(365 * 86_400)
    assert before == pytest.approx(math.sqrt(0.02) * per_second, rel=0.1)
    assert after == pytest.approx(math.sqrt(0.16) * per_second, rel=0.1)


def test_the_markov_chain_switches_back_and_forth_at_its_intensities() -> None:
    # Leaving each regime every 5 minutes on average: about 24 switches in 2 hours.
    rate = 365 * 24 * 12.0
    market, events = run(
        2.0, seed=9, switch_intensity_per_year=[rate, rate], trade_rate_per_s=0.0, surface_interval_s=1e6
    )
    labels = [e for e in events if isinstance(e, RegimeLabel)]
    assert [e.regime for e in labels] == [i % 2 for i in range(len(labels))]
    assert 10 <= len(labels) - 1 <= 45
    assert all((e.ts_event - DEFAULT_START_NS) % S == 0 for e in labels)
    assert market.debug_state().regime == labels[-1].regime


def test_btc_and_doge_returns_are_correlated_as_configured() -> None:
    # 10-second steps: 2160 returns, large enough against DOGE's coarse tick (0.7 bp of price).
    _, events = run(6.0, seed=6, step_s=10.0, trade_rate_per_s=0.0, surface_interval_s=1e6)
    mids = {pid: [] for pid in SPOT_IDS}
    for e in events:
        if isinstance(e, Quote) and e.instrument in mids:
            mids[e.instrument].append(e.mid)
    btc, doge = (np.diff(np.log(mids[pid])) for pid in SPOT_IDS)
    assert btc.size == 2_160
    assert np.corrcoef(btc, doge)[0, 1] == pytest.approx(0.6, abs=0.06)
    assert doge.std() / btc.std() == pytest.approx(2.0, rel=0.1)  # DOGE variance scale 4


def test_the_hidden_state_never_leaks_into_market_events(
    forced_crash: tuple[SyntheticMarket, list[Event]],
) -> None:
    market, events = forced_crash
    variance = market.debug_state().variances["BTC"]
    for e in events:
        if not isinstance(e, RegimeLabel | IVSurface):
            assert "regime" not in type(e).__struct_fields__ and "variance" not in type(e).__struct_fields__
    assert variance > 0


async def test_paced_releases_events_at_wall_clock_pace_and_stops_on_request() -> None:
    events = list(run(0.05, seed=1, trade_rate_per_s=0.0, surface_interval_s=1e6)[1])  # 180 s of market
    stop = asyncio.Event()
    started = time.perf_counter()
    released = [e async for e in paced(events, speed=1_800.0, stop=stop)]
    elapsed = time.perf_counter() - started
    assert released == events
    assert elapsed >= 0.95 * 180 / 1_800.0

    fast = [e async for e in paced(events, speed=None, stop=stop)]
    assert fast == events

    stop_early = asyncio.Event()
    seen = []
    async for e in paced(events, speed=math.inf, stop=stop_early):
        seen.append(e)
        if len(seen) == 10:
            stop_early.set()
    assert seen == events[:10]
