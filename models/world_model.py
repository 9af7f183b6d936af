"""World model of the IV surface: a convolutional β-VAE compresses each surface, a GRU learns how it moves.

Why: the hedger needs more than today's surface. A low-dimensional state it can forecast, measure the
strangeness of (latent energy) and push into counterfactuals ("what if a crash starts now?") lets it
rehearse tail events the history has seen only a few times (seed 003: VAE + LSTM "volatility world model").

The pieces, in the order the pipeline runs:

* **Data.** ``surface_sequences``: regime-switching Heston paths with the synthetic market's physics
  (``adapters/synthetic.py`` / ``config/default.toml [market]``): the ``BULL`` and ``CRASH`` regimes of
  ``models.simulation``, leaving rates 4 and 26 per year, variance jumping up to the crash's θ on entering
  a crash, steps by ``models.simulation.markov_heston_steps`` (QE) with the current regime's dynamics, then
  the regime chain advanced exactly (``expm(Q dt)``). At each step the surface is ``iv_surface`` of the
  current regime's (κ, θ, σ, ρ) with ``v0`` = the path's current variance, as the synthetic market prices it.
  Paths start from the chain's stationary law after a burn-in, so crashes appear at their natural share.
  Far-OTM short-dated points of a calm surface can price below the quadrature's floor (IV 0 or NaN);
  they are filled flat from the nearest valid strike of the same maturity (counted in ``n_filled``).
* **VAE.** Each grid point is standardised with the training mean and deviation; a small CNN over the
  1×10×6 surface gives (μ, log σ²) of a ``latent_dim`` Gaussian; a mirrored decoder maps a latent back.
  Loss: squared error summed over the 60 points + β·KL(q(z|x) ‖ N(0, I)) (β-VAE; small β, because the
  latent is used as a state, not for sampling).
* **Dynamics.** A GRU reads the sequence of latent means and predicts the next one as a residual
  ``z_{t+1} = z_t + head(h_t)`` (so an untrained head is the naive forecast). It is trained on the
  *decoded* surface error through the frozen decoder (the metric that matters) plus a small latent term.
* **Baselines.** PCA (``models.surrogate.SurfacePCA``) with the same number of components for
  reconstruction (MSE and SSIM), and "tomorrow = today" for forecasting, on held-out paths.
* **Energy and counterfactuals.** ``latent_energy`` is the squared Mahalanobis distance of a latent to
  the training latents (mean ≈ ``latent_dim`` on training data). ``hallucinate`` pushes the last latent
  toward the crash-regime centroid by ``shock_scale`` and rolls the dynamics forward.

The default step is one week (``DEFAULT_DT``): at daily steps the best forecast differs from "tomorrow =
today" by less than a compressed surface's reconstruction error (switches are rare, mean reversion slow),
so there would be nothing for a dynamics model to learn that the naive forecast lacks.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import nn

from models import grid
from models.heston import iv_surface
from models.simulation import BULL, CRASH, Regime, generator_matrix, markov_heston_steps
from models.surrogate import IV_FLOOR, SurfacePCA, ThreadLimit, grid_hash, grid_meta, load_checked

FORMAT_VERSION = 1
DEFAULT_MODEL_DIR = Path("var/models/world_model")
MODEL_FILE = "world_model.pt"
PLOT_FILE = "counterfactual.png"
DEFAULT_DT = 7.0 / 365.0
# The synthetic market's world (config/default.toml [market], adapters/synthetic.py _default_regimes).
DEFAULT_REGIMES: tuple[Regime, ...] = (BULL, CRASH)
DEFAULT_LEAVE_RATES: tuple[float, ...] = (4.0, 26.0)
DEFAULT_ENTRY_VARIANCE: tuple[float | None, ...] = (None, CRASH.params.theta)
ATM_ROW = int(np.argmin(np.abs(grid.LOG_MONEYNESS)))
TARGETS = {"world_model_beats_naive": True, "counterfactual_plot": True}


# --------------------------------------------------------------------------------------------------
# Data


@dataclass
class SequenceSet:
    """Surfaces (n_paths, steps, 10, 6), exact regime labels and variances (n_paths, steps)."""

    surfaces: np.ndarray
    labels: np.ndarray
    variance: np.ndarray
    n_filled: int
    seconds: float
    from_cache: bool = False


def stationary_distribution(leave_rates: Sequence[float]) -> np.ndarray:
    """Stationary law of the chain leaving regime i at ``leave_rates[i]`` toward the others uniformly."""
    rates = _rate_matrix(leave_rates)
    q = generator_matrix(rates)
    a = np.vstack([q.T, np.ones(q.shape[0])])
    b = np.zeros(q.shape[0] + 1)
    b[-1] = 1.0
    pi = np.linalg.lstsq(a, b, rcond=None)[0]
    return np.clip(pi, 0.0, None) / np.clip(pi, 0.0, None).sum()


def _rate_matrix(leave_rates: Sequence[float]) -> np.ndarray:
    """Per-year switching rates, split evenly over the other regimes (as the synthetic market does)."""
    n = len(leave_rates)
    rates = np.zeros((n, n))
    for i, leave in enumerate(leave_rates):
        rates[i, :] = leave / max(n - 1, 1)
        rates[i, i] = 0.0
    return rates


def fill_invalid(surfaces: np.ndarray, floor: float = IV_FLOOR) -> tuple[np.ndarray, int]:
    """Replace NaN / sub-floor points by the nearest valid strike of the same maturity (flat wings)."""
    out = np.array(surfaces, dtype=np.float64, copy=True)
    bad = ~np.isfinite(out) | (np.nan_to_num(out, nan=0.0) <= floor)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return out, 0
    rows = np.arange(out.shape[-2])
    for index in zip(*np.nonzero(bad.any(axis=-2)), strict=True):
        where = (*index[:-1], slice(None), index[-1])
        good = np.flatnonzero(~bad[where])
        if good.size == 0:
            raise ValueError("a maturity column has no valid implied volatility at all")
        nearest = good[np.argmin(np.abs(rows[:, None] - good[None, :]), axis=1)]
        out[where] = out[where][nearest]
    return out, n_bad


def surface_sequences(
    n_paths: int,
    steps: int,
    dt: float = DEFAULT_DT,
    seed: int = 0,
    regimes: Sequence[Regime] = DEFAULT_REGIMES,
    leave_rates: Sequence[float] = DEFAULT_LEAVE_RATES,
    entry_variance: Sequence[float | None] = DEFAULT_ENTRY_VARIANCE,
    burn_in: int = 16,
    cache_dir: Path | str | None = None,
    batch_size: int = 4096,
) -> SequenceSet:
    """Seeded regime-switching Heston paths and the IV surface the synthetic market would show at each step.

    ``labels[p, k]`` is the regime whose parameters priced ``surfaces[p, k]`` and whose dynamics drive
    step k → k+1. With ``cache_dir`` the set is stored as an .npz named by a hash of its definition.
    """
    if n_paths < 1 or steps < 1 or dt <= 0.0 or burn_in < 0:
        raise ValueError("need n_paths ≥ 1, steps ≥ 1, dt > 0 and burn_in ≥ 0")
    if not (len(regimes) == len(leave_rates) == len(entry_variance)):
        raise ValueError("regimes, leave_rates and entry_variance need one entry per regime")
    cache_file = None
    if cache_dir is not None:
        key = json.dumps([[(asdict(r.params), r.mu, r.name) for r in regimes], list(leave_rates),
                          list(entry_variance), n_paths, steps, dt, seed, burn_in, grid_hash(), IV_FLOOR,
                          FORMAT_VERSION], default=float)
        name = f"sequences_p{n_paths}_k{steps}_s{seed}_{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
        cache_file = Path(cache_dir) / name
        if cache_file.is_file():
            with np.load(cache_file) as data:
                return SequenceSet(data["surfaces"], data["labels"], data["variance"], int(data["n_filled"]),
                                   float(data["seconds"]), from_cache=True)
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    initial = rng.choice(len(regimes), size=n_paths, p=stationary_distribution(leave_rates))
    labels = np.empty((n_paths, steps), dtype=np.int64)
    variance = np.empty((n_paths, steps))
    chain = markov_heston_steps(regimes, _rate_matrix(leave_rates), initial, dt, burn_in + steps, rng,
                                entry_variance)
    for k, sub in enumerate(islice(chain, burn_in, None)):
        labels[:, k], variance[:, k] = sub.regime, sub.v_start
    params = np.empty((n_paths * steps, 5))
    flat_labels, flat_var = labels.ravel(), variance.ravel()
    for index, regime in enumerate(regimes):
        p = regime.params
        params[flat_labels == index] = (p.kappa, p.theta, p.sigma, p.rho, 0.0)
    # A variance of exactly 0 (QE's point mass) is no Heston state the pricer accepts; 1e-8 is 0.01 % vol.
    params[:, 4] = np.maximum(flat_var, 1e-8)
    priced = np.concatenate([iv_surface(params[i : i + batch_size])
                             for i in range(0, params.shape[0], batch_size)])
    surfaces, n_filled = fill_invalid(priced.reshape(n_paths, steps, *grid.SHAPE))
    result = SequenceSet(surfaces, labels, variance, n_filled, time.perf_counter() - started)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, surfaces=surfaces, labels=labels, variance=variance, n_filled=n_filled,
                            seconds=result.seconds)
        tmp.replace(cache_file)
    return result


# --------------------------------------------------------------------------------------------------
# Networks


class SurfaceVAE(nn.Module):
    """Conv β-VAE on standardised 1×10×6 surfaces; the standardisation is part of the module (buffers)."""

    def __init__(self, latent_dim: int, channels: int, hidden: int, mean: np.ndarray,
                 scale: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("surface_mean",
                             torch.as_tensor(np.asarray(mean, dtype=np.float32)).reshape(grid.SHAPE))
        self.register_buffer("surface_scale",
                             torch.as_tensor(np.asarray(scale, dtype=np.float32)).reshape(grid.SHAPE))
        c, n_points = channels, grid.N_STRIKES * grid.N_MATURITIES
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.SiLU(), nn.Conv2d(c, 2 * c, 3, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Linear(2 * c * n_points, hidden), nn.SiLU())
        self.to_stats = nn.Linear(hidden, 2 * latent_dim)
        self.decoder_mlp = nn.Sequential(nn.Linear(latent_dim, hidden), nn.SiLU(),
                                         nn.Linear(hidden, 2 * c * n_points), nn.SiLU())
        self.decoder_conv = nn.Sequential(nn.Conv2d(2 * c, c, 3, padding=1), nn.SiLU(),
                                          nn.Conv2d(c, 1, 3, padding=1))
        self.channels = c

    def standardise(self, iv: torch.Tensor) -> torch.Tensor:
        """IV (n, 10, 6) → standardised points."""
        return (iv - self.surface_mean) / self.surface_scale

    def destandardise(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised points → IV."""
        return x * self.surface_scale + self.surface_mean

    def encode_std(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, log σ²) of q(z | x) for standardised x (n, 10, 6)."""
        stats = self.to_stats(self.encoder(x.unsqueeze(1)))
        mu, logvar = stats.chunk(2, dim=1)
        return mu, logvar.clamp(-20.0, 10.0)

    def decode_std(self, z: torch.Tensor) -> torch.Tensor:
        """Standardised surface (n, 10, 6) of latents (n, d)."""
        h = self.decoder_mlp(z).reshape(z.shape[0], 2 * self.channels, *grid.SHAPE)
        return self.decoder_conv(h).squeeze(1)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reparameterised reconstruction of standardised x, with (μ, log σ²)."""
        mu, logvar = self.encode_std(x)
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype)
        return self.decode_std(mu + eps * torch.exp(0.5 * logvar)), mu, logvar


class LatentDynamics(nn.Module):
    """GRU over latents predicting the next latent as a residual on the current one."""

    def __init__(self, latent_dim: int, hidden: int) -> None:
        super().__init__()
        self.gru = nn.GRU(latent_dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, latent_dim)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, z: torch.Tensor, h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted next latents (B, T, d) for every prefix of z (B, T, d), and the final hidden state."""
        out, h = self.gru(z, h0)
        return z + self.head(out), h

    def rollout(self, history: torch.Tensor, steps: int,
                project: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Mean path (B, steps, d): each prediction (through ``project`` if given) is fed back as input."""
        pred, h = self.forward(history)
        nxt = pred[:, -1:]
        path = []
        for _ in range(steps):
            if project is not None:
                nxt = project(nxt.reshape(-1, nxt.shape[-1])).reshape(nxt.shape)
            path.append(nxt)
            nxt, h = self.forward(nxt, h)
        return torch.cat(path, dim=1) if path else history[:, :0]


# --------------------------------------------------------------------------------------------------
# Configuration and model


@dataclass(frozen=True)
class WorldModelConfig:
    """Everything that defines a training run (data, VAE, dynamics); same config and seed → same model."""

    n_paths: int = 512
    steps: int = 52
    dt: float = DEFAULT_DT
    n_test_paths: int = 256
    latent_dim: int = 6
    channels: int = 16
    hidden: int = 128
    beta: float = 1e-3
    vae_epochs: int = 30
    vae_batch: int = 256
    vae_lr: float = 2e-3
    dyn_hidden: int = 64
    dyn_epochs: int = 30
    dyn_batch: int = 64
    dyn_lr: float = 3e-3
    latent_weight: float = 0.1
    seed: int = 0
    num_threads: int = 1
    cache_dir: str | None = None
    max_seconds: float | None = 480.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorldModelConfig:
        """Inverse of ``asdict`` (unknown keys ignored, so older files still load)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class Hallucination(NamedTuple):
    """A counterfactual: latents (steps + 1, d), decoded surfaces (steps + 1, 10, 6), energy (steps + 1,).

    Index 0 is the shocked state; ``start_energy`` is the energy of the unshocked last latent.
    """

    latents: np.ndarray
    surfaces: np.ndarray
    energy: np.ndarray
    start_energy: float


@dataclass
class WorldModel:
    """Trained VAE + dynamics with the latent statistics energy and counterfactuals are measured against."""

    vae: SurfaceVAE
    dynamics: LatentDynamics
    config: WorldModelConfig
    latent_mean: np.ndarray
    latent_precision: np.ndarray
    centroids: dict[str, list[float]] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def encode(self, surfaces: ArrayLike) -> np.ndarray:
        """Latent means (..., d) of IV surfaces (..., 10, 6)."""
        s = _check_surfaces(surfaces)
        self.vae.eval()
        with torch.no_grad():
            x = self.vae.standardise(torch.from_numpy(s.reshape(-1, *grid.SHAPE).astype(np.float32)))
            mu, _ = self.vae.encode_std(x)
        return mu.double().numpy().reshape(*s.shape[:-2], -1)

    def decode(self, latents: ArrayLike) -> np.ndarray:
        """IV surfaces (..., 10, 6) of latents (..., d)."""
        z = np.asarray(latents, dtype=np.float64)
        self.vae.eval()
        with torch.no_grad():
            x = self.vae.decode_std(torch.from_numpy(z.reshape(-1, z.shape[-1]).astype(np.float32)))
            iv = self.vae.destandardise(x)
        return iv.double().numpy().reshape(*z.shape[:-1], *grid.SHAPE)

    def predict_next(self, latent_history: ArrayLike) -> np.ndarray:
        """Expected next latent (d,) from a history (T, d), or (B, d) from (B, T, d) (no re-encoding)."""
        return self.rollout(latent_history, 1, reencode=False)[..., 0, :]

    def rollout(self, latent_history: ArrayLike, steps: int, shock: ArrayLike | None = None,
                reencode: bool = True) -> np.ndarray:
        """Mean latent path (steps, d) [or (B, steps, d)] after the history, ``shock`` added to its last.

        With ``reencode`` each predicted latent is decoded and encoded again before it is fed back: the
        GRU was trained one step ahead on encodings, and free-running it drifts in directions the decoder
        ignores (the surfaces stay sensible, the latent energy explodes); the round trip keeps the state
        on the encoder's manifold.
        """
        z = np.array(latent_history, dtype=np.float64)
        single = z.ndim == 2
        z = z[None] if single else z
        if z.ndim != 3 or z.shape[1] < 1 or z.shape[2] != self.config.latent_dim:
            raise ValueError(f"latent_history must be (T, {self.config.latent_dim}) or (B, T, d), "
                             f"got {z.shape}")
        if shock is not None:
            z[:, -1] += np.asarray(shock, dtype=np.float64)
        self.dynamics.eval()
        with torch.no_grad():
            project = (lambda q: self.vae.encode_std(self.vae.decode_std(q))[0]) if reencode else None
            path = self.dynamics.rollout(torch.from_numpy(z.astype(np.float32)), steps, project)
        path = path.double().numpy()
        return path[0] if single else path

    def energy(self, latents: ArrayLike) -> np.ndarray:
        """``latent_energy`` against this model's training latents."""
        return latent_energy(latents, self.latent_mean, self.latent_precision)

    def save(self, path: Path | str) -> Path:
        """Write both networks and the metadata (grid and its hash, config, latent statistics, metrics)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format_version": FORMAT_VERSION,
            **grid_meta(), "config": asdict(self.config),
            "latent_mean": self.latent_mean.tolist(), "latent_precision": self.latent_precision.tolist(),
            "centroids": self.centroids, "metrics": self.metrics, "history": self.history, "info": self.info,
        }
        torch.save({"meta": json.dumps(meta, default=float), "vae": self.vae.state_dict(),
                    "dynamics": self.dynamics.state_dict()}, path)
        return path

    @classmethod
    def load(cls, path: Path | str) -> WorldModel:
        """Read a saved model; refuses one trained on another grid (or whose grid hash was edited)."""
        payload, meta = load_checked(path, "world model", FORMAT_VERSION)
        config = WorldModelConfig.from_dict(meta["config"])
        vae_state = payload["vae"]
        vae = SurfaceVAE(config.latent_dim, config.channels, config.hidden, vae_state["surface_mean"].numpy(),
                         vae_state["surface_scale"].numpy())
        vae.load_state_dict(vae_state)
        dynamics = LatentDynamics(config.latent_dim, config.dyn_hidden)
        dynamics.load_state_dict(payload["dynamics"])
        vae.eval()
        dynamics.eval()
        return cls(vae, dynamics, config, np.asarray(meta["latent_mean"]),
                   np.asarray(meta["latent_precision"]), meta.get("centroids", {}), meta.get("metrics", {}),
                   meta.get("history", []), meta.get("info", {}))


def _check_surfaces(surfaces: ArrayLike) -> np.ndarray:
    s = np.asarray(surfaces, dtype=np.float64)
    if s.ndim < 2 or s.shape[-2:] != grid.SHAPE:
        raise ValueError(f"surfaces must end in the grid's shape {grid.SHAPE}, got {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("surfaces must be finite")
    return s


def latent_energy(latents: ArrayLike, mean: ArrayLike, precision: ArrayLike) -> np.ndarray:
    """Squared Mahalanobis distance ``(z − m)ᵀ P (z − m)`` to the training latents: how unusual a state is.

    On the training data its mean is the latent size; a crash far from the calm bulk scores high, which is
    what a hedger watching the state wants to see (the seed's "total energy", made scale-free).
    """
    d = np.asarray(latents, dtype=np.float64) - np.asarray(mean, dtype=np.float64)
    return np.einsum("...i,ij,...j->...", d, np.asarray(precision, dtype=np.float64), d)


# --------------------------------------------------------------------------------------------------
# Training


def _lr(step: int, total: int, base: float) -> float:
    """Cosine decay to 5 % of the base rate: late epochs polish instead of bouncing."""
    return base * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(step / max(total, 1), 1.0))))


def _train_vae(config: WorldModelConfig, train: np.ndarray, history: list[dict[str, float]],
               deadline: float) -> SurfaceVAE:
    flat = train.reshape(-1, *grid.SHAPE)
    mean, scale = flat.mean(axis=0), flat.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    vae = SurfaceVAE(config.latent_dim, config.channels, config.hidden, mean, scale)
    x_all = vae.standardise(torch.from_numpy(flat.astype(np.float32)))
    generator = torch.Generator().manual_seed(config.seed + 1)
    optimizer = torch.optim.Adam(vae.parameters(), lr=config.vae_lr)
    n_batches = math.ceil(x_all.shape[0] / config.vae_batch)
    total, step_no = config.vae_epochs * n_batches, 0
    vae.train()
    for epoch in range(config.vae_epochs):
        order = torch.randperm(x_all.shape[0], generator=generator)
        sums = np.zeros(2)
        for start in range(0, x_all.shape[0], config.vae_batch):
            x = x_all[order[start : start + config.vae_batch]]
            for group in optimizer.param_groups:
                group["lr"] = _lr(step_no, total, config.vae_lr)
            recon, mu, logvar = vae(x, generator)
            rec = (recon - x).pow(2).sum(dim=(1, 2)).mean()
            kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1).mean()
            loss = rec + config.beta * kl
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step_no += 1
            sums += (rec.item(), kl.item())
        history.append({"stage": 0.0, "epoch": float(epoch), "recon": sums[0] / n_batches,
                        "kl": sums[1] / n_batches})
        if time.perf_counter() > deadline:
            break
    vae.eval()
    return vae


def _train_dynamics(config: WorldModelConfig, latents: torch.Tensor,
                    decode: Callable[[torch.Tensor], torch.Tensor], targets: torch.Tensor,
                    history: list[dict[str, float]], deadline: float, stage: float = 1.0) -> LatentDynamics:
    """GRU on latent sequences (n, T, d); loss = decoded standardised surface MSE + latent MSE (scaled)."""
    torch.manual_seed(config.seed + 2)
    dynamics = LatentDynamics(latents.shape[-1], config.dyn_hidden)
    latent_scale = latents.reshape(-1, latents.shape[-1]).std(dim=0).clamp_min(1e-6)
    generator = torch.Generator().manual_seed(config.seed + 3)
    optimizer = torch.optim.Adam(dynamics.parameters(), lr=config.dyn_lr)
    n = latents.shape[0]
    n_batches = math.ceil(n / config.dyn_batch)
    total, step_no = config.dyn_epochs * n_batches, 0
    dynamics.train()
    for epoch in range(config.dyn_epochs):
        order = torch.randperm(n, generator=generator)
        running = 0.0
        for start in range(0, n, config.dyn_batch):
            idx = order[start : start + config.dyn_batch]
            z = latents[idx]
            for group in optimizer.param_groups:
                group["lr"] = _lr(step_no, total, config.dyn_lr)
            pred, _ = dynamics(z[:, :-1])
            decoded = decode(pred.reshape(-1, pred.shape[-1])).reshape(targets[idx][:, 1:].shape)
            loss = (decoded - targets[idx][:, 1:]).pow(2).mean()
            loss = loss + config.latent_weight * ((pred - z[:, 1:]) / latent_scale).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(dynamics.parameters(), 1.0)
            optimizer.step()
            step_no += 1
            running += loss.item()
        history.append({"stage": stage, "epoch": float(epoch), "loss": running / n_batches})
        if time.perf_counter() > deadline:
            break
    dynamics.eval()
    return dynamics


def _frozen(module: nn.Module) -> nn.Module:
    frozen = copy.deepcopy(module)
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen.eval()


def train_world_model(config: WorldModelConfig | None = None, data: SequenceSet | None = None) -> WorldModel:
    """Generate (or take) training sequences, train the VAE, then the dynamics on its latent means."""
    config = config or WorldModelConfig()
    with ThreadLimit(config.num_threads):
        torch.manual_seed(config.seed)
        started = time.perf_counter()
        if data is None:
            data = surface_sequences(config.n_paths, config.steps, config.dt, config.seed,
                                     cache_dir=config.cache_dir)
        data_seconds = time.perf_counter() - started
        deadline = time.perf_counter() + (config.max_seconds or math.inf)
        history: list[dict[str, float]] = []
        t0 = time.perf_counter()
        vae = _train_vae(config, data.surfaces, history, deadline)
        vae_seconds = time.perf_counter() - t0
        n_paths, steps = data.surfaces.shape[:2]
        with torch.no_grad():
            x = vae.standardise(torch.from_numpy(data.surfaces.reshape(-1, *grid.SHAPE).astype(np.float32)))
            mu, _ = vae.encode_std(x)
        latents = mu.reshape(n_paths, steps, -1)
        targets = x.reshape(n_paths, steps, *grid.SHAPE)
        t0 = time.perf_counter()
        decoder = _frozen(vae)
        dynamics = _train_dynamics(config, latents, decoder.decode_std, targets, history, deadline)
        dyn_seconds = time.perf_counter() - t0
    z = mu.double().numpy()
    mean = z.mean(axis=0)
    cov = np.cov(z, rowvar=False) + 1e-9 * np.eye(z.shape[1])
    labels = data.labels.ravel()
    names = [r.name for r in DEFAULT_REGIMES]
    centroids = {names[i] if i < len(names) else str(i): z[labels == i].mean(axis=0).tolist()
                 for i in np.unique(labels)}
    info = {"n_train_surfaces": int(labels.size), "n_filled_points": data.n_filled,
            "crash_share": float(np.mean(labels == 1)), "data_seconds": data_seconds,
            "vae_seconds": vae_seconds, "dynamics_seconds": dyn_seconds,
            "train_seconds": vae_seconds + dyn_seconds,
            "n_weights_vae": sum(p.numel() for p in vae.parameters()),
            "n_weights_dynamics": sum(p.numel() for p in dynamics.parameters())}
    return WorldModel(vae, dynamics, config, mean, np.linalg.inv(cov), centroids, {}, history, info)


# --------------------------------------------------------------------------------------------------
# Metrics and baselines


def ssim(x: ArrayLike, y: ArrayLike, window: int = 3, data_range: float | None = None) -> np.ndarray:
    """Structural similarity of surfaces (..., 10, 6), averaged over all ``window``×``window`` patches.

    Wang et al. (2004) with a uniform window (a Gaussian one is pointless on 10×6) and the usual
    C₁ = (0.01 L)², C₂ = (0.03 L)². ``L`` is ``data_range`` or, by default, the range of the reference
    ``x`` (per surface): IV surfaces span a few vol points, and a fixed L = 1 would drown their structure
    in the constants. SSIM(x, x) = 1.
    """
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"x and y need the same (..., rows, cols) shape, got {a.shape} and {b.shape}")
    if data_range is None:
        span = a.max(axis=(-2, -1)) - a.min(axis=(-2, -1))
        big_l = np.maximum(span, 1e-8)[..., None, None]
    else:
        big_l = np.asarray(float(data_range))
    c1, c2 = (0.01 * big_l) ** 2, (0.03 * big_l) ** 2
    view = np.lib.stride_tricks.sliding_window_view
    pa, pb = view(a, (window, window), axis=(-2, -1)), view(b, (window, window), axis=(-2, -1))
    mu_a, mu_b = pa.mean(axis=(-2, -1)), pb.mean(axis=(-2, -1))
    var_a, var_b = pa.var(axis=(-2, -1)), pb.var(axis=(-2, -1))
    cov = (pa * pb).mean(axis=(-2, -1)) - mu_a * mu_b
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return index.mean(axis=(-2, -1))


def _recon_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    err = (pred - truth).reshape(truth.shape[0], -1)
    return {"mse": float(np.mean(err**2)), "rmse": float(np.sqrt(np.mean(err**2))),
            "ssim": float(np.mean(ssim(truth, pred)))}


def evaluate_world_model(model: WorldModel, test: SequenceSet, train: SequenceSet | None = None,
                         pca_dynamics: bool = True) -> dict[str, Any]:
    """Reconstruction (VAE vs PCA vs mean surface) and one-step forecasts (world model vs naive) on ``test``.

    Forecast MSEs are of the next surface in IV units over every step with a successor. ``naive`` is the
    true current surface; ``naive_latent`` decodes the current latent (naive with the same compression);
    ``pca_gru`` is PCA coefficients with the same GRU recipe (when ``train`` is given and asked for).
    """
    surfaces = test.surfaces
    n_paths, steps = surfaces.shape[:2]
    flat = surfaces.reshape(-1, *grid.SHAPE)
    train_flat = (train.surfaces if train is not None else surfaces).reshape(-1, *grid.SHAPE)
    latents = model.encode(surfaces)
    recon = model.decode(latents).reshape(flat.shape)
    pca = SurfacePCA.fit(train_flat, tolerance=0.0, max_components=model.config.latent_dim)
    pca_recon = pca.decode(pca.encode(flat)).reshape(flat.shape)
    mean_surface = np.broadcast_to(train_flat.mean(axis=0), flat.shape)
    result: dict[str, Any] = {
        "n_test_paths": int(n_paths), "steps": int(steps), "latent_dim": model.config.latent_dim,
        "reconstruction": {"vae": _recon_metrics(recon, flat), "pca": _recon_metrics(pca_recon, flat),
                           "mean_surface": _recon_metrics(mean_surface, flat)},
    }
    truth_next = surfaces[:, 1:]
    predicted = model.decode(_one_step(model.dynamics, latents))[:, :-1]
    forecasts = {
        "world_model": predicted,
        "naive": surfaces[:, :-1],
        "naive_latent": recon.reshape(surfaces.shape)[:, :-1],
    }
    if pca_dynamics and train is not None:
        forecasts["pca_gru"] = _pca_gru_forecast(model.config, pca, train, surfaces)
    labels_now = test.labels[:, :-1]
    switch = test.labels[:, 1:] != labels_now
    result["forecast"] = {}
    for name, pred in forecasts.items():
        sq = ((pred - truth_next) ** 2).mean(axis=(-2, -1))
        result["forecast"][name] = {
            "mse": float(sq.mean()), "mse_bull": float(sq[labels_now == 0].mean()),
            "mse_crash": float(sq[labels_now == 1].mean()) if (labels_now == 1).any() else float("nan"),
            "mse_no_switch": float(sq[~switch].mean()),
            "atm30_mse": float(((pred[..., ATM_ROW, 0] - truth_next[..., ATM_ROW, 0]) ** 2).mean()),
        }
    energy = model.energy(latents)
    result["energy"] = {"bull_mean": float(energy[test.labels == 0].mean()),
                        "crash_mean": float(energy[test.labels == 1].mean()) if (test.labels == 1).any()
                        else float("nan")}
    fc = result["forecast"]
    result["world_model_vs_naive"] = fc["world_model"]["mse"] / fc["naive"]["mse"]
    return result


def _one_step(dynamics: LatentDynamics, latents: np.ndarray) -> np.ndarray:
    """Predicted next latent after every prefix of each sequence (n, T, d)."""
    with torch.no_grad():
        pred, _ = dynamics(torch.from_numpy(latents.astype(np.float32)))
    return pred.double().numpy()


def _pca_gru_forecast(config: WorldModelConfig, pca: SurfacePCA, train: SequenceSet,
                      surfaces: np.ndarray) -> np.ndarray:
    """The same GRU recipe on PCA coefficients with PCA's (linear) decoder: is the VAE worth it?"""
    components = torch.from_numpy(pca.components.astype(np.float32))
    n, steps = train.surfaces.shape[:2]
    coeffs = torch.from_numpy(pca.encode(train.surfaces.reshape(-1, *grid.SHAPE)).astype(np.float32))
    std = torch.from_numpy(((train.surfaces.reshape(-1, 60) - pca.mean) / pca.scale).astype(np.float32))

    def decode(c: torch.Tensor) -> torch.Tensor:
        return c @ components

    with ThreadLimit(config.num_threads):
        dynamics = _train_dynamics(config, coeffs.reshape(n, steps, -1), decode,
                                   std.reshape(n, steps, -1), [], math.inf, stage=2.0)
    test_coeffs = pca.encode(surfaces.reshape(-1, *grid.SHAPE)).reshape(*surfaces.shape[:2], -1)
    pred = _one_step(dynamics, test_coeffs)[:, :-1]
    return pca.decode(pred.reshape(-1, pred.shape[-1])).reshape(pred.shape[0], pred.shape[1], *grid.SHAPE)


# --------------------------------------------------------------------------------------------------
# Counterfactuals


def hallucinate(model: WorldModel, start_history: ArrayLike, shock_scale: float = 1.5, steps: int = 26,
                target: ArrayLike | str = "crash") -> Hallucination:
    """Shock the last state toward ``target`` (a latent or a regime centroid's name) and roll forward.

    ``start_history`` is latents (T, d) or surfaces (T, 10, 6). The shocked latent is
    ``z + shock_scale · (target − z)``: 1 lands on the crash centroid, more overshoots it (a worse crash
    than the average one seen). The dynamics then show how the model expects such a state to decay.
    """
    history = np.asarray(start_history, dtype=np.float64)
    if history.ndim == 3 and history.shape[-2:] == grid.SHAPE:
        history = model.encode(history)
    if history.ndim != 2:
        raise ValueError("start_history must be latents (T, d) or surfaces (T, 10, 6)")
    goal = np.asarray(model.centroids[target] if isinstance(target, str) else target, dtype=np.float64)
    last = history[-1]
    shock = shock_scale * (goal - last)
    shocked = last + shock
    path = model.rollout(history, steps, shock=shock)
    latents = np.vstack([shocked[None], path])
    return Hallucination(latents, model.decode(latents), model.energy(latents), float(model.energy(last)))


def plot_counterfactual(model: WorldModel, start_history: np.ndarray, path: Path | str,
                        shock_scale: float = 1.5, steps: int = 26) -> Path:
    """PNG: the hallucinated ATM term structure over time, ATM 30-day IV and energy against no shock."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shocked = hallucinate(model, start_history, shock_scale, steps)
    calm = model.rollout(start_history, steps)
    calm_latents = np.vstack([start_history[-1][None], calm])
    calm_surfaces = model.decode(calm_latents)
    weeks = np.arange(steps + 1) * model.config.dt * 52.0
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    cmap = plt.get_cmap("magma")
    for k in range(0, steps + 1, max(1, steps // 8)):
        axes[0].plot(grid.TENOR_DAYS, shocked.surfaces[k, ATM_ROW], color=cmap(k / (steps + 1)),
                     label=f"week {weeks[k]:.0f}")
    axes[0].plot(grid.TENOR_DAYS, calm_surfaces[0, ATM_ROW], "k--", label="before shock")
    axes[0].set_xlabel("tenor (days)")
    axes[0].set_ylabel("ATM implied vol")
    axes[0].set_title(f"hallucinated ATM term structure (shock ×{shock_scale})")
    axes[0].legend(fontsize=7)
    axes[1].plot(weeks, shocked.surfaces[:, ATM_ROW, 0], color="tab:red", label="shocked, 30d ATM")
    axes[1].plot(weeks, calm_surfaces[:, ATM_ROW, 0], color="tab:blue", label="no shock, 30d ATM")
    axes[1].plot(weeks, shocked.surfaces[:, ATM_ROW, -1], color="tab:red", ls=":", label="shocked, 360d ATM")
    axes[1].plot(weeks, calm_surfaces[:, ATM_ROW, -1], color="tab:blue", ls=":", label="no shock, 360d ATM")
    axes[1].set_xlabel("weeks after shock")
    axes[1].set_ylabel("implied vol")
    axes[1].set_title("decay back toward normal")
    axes[1].legend(fontsize=7)
    axes[2].semilogy(weeks, shocked.energy, color="tab:red", label="shocked")
    axes[2].semilogy(weeks, model.energy(calm_latents), color="tab:blue", label="no shock")
    axes[2].axhline(model.config.latent_dim, color="gray", ls="--", label="training mean")
    axes[2].set_xlabel("weeks after shock")
    axes[2].set_ylabel("latent energy")
    axes[2].set_title("latent energy")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# Report and entry point


def format_table(metrics: dict[str, Any]) -> str:
    """Plain-text tables: reconstruction (MSE, SSIM) and one-step forecast MSE on held-out paths."""
    lines = [f"{'reconstruction':<16}{'MSE':>12}{'RMSE':>10}{'SSIM':>9}", "-" * 47]
    for name, m in metrics["reconstruction"].items():
        lines.append(f"{name:<16}{m['mse']:>12.3e}{m['rmse']:>10.5f}{m['ssim']:>9.4f}")
    lines += ["", f"{'next surface':<16}{'MSE':>12}{'bull':>12}{'crash':>12}{'no switch':>12}", "-" * 64]
    for name, m in metrics["forecast"].items():
        lines.append(f"{name:<16}{m['mse']:>12.3e}{m['mse_bull']:>12.3e}{m['mse_crash']:>12.3e}"
                     f"{m['mse_no_switch']:>12.3e}")
    return "\n".join(lines)


def world_model_main(out: Path = DEFAULT_MODEL_DIR, seed: int = 0,
                     config: WorldModelConfig | None = None) -> int:
    """Generate data, train VAE then dynamics, evaluate against PCA and naive; write model, report, plot."""
    out = Path(out)
    config = config or WorldModelConfig(seed=seed, cache_dir=str(out / "data"))
    started = time.perf_counter()
    train = surface_sequences(config.n_paths, config.steps, config.dt, config.seed,
                              cache_dir=config.cache_dir)
    test = surface_sequences(config.n_test_paths, config.steps, config.dt, config.seed + 1_000_003,
                             cache_dir=config.cache_dir)
    model = train_world_model(config, train)
    with ThreadLimit(config.num_threads):
        t0 = time.perf_counter()
        metrics = evaluate_world_model(model, test, train)
        metrics["evaluation_seconds"] = time.perf_counter() - t0
    # Counterfactual from a calm held-out history: the bull path whose last state is most ordinary.
    calm = np.flatnonzero((test.labels == 0).all(axis=1))
    pick = int(calm[0]) if calm.size else 0
    history = model.encode(test.surfaces[pick, : config.steps // 2])
    plot = plot_counterfactual(model, history, out / PLOT_FILE)
    cf = hallucinate(model, history)
    metrics["counterfactual"] = {
        "start_energy": cf.start_energy, "shock_energy": float(cf.energy[0]),
        "end_energy": float(cf.energy[-1]), "atm30_start": float(model.decode(history[-1])[ATM_ROW, 0]),
        "atm30_shock": float(cf.surfaces[0, ATM_ROW, 0]),
        "atm30_end": float(cf.surfaces[-1, ATM_ROW, 0]), "plot": str(plot)}
    fc = metrics["forecast"]
    status = {
        "world_model_beats_naive": fc["world_model"]["mse"] < fc["naive"]["mse"],
        "world_model_beats_naive_latent": fc["world_model"]["mse"] < fc["naive_latent"]["mse"],
        "counterfactual_plot": plot.is_file(),
    }
    metrics["targets_met"] = status
    metrics["total_seconds"] = time.perf_counter() - started
    model.metrics = metrics
    path = model.save(out / MODEL_FILE)
    report = {"metrics": metrics, "config": asdict(config), "info": model.info, "grid_hash": grid_hash(),
              "centroids": model.centroids, "history_tail": model.history[-5:],
              "data": {"train_filled_points": train.n_filled, "test_filled_points": test.n_filled,
                       "train_crash_share": float(np.mean(train.labels == 1)),
                       "test_crash_share": float(np.mean(test.labels == 1))}}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    info = model.info
    print(f"world model: latent {config.latent_dim}, VAE {info['n_weights_vae']} weights, GRU "
          f"{info['n_weights_dynamics']} weights; {info['n_train_surfaces']} train surfaces "
          f"({config.n_paths}×{config.steps}, dt {config.dt * 365:.0f} d), "
          f"{test.surfaces.shape[0]} test paths")
    print(f"time: data {info['data_seconds']:.0f} s, VAE {info['vae_seconds']:.0f} s, dynamics "
          f"{info['dynamics_seconds']:.0f} s, evaluation {metrics['evaluation_seconds']:.0f} s")
    print(format_table(metrics))
    c = metrics["counterfactual"]
    print(f"counterfactual: energy {c['start_energy']:.1f} -> {c['shock_energy']:.1f} (shock) -> "
          f"{c['end_energy']:.1f}; ATM 30d IV {c['atm30_start']:.3f} -> {c['atm30_shock']:.3f} -> "
          f"{c['atm30_end']:.3f}")
    for name, ok in status.items():
        print(f"  target {name}: {'met' if ok else 'NOT met'}")
    print(f"saved {path}, plot {plot}")
    return 0


__all__ = [
    "DEFAULT_MODEL_DIR", "MODEL_FILE", "Hallucination", "LatentDynamics", "SequenceSet", "SurfaceVAE",
    "WorldModel", "WorldModelConfig", "evaluate_world_model", "fill_invalid", "format_table", "hallucinate",
    "latent_energy", "plot_counterfactual", "ssim", "stationary_distribution", "surface_sequences",
    "train_world_model", "world_model_main",
]
