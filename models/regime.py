"""Regime detector: the probability that the market is in its crash regime, from a window of hourly bars.

Why: a crash regime (negative drift, high and wild variance) is what a policy most needs to see early, and
the synthetic market knows the truth exactly, so a detector can be trained with exact labels and measured
honestly (issue 6, item 6).

* **Data.** ``regime_paths`` simulates the synthetic market's physics (``adapters/synthetic.py``): the
  ``BULL`` and ``CRASH`` regimes of ``models.simulation``, stepped every ``sub_s`` (5 minutes) by
  ``models.simulation.markov_heston_steps`` (QE) with the current regime's dynamics, the regime chain sampled
  exactly on the step grid (``expm(Q dt)``) and the variance jumping up to the crash's θ on entering a crash.
  ``simulate_regimes`` has the same chain and steps but no entry jump; without it the crash's κ = 0.5 takes
  months to show in prices, which is not the market the bot trades (``entry_variance=None`` gives that
  pure-Heston world). Paths start in bull at the bull's v0. Labels are exact: a bar's label is the regime that
  drives its last 5-minute step. Default switch rates are 12 (leaving bull) and 26 (leaving crash) per year:
  the market's crash exit rate, but bull spells of a month instead of three, so that every held-out path holds
  several bull → crash switches (about 8 per simulated year).
* **Bars.** Hourly bars (``bar_s`` = 3600) of 5-minute closes; features in the order of ``FEATURES``:
  ``ret`` the bar's log return and ``log_rv`` the log of its annualised realised variance from its twelve
  5-minute log returns (floored at ``RV_FLOOR``). ``bar_features`` computes them for the simulation, the
  fine-tuning data and the bot's feature module alike (``CloseSampler`` turns ticks into 5-minute closes),
  so the bot sees exactly what the model was trained on. Inputs are standardised with the training mean
  and deviation, stored with the weights.
* **Implied vol** (``RegimeConfig.features``; default ``IV_FEATURES``, ``FEATURES`` for prices only, which
  is also what a saved model without the option reads). ``log_atm_iv``: the log ATM (ln K/F = 0) implied
  vol at the bar's close at the grid tenor nearest ``iv_tenor_days`` (30 days), priced as the synthetic
  market prices its surface (``atm_iv``: ``models.heston.iv_surface`` batched over all bars, the bar's
  regime's parameters, the path's variance at the close as v0; the crash-entry jump is in the variance
  from the bar after the switch on). The bot reads the same node from the latest ``IVSurface`` received
  before the bar ended (``bot/features/regime.py``). The ``IV rule`` baseline is the vol rule on the
  implied variance IV² (windows from one bar), fitted the same way.
* **Online use.** A network is trained on ``window``-bar slices from a zero state, so it is only ever run
  that way: the probability at bar ``i`` (bars counted from the epoch in the bot, from the path start in
  the simulation) is the last output of a run over bars ``[s − context, i]`` with ``s`` the start of i's
  ``block`` (``s = ⌊i / block⌋·block``, ``context = window − block``), i.e. 193 to 256 bars of history.
  ``online_probabilities`` computes exactly that for whole paths (one run per block) and the feature
  module for the newest bar, so evaluation measures what the bot computes.
* **Models.** ``RegimeSSM``: a small selective state-space model (Mamba-style blocks: input projection,
  causal depthwise convolution, input-dependent Δ, B and C, diagonal A = −exp(A_log), the selective scan
  written as a sequential loop in plain PyTorch, SiLU gate, residual + LayerNorm). ``RegimeGRU``: a GRU
  with about the same number of weights, the baseline. ``VolRule``: alarm when the trailing realised
  variance over ``window`` bars exceeds a threshold; window and threshold maximise Youden's J (TPR − FPR)
  per bar on the training paths — the non-learned baseline.
* **Training (curriculum).** Pre-training: binary cross-entropy on per-bar labels of random ``window``-bar
  slices of the synthetic paths, each run from a zero state, the first ``warmup`` bars of a slice left out
  of the loss (no context yet). Fine-tuning (``fine_tune``): the same loss on real bars at ``lr`` ×
  ``fine_tune_lr_scale``. Real markets carry no regime labels: with ``labels`` given they are used; without,
  the targets are the pre-trained model's own decisions (p ≥ 0.5, fixed before training). Such
  self-training adapts the network to the real data's feature distribution and sharpens what it already
  believes; it cannot teach it a crash it does not already recognise, so real labels are better when any
  exist.
* **Metrics** (``evaluate_probabilities``), on held-out seeds, online probabilities, the first ``warmup``
  bars of each path left out: ROC AUC per bar (``roc_auc``, rank statistic with ties), median detection
  delay after a bull → crash switch (``detection_delays``: bars until the probability first reaches 0.5,
  infinite when the crash ends first; the median counts misses as infinite), false alarms per simulated
  year (``false_alarms``: crossings into alarm while truly in bull).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike
from torch import nn
from tqdm.auto import tqdm

from models import grid
from models.heston import iv_surface
from models.simulation import BULL, CRASH, Regime, markov_heston_steps
from models.surrogate import ThreadLimit, grid_meta, load_checked

FORMAT_VERSION = 1
DEFAULT_MODEL_DIR = Path("var/models/regime")
MODEL_FILE = "regime.pt"
GRU_FILE = "regime_gru.pt"
REPORT_DIR = "report"
PLOT_FILE = "regime.png"
FEATURES: tuple[str, ...] = ("ret", "log_rv")  # the price features (``bar_features``); models before IV
IV_FEATURE = "log_atm_iv"
IV_FEATURES: tuple[str, ...] = (*FEATURES, IV_FEATURE)
KNOWN_FEATURES = frozenset(IV_FEATURES)
# Variance floor of the IV pricing, as the synthetic market's ``regime_params`` (QE can reach zero exactly).
V_FLOOR = 1e-12
SECONDS_PER_YEAR = 365.0 * 24.0 * 3600.0
NANOS_PER_SECOND = 1_000_000_000
# Floor of the annualised realised variance inside log_rv (0.1 % vol): a bar without price moves stays finite.
RV_FLOOR = 1e-6
REGIMES: tuple[Regime, ...] = (BULL, CRASH)
ALARM = 0.5
Kind = Literal["ssm", "gru"]


# --------------------------------------------------------------------------------------------------
# Bars and data


def bar_features(closes: ArrayLike, subs_per_bar: int, bar_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Features (..., n_bars, 2) in ``FEATURES`` order and annualised realised variance (..., n_bars).

    ``closes`` (..., n_bars · subs_per_bar + 1) are sub-bar closes, the first one the close before the first
    bar. One function for simulation, real data and the bot, so all three compute the same numbers.
    """
    c = np.asarray(closes, dtype=np.float64)
    n_bars = (c.shape[-1] - 1) // subs_per_bar
    if n_bars < 1 or c.shape[-1] != n_bars * subs_per_bar + 1:
        raise ValueError(f"need n_bars·{subs_per_bar} + 1 closes with n_bars ≥ 1, got {c.shape[-1]}")
    if not (np.isfinite(c).all() and (c > 0.0).all()):
        raise ValueError("closes must be finite and positive")
    sub = np.diff(np.log(c), axis=-1).reshape(*c.shape[:-1], n_bars, subs_per_bar)
    rv = (sub**2).sum(axis=-1) * SECONDS_PER_YEAR / bar_s
    return np.stack([sub.sum(axis=-1), np.log(rv + RV_FLOOR)], axis=-1), rv


class CloseSampler:
    """Last price of each ``sub_s`` bucket of event time, carried forward over buckets without a price.

    O(1) per price. Bucket k covers ``[k·S, (k+1)·S)``; ``advance(now)`` closes every bucket that ended by
    ``now``, so the closes depend only on the prices and the instants asked for (deterministic on replay).
    A late timestamp counts in the newest bucket, as in ``bot.features.history``.
    """

    def __init__(self, sub_s: int, capacity: int) -> None:
        self.sub_ns = sub_s * NANOS_PER_SECOND
        self.closes: deque[float] = deque(maxlen=capacity)
        self.last_id = -1  # id of the newest closed bucket
        self._bucket: int | None = None  # open bucket
        self._price = math.nan

    def add(self, ts_ns: int, price: float) -> None:
        """Record a price at event time ``ts_ns``."""
        if not (price > 0.0 and math.isfinite(price)):
            return
        bucket = ts_ns // self.sub_ns
        if self._bucket is not None and bucket > self._bucket:
            self._close_until(bucket)
        if self._bucket is None or bucket > self._bucket:
            self._bucket = bucket
        self._price = price

    def advance(self, now_ns: int) -> None:
        """Close every bucket that ended at or before ``now_ns``."""
        if self._bucket is not None:
            self._close_until(now_ns // self.sub_ns)

    def _close_until(self, bucket: int) -> None:
        """Close the open bucket and the empty ones before ``bucket`` (at most a buffer's worth of them)."""
        assert self._bucket is not None
        if bucket <= self._bucket:
            return
        gap = min(bucket - self._bucket, self.closes.maxlen or 0)
        self.closes.extend([self._price] * gap)
        self.last_id = bucket - 1
        self._bucket = bucket

    def bar_closes(self, subs_per_bar: int, max_bars: int) -> np.ndarray:
        """Closes of the last (up to ``max_bars``) complete bars on bar boundaries, and the close before."""
        if not self.closes:
            return np.empty(0)
        n_full = (self.last_id + 1) % subs_per_bar  # closed buckets of the bar still open
        usable = len(self.closes) - n_full
        n_bars = min(max_bars, (usable - 1) // subs_per_bar)
        if n_bars < 1:
            return np.empty(0)
        return np.array(list(self.closes)[usable - n_bars * subs_per_bar - 1 : usable])


def closes_from_events(events: Iterable[Any], instrument: str, sub_s: int = 300,
                       source: Literal["quote", "trade"] = "quote") -> np.ndarray:
    """Sub-bar closes of ``instrument`` from Quote mids (or Trade prices) of an event stream or journal.

    The real-data input of ``fine_tune`` (through ``bar_features``); the same sampler as the bot's module.
    """
    from bot.events import Quote, Trade

    sampler = CloseSampler(sub_s, capacity=10**8)
    last_ts = None
    for event in events:
        if getattr(event, "instrument", None) != instrument:
            continue
        if source == "quote" and isinstance(event, Quote) and event.bid > 0.0 and event.ask > 0.0:
            sampler.add(event.ts_recv, event.mid)
        elif source == "trade" and isinstance(event, Trade):
            sampler.add(event.ts_recv, event.price)
        else:
            continue
        last_ts = event.ts_recv
    if last_ts is None:
        return np.empty(0)
    sampler.advance(last_ts)  # the bucket holding the last price stays open: it may be incomplete
    return np.array(sampler.closes)


def closes_from_journal(path: Path | str, instrument: str, sub_s: int = 300,
                        source: Literal["quote", "trade"] = "quote") -> np.ndarray:
    """``closes_from_events`` over a journal file."""
    from bot.journal import read_events

    return closes_from_events(read_events(path), instrument, sub_s, source)


def iv_maturity(tenor_days: float) -> float:
    """The project grid's maturity (years) nearest ``tenor_days``: the surface node the IV feature reads."""
    return float(grid.MATURITIES[int(np.argmin(np.abs(grid.TENOR_DAYS - tenor_days)))])


def atm_iv(regime: ArrayLike, variance: ArrayLike, maturity: float,
           regimes: tuple[Regime, ...] = REGIMES, chunk: int = 65_536) -> np.ndarray:
    """ATM (ln K/F = 0) implied vol at ``maturity`` as the synthetic market prices its surface.

    ``models.heston.iv_surface`` with the parameters of ``regimes[regime]`` and the spot variance as v0
    (floored at ``V_FLOOR``, as ``SyntheticMarket.regime_params``), batched over any shape of inputs.
    """
    r, v = np.broadcast_arrays(np.asarray(regime, dtype=np.int64), np.asarray(variance, dtype=np.float64))
    table = np.array([[g.params.kappa, g.params.theta, g.params.sigma, g.params.rho] for g in regimes])
    params = np.column_stack([table[r.ravel()], np.maximum(v.ravel(), V_FLOOR)])
    out = np.empty(params.shape[0])
    for lo in range(0, params.shape[0], chunk):
        out[lo : lo + chunk] = iv_surface(params[lo : lo + chunk], log_moneyness=np.zeros(1),
                                          maturities=np.array([maturity]))[:, 0, 0]
    if not (np.isfinite(out).all() and (out > 0.0).all()):
        raise ValueError("ATM IV pricing gave a non-positive or non-finite vol")
    return out.reshape(r.shape)


@dataclass
class RegimeData:
    """Raw bar features (n_paths, n_bars, 2), realised variance and exact labels (n_paths, n_bars).

    ``atm_iv`` (n_paths, n_bars): the ATM implied vol at each bar's close when simulated with IV.
    """

    features: np.ndarray
    rv: np.ndarray
    labels: np.ndarray
    seconds: float
    atm_iv: np.ndarray | None = None

    def inputs(self, names: Iterable[str]) -> np.ndarray:
        """Raw model inputs (n_paths, n_bars, F) in the order of ``names``."""
        return model_inputs(self.features, self.atm_iv, names)


def model_inputs(features: np.ndarray, atm_iv: np.ndarray | None, names: Iterable[str]) -> np.ndarray:
    """Raw model inputs (..., F) in the order of ``names`` from bar features (..., 2) and the closes' ATM IV.

    The one mapping from bars to inputs, for training data and for the running feature module alike.
    """
    names = list(names)
    columns = {"ret": features[..., 0], "log_rv": features[..., 1]}
    if atm_iv is not None:
        columns[IV_FEATURE] = np.log(atm_iv)
    missing = [n for n in names if n not in columns]
    if missing:
        raise ValueError(f"features {missing} were not simulated or received (the IV input needs "
                         "regime_paths(..., iv_tenor_days=...) or IVSurface events)")
    return np.stack([columns[n] for n in names], axis=-1)


def regime_paths(n_paths: int, n_bars: int, seed: int, leave_rates: tuple[float, float] = (12.0, 26.0),
                 entry_variance: float | None = CRASH.params.theta, bar_s: int = 3600,
                 sub_s: int = 300, iv_tenor_days: float | None = None) -> RegimeData:
    """Seeded bull/crash paths of the synthetic market's physics, as hourly bar features with exact labels.

    With ``iv_tenor_days`` also the ATM IV at each bar's close (``atm_iv`` at the grid tenor nearest it):
    the bar's regime (its label) and the variance at the close, before a crash-entry jump at that instant
    (the jump belongs to the next bar's regime). The random draws are the same with or without IV.
    """
    if n_paths < 1 or n_bars < 1 or bar_s % sub_s:
        raise ValueError("need n_paths ≥ 1, n_bars ≥ 1 and bar_s a multiple of sub_s")
    started = time.perf_counter()
    m = bar_s // sub_s
    dt = sub_s / SECONDS_PER_YEAR
    rng = np.random.default_rng(seed)
    rates = np.array([[0.0, leave_rates[0]], [leave_rates[1], 0.0]])
    log_closes = np.zeros((n_paths, n_bars * m + 1))
    labels = np.empty((n_paths, n_bars), dtype=np.int64)
    v_close = np.empty((n_paths, n_bars))
    for k, sub in enumerate(markov_heston_steps(REGIMES, rates, np.zeros(n_paths, dtype=np.int64), dt,
                                                n_bars * m, rng, (None, entry_variance))):
        log_closes[:, k + 1] = sub.log_s
        if k % m == m - 1:
            labels[:, k // m], v_close[:, k // m] = sub.regime, sub.v_end
    features, rv = bar_features(np.exp(log_closes), m, bar_s)
    iv = None if iv_tenor_days is None else atm_iv(labels, v_close, iv_maturity(iv_tenor_days))
    return RegimeData(features, rv, labels, time.perf_counter() - started, iv)


# --------------------------------------------------------------------------------------------------
# Networks


def selective_scan(u: torch.Tensor, delta: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                   d: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """``y_t = C_t · h_t + D ∘ u_t`` with ``h_t = exp(Δ_t A) ∘ h_{t−1} + Δ_t B_t u_t`` and ``h_0 = 0``.

    Shapes: u, delta (batch, T, E); a (E, N), diagonal A per channel; b, c (batch, T, N); d (E,). A
    sequential loop over time (one fused multiply-add per step, time slices by ``unbind`` so autograd does
    not build a full-size gradient per step), in time chunks so long evaluation streams stay small in memory.
    """
    batch, length, channels = u.shape
    h = u.new_zeros(batch, channels, a.shape[1])
    out = []
    for start in range(0, length, chunk):
        dt = delta[:, start : start + chunk]
        decay = torch.exp(dt.unsqueeze(-1) * a).transpose(0, 1)
        drive = ((dt * u[:, start : start + chunk]).unsqueeze(-1) * b[:, start : start + chunk].unsqueeze(2))
        states = []
        for decay_t, drive_t in zip(decay.unbind(0), drive.transpose(0, 1).unbind(0), strict=True):
            h = torch.addcmul(drive_t, decay_t, h)
            states.append(h)
        out.append((torch.stack(states, dim=1) * c[:, start : start + chunk].unsqueeze(2)).sum(-1))
    return torch.cat(out, dim=1) + u * d


class SelectiveSSMBlock(nn.Module):
    """One pre-norm residual Mamba-style block: x + out(scan(conv(in(x))) ∘ SiLU(gate))."""

    def __init__(self, d_model: int, d_state: int, expand: int, conv_kernel: int, dt_rank: int,
                 dt_min: float, dt_max: float) -> None:
        super().__init__()
        inner = expand * d_model
        self.norm = nn.LayerNorm(d_model)
        self.in_proj = nn.Linear(d_model, 2 * inner)
        self.conv = nn.Conv1d(inner, inner, conv_kernel, groups=inner, padding=conv_kernel - 1)
        self.x_proj = nn.Linear(inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, inner)
        # Mamba's init: Δ log-uniform in [dt_min, dt_max] through the softplus; A_n = −n per channel.
        dt = torch.exp(torch.rand(inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        a_init = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32))
        self.a_log = nn.Parameter(a_init.repeat(inner, 1))
        self.d = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(inner, d_model)
        self.dt_rank, self.d_state = dt_rank, d_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, T, d_model) → same shape; causal (step t sees steps ≤ t only)."""
        length = x.shape[1]
        u, gate = self.in_proj(self.norm(x)).chunk(2, dim=-1)
        u = F.silu(self.conv(u.transpose(1, 2))[..., :length].transpose(1, 2))
        dt, b, c = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))
        y = selective_scan(u, delta, -torch.exp(self.a_log), b, c, self.d)
        return x + self.out_proj(y * F.silu(gate))


class RegimeSSM(nn.Module):
    """Features (batch, T, F) → crash logits (batch, T) through stacked selective SSM blocks."""

    def __init__(self, n_features: int, d_model: int = 16, d_state: int = 8, expand: int = 2,
                 n_layers: int = 2, conv_kernel: int = 4, dt_rank: int = 4, dt_min: float = 0.01,
                 dt_max: float = 0.5) -> None:
        super().__init__()
        self.embed = nn.Linear(n_features, d_model)
        self.blocks = nn.ModuleList(SelectiveSSMBlock(d_model, d_state, expand, conv_kernel, dt_rank, dt_min,
                                                      dt_max) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h)).squeeze(-1)


class RegimeGRU(nn.Module):
    """Features (batch, T, F) → crash logits (batch, T): the recurrent baseline."""

    def __init__(self, n_features: int, hidden: int) -> None:
        super().__init__()
        self.gru = nn.GRU(n_features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x)
        return self.head(out).squeeze(-1)


def n_weights(net: nn.Module) -> int:
    """Trainable weights of a network."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def matched_gru_hidden(n_features: int, target: int) -> int:
    """GRU width whose weight count (3(F·h + h² + 2h) + h + 1) is closest to ``target``."""
    return min(range(1, 257), key=lambda h: abs(3 * (n_features * h + h * h + 2 * h) + h + 1 - target))


# --------------------------------------------------------------------------------------------------
# Configuration and the saved detector


@dataclass(frozen=True)
class RegimeConfig:
    """Everything that defines a training run; the same config gives the same models."""

    n_train_paths: int = 128
    n_test_paths: int = 64
    n_bars: int = 4380  # half a year of hourly bars per path
    bar_s: int = 3600
    sub_s: int = 300
    leave_rates: tuple[float, float] = (12.0, 26.0)
    entry_variance: float | None = CRASH.params.theta
    window: int = 256  # bars of a training slice, and the most an online prediction sees
    block: int = 64  # online runs restart every block bars (see the module docstring)
    warmup: int = 48
    d_model: int = 16
    d_state: int = 8
    expand: int = 2
    n_layers: int = 2
    conv_kernel: int = 4
    dt_rank: int = 4
    gru_hidden: int | None = None  # None: matched to the SSM's weight count
    batch: int = 32
    steps: int = 300
    lr: float = 5e-3
    fine_tune_lr_scale: float = 0.1
    fine_tune_steps: int = 100
    vol_windows: tuple[int, ...] = (3, 6, 12, 24, 48, 96)
    seed: int = 0
    num_threads: int = 1
    max_seconds: float | None = 150.0  # per network
    progress: bool = True
    features: tuple[str, ...] = IV_FEATURES  # model inputs, in order; FEATURES: prices only
    iv_tenor_days: float = 30.0  # the IV feature's tenor (the grid's nearest: iv_maturity)

    def __post_init__(self) -> None:
        if not self.features or len(set(self.features)) != len(self.features) or (
            set(self.features) - KNOWN_FEATURES
        ):
            raise ValueError(f"features must be distinct names from {sorted(KNOWN_FEATURES)}, "
                             f"got {self.features}")

    @property
    def uses_iv(self) -> bool:
        return IV_FEATURE in self.features

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RegimeConfig:
        """Inverse of ``asdict`` (tuples restored, unknown keys ignored; no ``features``: a pre-IV model)."""
        known = {f.name for f in fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        values.setdefault("features", FEATURES)
        return cls(**values)


def build_network(kind: Kind, config: RegimeConfig, n_features: int | None = None) -> nn.Module:
    """The SSM of ``config``, or the GRU baseline sized to match it."""
    n_features = len(config.features) if n_features is None else n_features
    ssm = RegimeSSM(n_features, config.d_model, config.d_state, config.expand, config.n_layers,
                    config.conv_kernel, config.dt_rank)
    if kind == "ssm":
        return ssm
    hidden = config.gru_hidden or matched_gru_hidden(n_features, n_weights(ssm))
    return RegimeGRU(n_features, hidden)


@dataclass(frozen=True)
class VolRule:
    """Alarm when the trailing mean annualised realised variance of ``window`` bars exceeds ``threshold``."""

    window: int
    threshold: float

    def score(self, rv: np.ndarray) -> np.ndarray:
        """Trailing mean of ``rv`` (..., T) over the last ``window`` bars (fewer at the start)."""
        return trailing_mean(rv, self.window)

    def alarm(self, rv: np.ndarray) -> np.ndarray:
        """1.0 where the rule alarms, else 0.0 (its 'probability')."""
        return (self.score(rv) > self.threshold).astype(np.float64)

    @classmethod
    def fit(cls, rv: np.ndarray, labels: np.ndarray, windows: Iterable[int], warmup: int) -> VolRule:
        """Window and threshold maximising Youden's J per bar on (training) paths after ``warmup``."""
        best: tuple[float, int, float] = (-math.inf, 0, 0.0)
        truth = labels[:, warmup:].ravel() == 1
        for window in windows:
            score = trailing_mean(rv, window)[:, warmup:].ravel()
            fpr, tpr, thresholds = roc_curve(score, truth)
            k = int(np.argmax(tpr - fpr))
            if tpr[k] - fpr[k] > best[0]:
                # Alarm is score > threshold: put it just below the chosen score.
                best = (float(tpr[k] - fpr[k]), int(window), float(np.nextafter(thresholds[k], -np.inf)))
        return cls(best[1], best[2])


def trailing_mean(x: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last ``window`` values along the last axis, over the available ones at the start."""
    cum = np.concatenate([np.zeros((*x.shape[:-1], 1)), np.cumsum(x, axis=-1)], axis=-1)
    t = np.arange(1, x.shape[-1] + 1)
    lo = np.maximum(t - window, 0)
    return (cum[..., t] - cum[..., lo]) / (t - lo)


@dataclass
class RegimeDetector:
    """A trained network with its input normalisation, configuration, vol-rule baseline and metrics."""

    net: nn.Module
    kind: Kind
    config: RegimeConfig
    mean: np.ndarray
    scale: np.ndarray
    vol_rule: VolRule | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    iv_rule: VolRule | None = None  # on the ATM implied variance (IV²), when the model reads IV

    @property
    def features(self) -> tuple[str, ...]:
        return self.config.features

    def standardise(self, window: ArrayLike) -> torch.Tensor:
        """Raw features (..., T, F) → standardised float32 tensor (batch, T, F)."""
        x = np.asarray(window, dtype=np.float64)
        names = self.features
        if x.ndim not in (2, 3) or x.shape[-1] != len(names) or not np.isfinite(x).all():
            raise ValueError(f"window must be finite (T, {len(names)}) or (B, T, {len(names)}), "
                             f"features {names}; got {x.shape}")
        x = (x - self.mean) / self.scale
        return torch.from_numpy((x if x.ndim == 3 else x[None]).astype(np.float32))

    def predict_proba(self, window: ArrayLike) -> np.ndarray:
        """Crash probability after each bar of a window of raw bar features, run from a zero state.

        ``window`` is (T, F) or (B, T, F) in ``config.features`` order; returns (T,) or (B, T).
        """
        x = self.standardise(window)
        self.net.eval()
        with ThreadLimit(self.config.num_threads), torch.no_grad():
            p = torch.sigmoid(self.net(x)).double().numpy()
        return p if np.ndim(window) == 3 else p[0]

    def save(self, path: Path | str) -> Path:
        """Write weights and metadata; a directory gets ``MODEL_FILE`` (the GRU: ``GRU_FILE``) inside."""
        path = Path(path)
        if path.suffix != ".pt":
            path = path / (MODEL_FILE if self.kind == "ssm" else GRU_FILE)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format_version": FORMAT_VERSION, **grid_meta(), "kind": self.kind, "config": asdict(self.config),
            "features": list(self.features), "bar_s": self.config.bar_s, "sub_s": self.config.sub_s,
            "iv_maturity": iv_maturity(self.config.iv_tenor_days) if self.config.uses_iv else None,
            "normalisation": {"mean": self.mean.tolist(), "scale": self.scale.tolist()},
            "vol_rule": asdict(self.vol_rule) if self.vol_rule else None,
            "iv_rule": asdict(self.iv_rule) if self.iv_rule else None,
            "n_weights": n_weights(self.net), "metrics": self.metrics, "history": self.history,
            "info": self.info,
        }
        if isinstance(self.net, RegimeGRU):
            meta["gru_hidden"] = self.net.gru.hidden_size
        torch.save({"meta": json.dumps(meta, default=float), "net": self.net.state_dict()}, path)
        return path

    @classmethod
    def load(cls, path: Path | str) -> RegimeDetector:
        """Read a saved detector (a directory means its ``MODEL_FILE``); features from its metadata."""
        path = Path(path)
        if path.is_dir():
            path = path / MODEL_FILE
        if not path.is_file():
            raise ValueError(f"no regime detector at {path} (train one: python main.py --mode train "
                             f"--model regime)")
        payload, meta = load_checked(path, "regime detector", FORMAT_VERSION)
        names = tuple(meta["features"])
        if set(names) - KNOWN_FEATURES:
            raise ValueError(f"regime detector at {path} reads unknown features {meta['features']}")
        config = RegimeConfig.from_dict({**meta["config"], "features": names})
        if meta["kind"] == "gru":
            config = RegimeConfig.from_dict({**asdict(config), "gru_hidden": meta["gru_hidden"]})
        net = build_network(meta["kind"], config)
        net.load_state_dict(payload["net"])
        net.eval()
        rule = VolRule(**meta["vol_rule"]) if meta.get("vol_rule") else None
        iv_rule = VolRule(**meta["iv_rule"]) if meta.get("iv_rule") else None
        return cls(net, meta["kind"], config, np.asarray(meta["normalisation"]["mean"]),
                   np.asarray(meta["normalisation"]["scale"]), rule, meta.get("metrics", {}),
                   meta.get("history", []), meta.get("info", {}), iv_rule)


# --------------------------------------------------------------------------------------------------
# Training


def _lr(step_no: int, total: int, base: float) -> float:
    """Cosine decay to 5 % of the base rate."""
    return base * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(step_no / max(total, 1), 1.0))))


def _fit(net: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, lr: float, batch: int, window: int,
         warmup: int, seed: int, deadline: float, history: list[dict[str, float]], stage: str,
         progress: bool) -> None:
    """BCE on random ``window``-bar slices of (n, T, F) inputs and (n, T) labels; loss after ``warmup``."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    n, length = y.shape
    if not 0 <= warmup < window <= length:
        raise ValueError(f"need 0 ≤ warmup < window ≤ bars per path, got {warmup}, {window}, {length}")
    offsets = torch.arange(window)
    net.train()
    running = 0.0
    bar = tqdm(range(steps), desc=f"training {stage}", disable=not progress, leave=False)
    for step_no in bar:
        paths = torch.randint(n, (batch,), generator=generator)
        starts = torch.randint(length - window + 1, (batch,), generator=generator)
        index = starts[:, None] + offsets
        xb, yb = x[paths[:, None], index], y[paths[:, None], index]
        for group in optimizer.param_groups:
            group["lr"] = _lr(step_no, steps, lr)
        loss = F.binary_cross_entropy_with_logits(net(xb)[:, warmup:], yb[:, warmup:])
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        running = loss.item() if step_no == 0 else 0.95 * running + 0.05 * loss.item()
        if step_no % 25 == 0 or step_no == steps - 1:
            history.append({"step": float(step_no), "loss": running})
            bar.set_postfix(loss=f"{running:.4f}")
        if time.perf_counter() > deadline:
            history.append({"step": float(step_no), "loss": running, "stopped_by_deadline": 1.0})
            break
    net.eval()


def train_detector(kind: Kind, data: RegimeData, config: RegimeConfig) -> RegimeDetector:
    """Pre-train the SSM or the GRU on synthetic paths with exact labels (one torch thread by default)."""
    with ThreadLimit(config.num_threads):
        torch.manual_seed(config.seed + (0 if kind == "ssm" else 1))
        raw = data.inputs(config.features)
        flat = raw.reshape(-1, raw.shape[-1])
        mean, scale = flat.mean(axis=0), flat.std(axis=0)
        scale = np.where(scale > 1e-12, scale, 1.0)
        net = build_network(kind, config)
        x = torch.from_numpy(((raw - mean) / scale).astype(np.float32))
        y = torch.from_numpy(data.labels.astype(np.float32))
        history: list[dict[str, float]] = []
        started = time.perf_counter()
        _fit(net, x, y, steps=config.steps, lr=config.lr, batch=config.batch, window=config.window,
             warmup=config.warmup, seed=config.seed + 7, deadline=started + (config.max_seconds or math.inf),
             history=history, stage=kind, progress=config.progress)
        info = {"train_seconds": time.perf_counter() - started, "n_weights": n_weights(net),
                "n_train_bars": int(data.labels.size), "crash_share": float(data.labels.mean())}
    return RegimeDetector(net, kind, config, mean, scale, history=history, info=info)


def fine_tune(detector: RegimeDetector, features: ArrayLike, labels: ArrayLike | None = None,
              steps: int | None = None, seed: int = 0) -> RegimeDetector:
    """Continue training on real bars (T, F) or (n, T, F) at the pre-training rate × ``fine_tune_lr_scale``.

    Without ``labels`` the targets are the pre-trained model's own decisions (p ≥ 0.5), fixed before any
    update (see the module docstring for what that can and cannot do). Returns a new detector; the input
    normalisation stays the pre-training one, which the network's weights assume.
    """
    config = detector.config
    raw = np.asarray(features, dtype=np.float64)
    raw = raw if raw.ndim == 3 else raw[None]
    length = raw.shape[1]
    if length < 8:
        raise ValueError(f"fine-tuning needs at least 8 bars, got {length}")
    if labels is None:
        target = (detector.predict_proba(raw) >= ALARM).astype(np.float32)
        source = "pseudo-labels (pre-trained model, p >= 0.5)"
    else:
        target = np.asarray(labels, dtype=np.float32).reshape(raw.shape[:2])
        source = "given labels"
    tuned = copy.deepcopy(detector)
    window = min(config.window, length)
    warmup = min(config.warmup, window // 2)
    lr = config.lr * config.fine_tune_lr_scale
    n_steps = steps if steps is not None else config.fine_tune_steps
    with ThreadLimit(config.num_threads):
        torch.manual_seed(seed)
        _fit(tuned.net, tuned.standardise(raw), torch.from_numpy(target), steps=n_steps, lr=lr,
             batch=min(config.batch, 8 * raw.shape[0]), window=window, warmup=warmup, seed=seed + 11,
             deadline=math.inf, history=tuned.history, stage="fine-tune", progress=False)
    tuned.info = {**tuned.info, "fine_tune": [*tuned.info.get("fine_tune", []),
                                              {"n_bars": int(raw.shape[0] * length), "steps": n_steps,
                                               "lr": lr, "targets": source}]}
    return tuned


# --------------------------------------------------------------------------------------------------
# Metrics


def roc_auc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting half."""
    s, y = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(labels).ravel().astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC AUC needs both classes")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # 0-based rank of each distinct value's first occurrence
    ranks = (first + (counts + 1) / 2.0)[inverse]  # 1-based average ranks
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FPR, TPR, threshold) for 'positive when score ≥ threshold', thresholds descending from +inf."""
    s, y = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(labels).ravel().astype(bool)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each distinct score
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    tpr = np.r_[0.0, tp / max(int(y.sum()), 1)]
    fpr = np.r_[0.0, fp / max(int((~y).sum()), 1)]
    return fpr, tpr, np.r_[np.inf, s[last]]


def detection_delays(prob: ArrayLike, labels: ArrayLike, start: int = 0,
                     threshold: float = ALARM) -> np.ndarray:
    """Bars from each bull → crash switch (first crash bar ≥ ``start`` + 1) to the first bar with
    probability ≥ ``threshold`` within that crash spell; ``inf`` when the spell ends first."""
    p, y = np.asarray(prob, dtype=np.float64), np.asarray(labels)
    delays = []
    for s in np.flatnonzero((y[1:] == 1) & (y[:-1] == 0)) + 1:
        if s <= start:
            continue
        ends = np.flatnonzero(y[s:] != 1)
        spell = slice(s, s + (int(ends[0]) if ends.size else y.size - s))
        hits = np.flatnonzero(p[spell] >= threshold)
        delays.append(float(hits[0]) if hits.size else math.inf)
    return np.array(delays)


def false_alarms(prob: ArrayLike, labels: ArrayLike, start: int = 0, threshold: float = ALARM) -> int:
    """Crossings into alarm (reaching ``threshold`` from below) at bars ≥ ``start`` + 1 truly in bull."""
    p, y = np.asarray(prob, dtype=np.float64), np.asarray(labels)
    crossing = (p[1:] >= threshold) & (p[:-1] < threshold) & (y[1:] == 0)
    return int(crossing[start:].sum())


def evaluate_probabilities(prob: np.ndarray, labels: np.ndarray, warmup: int, bar_s: float,
                           score: np.ndarray | None = None) -> dict[str, Any]:
    """Per-bar AUC (of ``score`` if given, else ``prob``), detection delays, false alarms; paths (n, T)."""
    auc_score = prob if score is None else score
    delays = np.concatenate([detection_delays(p, y, warmup) for p, y in zip(prob, labels, strict=True)])
    alarms = sum(false_alarms(p, y, warmup) for p, y in zip(prob, labels, strict=True))
    years = labels[:, warmup:].size * bar_s / SECONDS_PER_YEAR
    y = labels[:, warmup:] == 1
    alarm = prob[:, warmup:] >= ALARM
    hours = bar_s / 3600.0
    median = float(np.median(delays)) if delays.size else math.nan
    detected = delays[np.isfinite(delays)]
    return {
        "roc_auc": roc_auc(auc_score[:, warmup:], y),
        "n_switches": int(delays.size),
        "detection_rate": float(np.isfinite(delays).mean()) if delays.size else math.nan,
        "median_delay_bars": median,
        "median_delay_hours": median * hours,
        "median_delay_detected_hours": float(np.median(detected)) * hours if detected.size else math.nan,
        "false_alarms": int(alarms),
        "simulated_years": years,
        "false_alarms_per_year": alarms / years,
        "bull_alarm_share": float(alarm[~y].mean()),
        "crash_alarm_share": float(alarm[y].mean()),
    }


def online_probabilities(detector: RegimeDetector, features: np.ndarray) -> np.ndarray:
    """Crash probability at every bar of paths (n, T, F) as the bot computes it online (module docstring)."""
    config = detector.config
    context, block = config.window - config.block, config.block
    n, length = features.shape[:2]
    out = np.empty((n, length))
    starts = list(range(0, length, block))
    full = [s for s in starts if s >= context and s + block <= length]  # same-length runs: batched
    for s in sorted(set(starts) - set(full)):  # short history at the start, a partial last block
        lo, end = max(0, s - context), min(s + block, length)
        out[:, s:end] = detector.predict_proba(features[:, lo:end])[:, s - lo :]
    group = max(1, 256 // n)
    for k in range(0, len(full), group):
        chunk = full[k : k + group]
        windows = np.concatenate([features[:, s - context : s + block] for s in chunk])
        p = detector.predict_proba(windows)[:, context:].reshape(len(chunk), n, block)
        for s, values in zip(chunk, p, strict=True):
            out[:, s : s + block] = values
    return out


# --------------------------------------------------------------------------------------------------
# Report and entry point


def plot_report(path: Path, labels: np.ndarray, probs: dict[str, np.ndarray], scores: dict[str, np.ndarray],
                bar_s: float, warmup: int, span: int = 2000) -> Path:
    """PNG: probabilities against the true regime on one held-out path, and the per-bar ROC curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    switches = ((labels[:, 1:] == 1) & (labels[:, :-1] == 0)).sum(axis=1)
    pick = int(np.argmax(switches))
    t = np.arange(min(span, labels.shape[1])) * bar_s / 86400.0
    fig, axes = plt.subplots(1, 2, figsize=(15, 4.5), gridspec_kw={"width_ratios": [2.4, 1]})
    ax = axes[0]
    ax.fill_between(t, 0, labels[pick, : t.size], step="post", color="tab:red", alpha=0.15,
                    label="crash (truth)")
    for name, p in probs.items():
        ax.plot(t, p[pick, : t.size], lw=0.9, label=name)
    ax.axhline(ALARM, color="gray", ls=":", lw=0.8)
    ax.set_xlabel("days")
    ax.set_ylabel("crash probability / alarm")
    ax.set_title(f"held-out path {pick}: {int(switches[pick])} bull→crash switches")
    ax.legend(fontsize=7, loc="upper right")
    for name, s in scores.items():
        fpr, tpr, _ = roc_curve(s[:, warmup:], labels[:, warmup:])
        axes[1].plot(fpr, tpr, label=f"{name} (AUC {roc_auc(s[:, warmup:], labels[:, warmup:]):.3f})")
    axes[1].plot([0, 1], [0, 1], color="gray", ls=":")
    axes[1].set_xlabel("false positive rate")
    axes[1].set_ylabel("true positive rate")
    axes[1].set_title("ROC per bar, held-out paths")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """Plain-text metrics table, one row per detector."""
    lines = [f"{'detector':<10}{'ROC AUC':>9}{'median delay':>15}{'detected':>10}{'delay|det.':>12}"
             f"{'false alarms/yr':>17}{'bull in alarm':>15}", "-" * 88]
    for name, m in results.items():
        delay = (f"{m['median_delay_bars']:.0f} b / {m['median_delay_hours']:.0f} h"
                 if math.isfinite(m["median_delay_bars"]) else "inf")
        lines.append(f"{name:<10}{m['roc_auc']:>9.4f}{delay:>15}{m['detection_rate']:>10.1%}"
                     f"{m['median_delay_detected_hours']:>10.1f} h{m['false_alarms_per_year']:>17.1f}"
                     f"{m['bull_alarm_share']:>15.1%}")
    return "\n".join(lines)


def regime_main(out: Path = DEFAULT_MODEL_DIR, seed: int = 0, config: RegimeConfig | None = None) -> int:
    """Simulate, train SSM and GRU, fit the vol rule (and the IV rule when the models read IV), evaluate on
    held-out seeds; write models and report."""
    out = Path(out)
    config = config or RegimeConfig(seed=seed)
    started = time.perf_counter()
    torch.set_num_threads(config.num_threads)
    tenor = config.iv_tenor_days if config.uses_iv else None
    train = regime_paths(config.n_train_paths, config.n_bars, config.seed, config.leave_rates,
                         config.entry_variance, config.bar_s, config.sub_s, tenor)
    test = regime_paths(config.n_test_paths, config.n_bars, config.seed + 1_000_003, config.leave_rates,
                        config.entry_variance, config.bar_s, config.sub_s, tenor)
    rule = VolRule.fit(train.rv, train.labels, config.vol_windows, config.warmup)
    iv_rule = None
    if train.atm_iv is not None:  # the same rule on the implied variance; one bar is a window too
        iv_windows = tuple(sorted({1, *config.vol_windows}))
        iv_rule = VolRule.fit(train.atm_iv**2, train.labels, iv_windows, config.warmup)
    detectors = {kind: train_detector(kind, train, config) for kind in ("ssm", "gru")}
    test_inputs = test.inputs(config.features)
    t0 = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    probs: dict[str, np.ndarray] = {}
    scores: dict[str, np.ndarray] = {}
    for kind, detector in detectors.items():
        detector.vol_rule, detector.iv_rule = rule, iv_rule
        p = online_probabilities(detector, test_inputs)
        probs[kind] = scores[kind] = p
        results[kind] = {**evaluate_probabilities(p, test.labels, config.warmup, config.bar_s),
                         "n_weights": n_weights(detector.net),
                         "train_seconds": detector.info["train_seconds"]}
    probs["vol rule"], scores["vol rule"] = rule.alarm(test.rv), rule.score(test.rv)
    results["vol rule"] = {**evaluate_probabilities(probs["vol rule"], test.labels, config.warmup,
                                                    config.bar_s, score=scores["vol rule"]),
                           "window_bars": rule.window, "threshold_vol": math.sqrt(rule.threshold)}
    if iv_rule is not None and test.atm_iv is not None:
        iv2 = test.atm_iv**2
        probs["IV rule"], scores["IV rule"] = iv_rule.alarm(iv2), iv_rule.score(iv2)
        results["IV rule"] = {**evaluate_probabilities(probs["IV rule"], test.labels, config.warmup,
                                                       config.bar_s, score=scores["IV rule"]),
                              "window_bars": iv_rule.window, "threshold_iv": math.sqrt(iv_rule.threshold)}
    evaluation_seconds = time.perf_counter() - t0
    report_dir = out / REPORT_DIR
    plot = plot_report(report_dir / PLOT_FILE, test.labels, probs, scores, config.bar_s, config.warmup)
    metrics = {
        "detectors": results, "bar_s": config.bar_s, "sub_s": config.sub_s, "features": list(config.features),
        "iv_maturity_days": iv_maturity(config.iv_tenor_days) * 365.0 if config.uses_iv else None,
        "warmup_bars": config.warmup, "alarm_threshold": ALARM,
        "data": {"train_paths": config.n_train_paths, "test_paths": config.n_test_paths,
                 "bars_per_path": config.n_bars, "train_seed": config.seed,
                 "test_seed": config.seed + 1_000_003, "leave_rates_per_year": list(config.leave_rates),
                 "entry_variance": config.entry_variance, "train_crash_share": float(train.labels.mean()),
                 "test_crash_share": float(test.labels.mean()),
                 "simulation_seconds": train.seconds + test.seconds},
        "evaluation_seconds": evaluation_seconds, "plot": str(plot),
    }
    paths = []
    for detector in detectors.values():
        detector.metrics = metrics
        paths.append(detector.save(out))
    metrics["total_seconds"] = time.perf_counter() - started
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "metrics.json").write_text(json.dumps({**metrics, "config": asdict(config)}, indent=2,
                                                        default=float))
    print(f"regime detector: {config.n_train_paths}×{config.n_bars} train bars, {config.n_test_paths} "
          f"held-out paths (seed {config.seed + 1_000_003}), {config.bar_s // 60}-min bars of "
          f"{config.sub_s // 60}-min "
          f"closes; SSM {results['ssm']['n_weights']} weights, GRU {results['gru']['n_weights']}")
    print(f"time: simulation {metrics['data']['simulation_seconds']:.0f} s, SSM "
          f"{results['ssm']['train_seconds']:.0f} s, GRU {results['gru']['train_seconds']:.0f} s, evaluation "
          f"{evaluation_seconds:.0f} s, total {metrics['total_seconds']:.0f} s")
    print(f"vol rule: {rule.window}-bar realised vol > {math.sqrt(rule.threshold):.1%}; "
          f"{results['ssm']['n_switches']} held-out bull→crash switches, "
          f"{metrics['data']['test_crash_share']:.1%} of bars in crash")
    if iv_rule is not None:
        print(f"IV rule: {iv_rule.window}-bar mean ATM {iv_maturity(config.iv_tenor_days) * 365:.0f}-day "
              f"implied vol (RMS) > {math.sqrt(iv_rule.threshold):.1%}; "
              f"features {', '.join(config.features)}")
    print(format_table(results))
    print(f"saved {', '.join(str(p) for p in paths)}; report {report_dir}")
    return 0


__all__ = [
    "DEFAULT_MODEL_DIR",
    "FEATURES",
    "IV_FEATURE",
    "IV_FEATURES",
    "MODEL_FILE",
    "CloseSampler",
    "RegimeConfig",
    "RegimeData",
    "RegimeDetector",
    "RegimeGRU",
    "RegimeSSM",
    "SelectiveSSMBlock",
    "VolRule",
    "atm_iv",
    "bar_features",
    "build_network",
    "closes_from_events",
    "closes_from_journal",
    "detection_delays",
    "evaluate_probabilities",
    "false_alarms",
    "fine_tune",
    "format_table",
    "iv_maturity",
    "n_weights",
    "online_probabilities",
    "regime_main",
    "regime_paths",
    "roc_auc",
    "roc_curve",
    "selective_scan",
    "trailing_mean",
    "train_detector",
]
