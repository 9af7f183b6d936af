"""The embedded synthetic market: a seeded Heston regime-switching world that looks like an exchange feed.

It is the default feed of paper mode and of synthetic backtests. Each step (``step_s``
apart, 1 s by default) it emits what a venue would: a ``Quote`` for every spot and
perpetual instrument, ``Trade``s at random (Poisson) times, a ``MarkPrice`` per perpetual
with the predicted funding rate, an option ``IVSurface`` every ``surface_interval_s``, and a
``RegimeLabel`` at the start and at each regime switch (the ground truth, for evaluation
only; features never read it).

The world:

- **Prices** follow Heston with the parameters of the current regime, stepped by
  :func:`models.simulation.step` (QE scheme). Every asset has its own variance path; an
  asset's parameters are the regime's with variance scaled by ``variance_scale`` (θ·c, σ·√c,
  so the asset's variance is exactly ``c`` times a process with the regime's parameters).
  The standard normals driving the assets are equicorrelated (one common factor) at
  ``asset_correlation`` for both the variance and the price shocks, which makes the price
  shock correlation the same value whatever ρ.
- **Regimes** switch by a continuous-time Markov chain (``switch_intensity_per_year``), or
  at fixed times (``switch_times``, used to force a crash). Heston alone keeps the variance
  continuous, and the crash regime's slow mean reversion (κ = 0.5) would then take months to
  show in prices; a real crash starts with a volatility spike, so on entering a regime with
  an ``entry_variance`` the variance jumps up to it (never down).
- **Perpetuals** trade at ``index · (1 + premium)``, the index being the spot mid and the
  premium an Ornstein–Uhlenbeck process around the regime's ``basis_mean_bps`` (positive in
  a bull market, negative in a crash, as real perp bases are).
- **Funding** every ``funding_interval_s`` (8 h: 00:00, 08:00, 16:00 UTC) by Binance's
  formula: ``F = P + clamp(I − P, −0.05 %, +0.05 %)``, clamped overall to ±0.75 %, where
  ``P`` is the time average over the interval so far of the premium index
  ``(perp mid − index) / index`` sampled at every step from the emitted quotes, and ``I``
  the interest rate per interval (0.01 %). The mark's ``funding_rate`` is that prediction,
  final at the interval's end.
- **Mark price** ``index · (1 + EMA of the premium index)`` (time constant
  ``mark_basis_ema_s``), a simplification of Binance's "index + moving average of the basis".
- **IV surface** of the surface asset: ``models.heston.iv_surface`` with the current
  regime's parameters and the path's current variance as ``v0``, so options and the price
  path tell the same story.

Randomness: one ``numpy.random.Generator(PCG64)`` per purpose (regimes, price shocks,
basis, book sizes, trades), each seeded from ``(seed, purpose)``, so adding a consumer never
shifts another's draws. Same seed and config → the same event stream bit for bit.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import zlib
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from bot.events import (
    AggressorSide,
    Event,
    FeedState,
    FeedStatus,
    InboundEvent,
    IVSurface,
    MarkPrice,
    Quote,
    RegimeLabel,
    Trade,
    Venue,
    instrument_id,
)
from bot.instruments import InstrumentKind, InstrumentRegistry, InstrumentSpec
from models import grid
from models.heston import HestonParams, iv_surface
from models.simulation import BULL, CRASH, MarkovRegimeChain, Regime, step

NANOS_PER_SECOND = 1_000_000_000
SECONDS_PER_YEAR = 365.0 * 86_400.0
DEFAULT_START_NS = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp()) * NANOS_PER_SECOND
_BPS = 1e-4
_BLOCK = 4096  # random draws per refill: amortises numpy's per-call overhead
_STOP_POLL_S = 0.05  # pacing waits longer than this also watch the stop event
_EVENTS_PER_YIELD = 256  # events released without sleeping before control returns to the loop


class RegimeConfig(BaseModel):
    """One regime's physics: drift, Heston parameters (variance of the reference asset) and perp basis."""

    model_config = ConfigDict(extra="forbid")

    name: str
    mu: float = Field(description="Annual drift of the log price.")
    kappa: float = Field(gt=0)
    theta: float = Field(gt=0)
    sigma: float = Field(gt=0)
    rho: float = Field(gt=-1, lt=1)
    entry_variance: float | None = Field(
        default=None,
        gt=0,
        description="Variance the path jumps up to on entering the regime (None: continuous).",
    )
    basis_mean_bps: float = Field(default=3.0, description="Mean perp premium over the index in this regime.")

    @classmethod
    def from_regime(cls, regime: Regime, **extra: float | None) -> RegimeConfig:
        """Config from a :class:`models.simulation.Regime` (its v0 is not used: the path carries variance)."""
        p = regime.params
        return cls(
            name=regime.name, mu=regime.mu, kappa=p.kappa, theta=p.theta, sigma=p.sigma, rho=p.rho, **extra
        )

    def heston(self, v0: float, variance_scale: float = 1.0) -> HestonParams:
        """Parameters of an asset whose variance is ``variance_scale`` times this regime's process."""
        return HestonParams(
            kappa=self.kappa,
            theta=self.theta * variance_scale,
            sigma=self.sigma * math.sqrt(variance_scale),
            rho=self.rho,
            v0=v0,
        )


def _default_regimes() -> list[RegimeConfig]:
    return [
        RegimeConfig.from_regime(BULL, basis_mean_bps=3.0),
        RegimeConfig.from_regime(CRASH, entry_variance=CRASH.params.theta, basis_mean_bps=-10.0),
    ]


class AssetConfig(BaseModel):
    """One underlying, traded as ``SYNTH:<symbol>USDT`` (spot) and ``SYNTH:<symbol>USDT-PERP``."""

    model_config = ConfigDict(extra="forbid")

    symbol: str = Field(pattern=r"^[A-Z0-9]+$")
    initial_price: float = Field(gt=0)
    variance_scale: float = Field(default=1.0, gt=0, description="Asset variance / regime variance.")
    spread_bps: float = Field(gt=0, description="Quoted spread, before rounding out to the tick.")
    top_size: float = Field(gt=0, description="Mean top-of-book size per side (base units).")
    trade_size: float = Field(gt=0, description="Mean trade size (base units, exponential).")

    @property
    def spot_id(self) -> str:
        return instrument_id(Venue.SYNTH, f"{self.symbol}USDT")

    @property
    def perp_id(self) -> str:
        return instrument_id(Venue.SYNTH, f"{self.symbol}USDT-PERP")


def _default_assets() -> list[AssetConfig]:
    return [
        AssetConfig(symbol="BTC", initial_price=60_000.0, spread_bps=1.0, top_size=2.0, trade_size=0.05),
        # DOGE: twice BTC's volatility in every regime.
        AssetConfig(
            symbol="DOGE",
            initial_price=0.15,
            variance_scale=4.0,
            spread_bps=3.0,
            top_size=200_000.0,
            trade_size=5_000.0,
        ),
    ]


class SyntheticMarketConfig(BaseModel):
    """The synthetic world; every default is usable as is.

    Switching defaults: leaving bull 4 times a year and crash 26 times a year makes a bull
    spell last 3 months and a crash 2 weeks on average (≈ 13 % of the time in crash), so a
    10-hour paper run stays in bull with probability ≈ 99.5 % while weeks of simulation
    contain crashes.
    """

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(default=0, ge=0)
    start_ns: int = Field(default=DEFAULT_START_NS, ge=0, description="Time of the first step (ns).")
    until_ns: int | None = Field(default=None, description="Last possible step time; None: never ends.")
    step_s: float = Field(default=1.0, gt=0)
    regimes: list[RegimeConfig] = Field(default_factory=_default_regimes, min_length=2)
    initial_regime: int = Field(default=0, ge=0)
    switch_intensity_per_year: list[float] = Field(
        default_factory=lambda: [4.0, 26.0],
        description="Rate of leaving each regime (per year) for the Markov chain.",
    )
    switch_times: list[tuple[float, int]] | None = Field(
        default=None, description="Fixed switches (seconds after start, regime index); replaces the chain."
    )
    assets: list[AssetConfig] = Field(default_factory=_default_assets, min_length=1)
    asset_correlation: float = Field(default=0.6, ge=0.0, lt=1.0)
    trade_rate_per_s: float = Field(default=0.5, ge=0.0, description="Poisson trade rate per instrument.")
    basis_std_bps: float = Field(default=4.0, ge=0.0, description="Stationary std of the perp premium.")
    basis_half_life_s: float = Field(default=1_800.0, gt=0)
    mark_basis_ema_s: float = Field(default=1_800.0, gt=0)
    funding_interval_s: int = Field(default=8 * 3_600, gt=0)
    interest_rate_per_interval: float = 0.0001
    funding_clamp: float = Field(default=0.0005, ge=0.0)
    funding_cap: float = Field(default=0.0075, gt=0.0)
    surface_asset: str = "BTC"
    surface_interval_s: float = Field(default=60.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> SyntheticMarketConfig:
        n = len(self.regimes)
        if self.initial_regime >= n:
            raise ValueError(f"initial_regime {self.initial_regime} is not one of the {n} regimes")
        if len(self.switch_intensity_per_year) != n or min(self.switch_intensity_per_year) < 0:
            raise ValueError("switch_intensity_per_year needs one non-negative rate per regime")
        if self.switch_times is not None:
            offsets = [offset for offset, _ in self.switch_times]
            if offsets != sorted(offsets) or (offsets and offsets[0] < 0):
                raise ValueError("switch_times must be sorted by a non-negative offset")
            if any(not 0 <= index < n for _, index in self.switch_times):
                raise ValueError("switch_times name a regime index that does not exist")
        symbols = [asset.symbol for asset in self.assets]
        if len(set(symbols)) != len(symbols):
            raise ValueError("asset symbols must be unique")
        if self.surface_asset not in symbols:
            raise ValueError(f"surface_asset {self.surface_asset!r} is not one of the assets {symbols}")
        return self

    @property
    def step_ns(self) -> int:
        return round(self.step_s * NANOS_PER_SECOND)


def default_instruments() -> list[InstrumentSpec]:
    """Binance-like specs of the four synthetic instruments."""
    spot, perp = InstrumentKind.SPOT, InstrumentKind.PERP
    return [
        InstrumentSpec(
            instrument="SYNTH:BTCUSDT", kind=spot, base="BTC", tick_size=0.01, lot_size=0.00001,
            min_qty=0.00001, min_notional=5.0,
        ),
        InstrumentSpec(
            instrument="SYNTH:BTCUSDT-PERP", kind=perp, base="BTC", tick_size=0.1, lot_size=0.001,
            min_qty=0.001, min_notional=5.0,
        ),
        InstrumentSpec(
            instrument="SYNTH:DOGEUSDT", kind=spot, base="DOGE", tick_size=0.00001, lot_size=1.0,
            min_qty=1.0, min_notional=5.0,
        ),
        InstrumentSpec(
            instrument="SYNTH:DOGEUSDT-PERP", kind=perp, base="DOGE", tick_size=0.00001, lot_size=1.0,
            min_qty=1.0, min_notional=5.0,
        ),
    ]  # fmt: skip


def _generator(seed: int, purpose: str) -> np.random.Generator:
    """An independent stream per purpose: its seed depends only on (seed, purpose)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(purpose.encode())])))


class _Draws:
    """Floats from a generator, drawn a block at a time (one numpy call per block, not per float)."""

    def __init__(self, rng: np.random.Generator, normal: bool) -> None:
        self._rng = rng
        self._normal = normal
        self._buffer: list[float] = []
        self._index = 0

    def next(self) -> float:
        if self._index == len(self._buffer):
            block = self._rng.standard_normal(_BLOCK) if self._normal else self._rng.random(_BLOCK)
            self._buffer = block.tolist()
            self._index = 0
        value = self._buffer[self._index]
        self._index += 1
        return value


@dataclass(frozen=True, slots=True)
class _Book:
    """Tick/lot rounding of one instrument, precomputed for the hot loop."""

    instrument: str
    tick: float
    lot: float
    decimals: int
    lot_decimals: int

    @classmethod
    def of(cls, spec: InstrumentSpec) -> _Book:
        return cls(
            spec.instrument,
            spec.tick_size,
            spec.lot_size,
            _decimals(spec.tick_size),
            _decimals(spec.lot_size),
        )

    def bid(self, price: float) -> float:
        return round(math.floor(price / self.tick + 1e-9) * self.tick, self.decimals)

    def ask(self, price: float) -> float:
        return round(math.ceil(price / self.tick - 1e-9) * self.tick, self.decimals)

    def size(self, quantity: float) -> float:
        return round(max(1, math.floor(quantity / self.lot + 1e-9)) * self.lot, self.lot_decimals)


def _decimals(step: float) -> int:
    return max(0, -math.floor(math.log10(step)) + 1)


@dataclass(slots=True)
class _AssetPath:
    """Mutable state of one asset (owned by the market, never emitted)."""

    config: AssetConfig
    spot: _Book
    perp: _Book
    log_price: float
    variance: float
    premium: float
    premium_ema: float
    index: float = 0.0
    premium_sum: float = 0.0
    premium_count: int = 0


@dataclass(frozen=True, slots=True)
class SyntheticState:
    """The hidden truth at the latest emitted step: for tests and evaluation, never for features."""

    ts_ns: int
    regime: int
    variances: dict[str, float]
    prices: dict[str, float]


class SyntheticMarket:
    """Deterministic generator of the synthetic market's inbound events (see the module docstring)."""

    def __init__(
        self,
        config: SyntheticMarketConfig | None = None,
        instruments: Iterable[InstrumentSpec] | None = None,
    ) -> None:
        self.config = config if config is not None else SyntheticMarketConfig()
        specs = list(instruments) if instruments is not None else default_instruments()
        self._registry = InstrumentRegistry(specs)
        cfg = self.config
        self._dt_years = cfg.step_s / SECONDS_PER_YEAR
        self._rng_regime = _generator(cfg.seed, "regime")
        self._shocks = _generator(cfg.seed, "price_shocks")
        self._basis = _Draws(_generator(cfg.seed, "basis"), normal=True)
        self._book = _Draws(_generator(cfg.seed, "book"), normal=False)
        self._trades = _Draws(_generator(cfg.seed, "trades"), normal=False)
        self._shock_rows: list[list[float]] = []
        self._shock_index = 0
        self._switches = [
            (cfg.start_ns + round(offset_s * NANOS_PER_SECOND), index)
            for offset_s, index in cfg.switch_times or ()
        ]
        self._ts = cfg.start_ns
        self._regime = cfg.initial_regime
        self._advance_schedule()
        self._chain = (
            MarkovRegimeChain(self._intensity_matrix(), self._regime, self._rng_regime)
            if cfg.switch_times is None
            else None
        )
        self._paths = [self._new_path(asset) for asset in cfg.assets]
        self._surface_path = next(p for p in self._paths if p.config.symbol == cfg.surface_asset)
        self._params = [
            [regime.heston(regime.theta * asset.variance_scale, asset.variance_scale) for asset in cfg.assets]
            for regime in cfg.regimes
        ]
        self._trade_counts = {book.instrument: 0 for p in self._paths for book in (p.spot, p.perp)}
        self._started = False
        self._next_funding_ts = self._funding_boundary_after(cfg.start_ns)
        self._next_surface_ts = cfg.start_ns
        self._surface_interval_ns = round(cfg.surface_interval_s * NANOS_PER_SECOND)
        self._basis_decay = math.exp(-math.log(2.0) * cfg.step_s / cfg.basis_half_life_s)
        self._basis_noise = cfg.basis_std_bps * _BPS * math.sqrt(1.0 - self._basis_decay**2)
        self._ema_alpha = 1.0 - math.exp(-cfg.step_s / cfg.mark_basis_ema_s)
        self._log_moneyness = tuple(grid.LOG_MONEYNESS.tolist())
        self._maturities = tuple(grid.MATURITIES.tolist())
        a = math.sqrt(cfg.asset_correlation)
        self._factor_loading, self._own_loading = a, math.sqrt(1.0 - cfg.asset_correlation)

    # --- public ------------------------------------------------------------------------------

    def instruments(self) -> list[InstrumentSpec]:
        """Specs of the instruments this market quotes (spot then perp, per asset)."""
        return [self._registry[ids] for p in self._paths for ids in (p.spot.instrument, p.perp.instrument)]

    def debug_state(self) -> SyntheticState:
        """The hidden state after the latest emitted step (regime, variances, exact prices)."""
        return SyntheticState(
            ts_ns=self._ts,
            regime=self._regime,
            variances={p.config.symbol: p.variance for p in self._paths},
            prices={p.config.symbol: math.exp(p.log_price) for p in self._paths},
        )

    def regime_params(self, regime: int, symbol: str, variance: float) -> HestonParams:
        """Heston parameters of ``symbol`` in ``regime`` at spot variance ``variance`` (what surfaces use)."""
        asset = next(asset for asset in self.config.assets if asset.symbol == symbol)
        # QE can put the variance exactly at zero on coarse steps; the pricer needs v0 > 0.
        return self.config.regimes[regime].heston(max(variance, 1e-12), asset.variance_scale)

    def events(self) -> Iterator[InboundEvent]:
        """The event stream, in non-decreasing ``ts_recv``; resumes where a previous call stopped."""
        until = self.config.until_ns
        while True:
            if self._started:
                if until is not None and self._ts + self.config.step_ns > until:
                    return
                yield from self._step()
            else:
                if until is not None and self._ts > until:
                    return
                self._started = True
                yield from self._first_step()

    # --- construction ------------------------------------------------------------------------

    def _new_path(self, asset: AssetConfig) -> _AssetPath:
        spot_spec, perp_spec = self._registry.get(asset.spot_id), self._registry.get(asset.perp_id)
        if spot_spec is None or perp_spec is None:
            raise ValueError(f"instrument specs for {asset.spot_id} and {asset.perp_id} are required")
        regime = self.config.regimes[self._regime]
        premium = regime.basis_mean_bps * _BPS
        return _AssetPath(
            config=asset,
            spot=_Book.of(spot_spec),
            perp=_Book.of(perp_spec),
            log_price=math.log(asset.initial_price),
            variance=regime.theta * asset.variance_scale,
            premium=premium,
            premium_ema=premium,
        )

    def _intensity_matrix(self) -> np.ndarray:
        """Generator rates per year: leaving regime i spreads evenly over the other regimes."""
        n = len(self.config.regimes)
        rates = np.zeros((n, n))
        for i, leave in enumerate(self.config.switch_intensity_per_year):
            rates[i, :] = leave / (n - 1)
            rates[i, i] = 0.0
        return rates

    def _funding_boundary_after(self, ts_ns: int) -> int:
        interval = self.config.funding_interval_s * NANOS_PER_SECOND
        return (ts_ns // interval + 1) * interval

    def _advance_schedule(self) -> int:
        """Apply the fixed switches due at the current time; a switch takes effect at the first step ≥ it."""
        while self._switches and self._switches[0][0] <= self._ts:
            self._regime = self._switches.pop(0)[1]
        return self._regime

    # --- stepping ----------------------------------------------------------------------------

    def _first_step(self) -> Iterator[InboundEvent]:
        # announced like any adapter's connection, so paper runs and backtests start identically
        yield FeedStatus(ts_event=self._ts, ts_recv=self._ts, feed="synthetic", status=FeedState.CONNECTED)
        yield self._label()
        yield from self._emit()

    def _step(self) -> Iterator[InboundEvent]:
        cfg = self.config
        regime = cfg.regimes[self._regime]
        params = self._params[self._regime]
        z_v, z_s = self._correlated_shocks()
        target = regime.basis_mean_bps * _BPS
        for i, path in enumerate(self._paths):
            # step() reads kappa, theta, sigma, rho from params; the variance is the path's own.
            log_price, variance = step(
                path.log_price, path.variance, params[i], regime.mu, self._dt_years, z_v[i], z_s[i]
            )
            path.log_price, path.variance = float(log_price), float(variance)
            path.premium = (
                target + (path.premium - target) * self._basis_decay + self._basis_noise * self._basis.next()
            )
        self._ts += cfg.step_ns
        previous = self._regime
        self._regime = self._advance_regime()
        if self._regime != previous:
            self._enter_regime()
            yield self._label()
        yield from self._emit()

    def _correlated_shocks(self) -> tuple[list[float], list[float]]:
        """Standard normals per asset for variance and price, equicorrelated through one factor."""
        if self._shock_index == len(self._shock_rows):
            n = len(self._paths)
            raw = self._shocks.standard_normal((_BLOCK, 2 * (n + 1)))
            mixed = self._factor_loading * raw[:, [0]] + self._own_loading * raw[:, 2 : 2 + n]
            mixed_s = self._factor_loading * raw[:, [1]] + self._own_loading * raw[:, 2 + n :]
            self._shock_rows = np.concatenate([mixed, mixed_s], axis=1).tolist()
            self._shock_index = 0
        row = self._shock_rows[self._shock_index]
        self._shock_index += 1
        n = len(self._paths)
        return row[:n], row[n:]

    def _advance_regime(self) -> int:
        if self._chain is not None:
            return int(self._chain.advance(self._dt_years))
        return self._advance_schedule()

    def _enter_regime(self) -> None:
        entry = self.config.regimes[self._regime].entry_variance
        if entry is None:
            return
        for path in self._paths:
            path.variance = max(path.variance, entry * path.config.variance_scale)

    def _label(self) -> RegimeLabel:
        name = self.config.regimes[self._regime].name
        return RegimeLabel(
            ts_event=self._ts,
            ts_recv=self._ts,
            underlying=self.config.surface_asset,
            regime=self._regime,
            name=name,
        )

    def _emit(self) -> Iterator[InboundEvent]:
        """Quotes, marks and (at its cadence) the surface at the current step, then the step's trades."""
        ts = self._ts
        if ts >= self._next_funding_ts:
            self._next_funding_ts = self._funding_boundary_after(ts)
            for path in self._paths:
                path.premium_sum, path.premium_count = 0.0, 0
        quotes: list[tuple[Quote, _Book, AssetConfig]] = []
        for path in self._paths:
            index_quote = self._quote(path.spot, math.exp(path.log_price), path.config)
            index = path.index = 0.5 * (index_quote.bid + index_quote.ask)
            perp_quote = self._quote(path.perp, index * (1.0 + path.premium), path.config)
            premium_index = (0.5 * (perp_quote.bid + perp_quote.ask) - index) / index
            path.premium_sum += premium_index
            path.premium_count += 1
            path.premium_ema += self._ema_alpha * (premium_index - path.premium_ema)
            quotes.extend(((index_quote, path.spot, path.config), (perp_quote, path.perp, path.config)))
            yield index_quote
            yield perp_quote
            yield MarkPrice(
                ts_event=ts,
                ts_recv=ts,
                instrument=path.perp.instrument,
                mark_price=index * (1.0 + path.premium_ema),
                index_price=index,
                funding_rate=self._funding_rate(path.premium_sum / path.premium_count),
                next_funding_ts=self._next_funding_ts,
            )
        if ts >= self._next_surface_ts:
            self._next_surface_ts = (ts // self._surface_interval_ns + 1) * self._surface_interval_ns
            yield self._surface()
        yield from self._trades_until_next_step(quotes)

    def _quote(self, book: _Book, mid: float, asset: AssetConfig) -> Quote:
        half_spread = 0.5 * asset.spread_bps * _BPS
        bid_size = book.size(asset.top_size * (0.5 + self._book.next()))
        ask_size = book.size(asset.top_size * (0.5 + self._book.next()))
        return Quote(
            ts_event=self._ts,
            ts_recv=self._ts,
            instrument=book.instrument,
            bid=book.bid(mid * (1.0 - half_spread)),
            bid_size=bid_size,
            ask=book.ask(mid * (1.0 + half_spread)),
            ask_size=ask_size,
        )

    def _funding_rate(self, average_premium: float) -> float:
        cfg = self.config
        adjustment = min(
            max(cfg.interest_rate_per_interval - average_premium, -cfg.funding_clamp), cfg.funding_clamp
        )
        return min(max(average_premium + adjustment, -cfg.funding_cap), cfg.funding_cap)

    def _surface(self) -> IVSurface:
        path = self._surface_path
        heston = self.regime_params(self._regime, path.config.symbol, path.variance)
        surface = iv_surface(heston, spot=path.index)
        return IVSurface(
            ts_event=self._ts,
            ts_recv=self._ts,
            underlying=path.config.symbol,
            spot=path.index,
            log_moneyness=self._log_moneyness,
            maturities=self._maturities,
            iv=tuple(tuple(row) for row in surface.tolist()),
            source="synthetic",
        )

    def _trades_until_next_step(self, quotes: list[tuple[Quote, _Book, AssetConfig]]) -> Iterator[Trade]:
        """Poisson arrivals per instrument during the step, at the touch, in time order."""
        rate = self.config.trade_rate_per_s * self.config.step_s
        if rate <= 0.0:
            return
        step_ns = self.config.step_ns
        pending: list[tuple[int, int, Quote, bool, float]] = []
        for position, (quote, book, asset) in enumerate(quotes):
            # Arrival times of a Poisson process: exponential gaps (in steps) until the step ends.
            elapsed = -math.log(1.0 - self._trades.next()) / rate
            while elapsed < 1.0:
                is_buy = self._trades.next() < 0.5
                size = book.size(-math.log(1.0 - self._trades.next()) * asset.trade_size)
                pending.append((int(elapsed * step_ns), position, quote, is_buy, size))
                elapsed -= math.log(1.0 - self._trades.next()) / rate
        pending.sort(key=lambda item: (item[0], item[1]))
        for offset, _, quote, is_buy, size in pending:
            self._trade_counts[quote.instrument] += 1
            yield Trade(
                ts_event=self._ts + offset,
                ts_recv=self._ts + offset,
                instrument=quote.instrument,
                price=quote.ask if is_buy else quote.bid,
                size=size,
                aggressor_side=AggressorSide.BUY if is_buy else AggressorSide.SELL,
                trade_id=str(self._trade_counts[quote.instrument]),
            )


async def paced(events: Iterable[Event], speed: float | None, stop: asyncio.Event) -> AsyncIterator[Event]:
    """Release ``events`` at wall-clock pace: sim time t at wall start + (t − t0) / speed.

    ``speed`` None or infinite releases as fast as the consumer takes them, still yielding to
    the event loop every few hundred events. Stops as soon as ``stop`` is set.
    """
    loop = asyncio.get_running_loop()
    unpaced = speed is None or math.isinf(speed)
    if not unpaced and speed <= 0:
        raise ValueError(f"speed must be positive, got {speed}")
    wall_start = loop.time()
    sim_start: int | None = None
    since_yield = 0
    for event in events:
        if sim_start is None:
            sim_start = event.ts_recv
        delay = (
            0.0
            if unpaced
            else wall_start + (event.ts_recv - sim_start) / NANOS_PER_SECOND / speed - loop.time()
        )
        if delay > _STOP_POLL_S:
            # Long waits watch the stop event so that a slow replay stops at once.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):  # not wait_for: it can swallow a cancel on 3.11
                    await stop.wait()
            since_yield = 0
        elif delay > 0.0:
            await asyncio.sleep(delay)
            since_yield = 0
        elif since_yield >= _EVENTS_PER_YIELD:
            await asyncio.sleep(0)  # running behind or unpaced: let other tasks run now and then
            since_yield = 0
        since_yield += 1
        if stop.is_set():
            return
        yield event
