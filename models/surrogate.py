"""Neural surrogate of the Heston pricer: (kappa, theta, sigma, rho, v0) → IV surface on the project grid.

Why: ``models.heston.iv_surface`` prices a surface in a few hundred microseconds (batched) to a few
milliseconds (alone); a calibration loop, a scenario sweep or an RL environment calls it millions of
times. A network trained once on the engine's own output answers in about a microsecond per surface
and is differentiable, so calibration through it is a few milliseconds.

The maths, in the order the pipeline runs:

* **Domain.** ``ParameterDomain`` is a box in parameter space (crypto-sized: vols 10 %–100 %,
  vol-of-vol to 250 %, Feller violations included). Training, validation and test parameters are
  scrambled Sobol points of the box (``scipy.stats.qmc``), so the metrics are averages over the box
  under the uniform measure. Sets with different seeds are independent scramblings.
* **Truth.** Surfaces come from ``iv_surface`` in batches. A surface is rejected (and counted) when
  any point is NaN or below ``IV_FLOOR``: far out-of-the-money short calls can price below the
  quadrature's noise floor, the price is clipped to intrinsic and the inversion returns 0, which is
  no implied volatility at all. Rejected points are replaced by further Sobol points.
* **Output basis.** Each grid point is standardised (``z = (s − μ)/σ`` over the training set, with
  ``s`` the IV or its log, see ``SurrogateConfig.log_surface``), and PCA on ``z`` keeps the fewest
  components whose reconstruction RMSE, measured back in IV units, is at most
  ``pca_tolerance`` (1e-5). The network predicts those coefficients; the surface is
  ``μ + σ·(coeffs · components)``, a fixed linear layer, so losses are taken on the surface itself.
* **Network.** Inputs are the parameters mapped affinely from the box to [-1, 1]; a linear stem, a
  few pre-activation residual blocks ``h + W₂ φ(W₁ φ(h))`` (``h + W₁ φ(h)`` with ``block_layers = 1``;
  φ = SiLU, smooth so calibration gradients are smooth), and a linear head to the coefficients.
  With ``expected_vol_base`` each maturity's closed-form smile level (``expected_vol``: √ of the
  expected mean variance, the exact ATM vol without vol-of-vol) is both an input and the base the
  output adds to, so the network and the PCA model only the smile around it.
* **Loss.** Huber on the relative surface error in percent, ``e = 100·(ŝ − s)/s`` (the targets are
  relative errors; Huber keeps the few hard surfaces from dominating), with OTM puts (ln K/F < 0)
  weighted ``otm_put_weight`` (``error_units = "absolute"`` divides by one reference vol instead,
  which spends a small network on the large-IV errors that make up RMSE); plus
  ``λ·mean((Δ²_K e)² + (Δ²_T e)²)``, the second differences of the *error* along strike and
  maturity: a discrete Sobolev (H²) seminorm of the error. Penalising the curvature of the prediction
  itself would bias genuinely curved smiles toward flat ones; penalising the error's curvature only
  asks the surrogate to get the smile's shape, not just its level, right.
* **Calibration.** ``calibrate_with_surrogate`` writes the normalised parameters as ``tanh(z)`` (the
  box cannot be left), screens a fixed 512-point Sobol design in one batched forward pass, and
  polishes the best two starts together by Levenberg–Marquardt in float64, the Jacobian by central
  differences through one batched pass per iteration (L-BFGS is available as ``method="lbfgs"``).
  All of it runs in numpy on the folded network (``_FastForward``): on arrays this small a numpy
  call costs a third of a torch one, and a cold-start fit of the fast preset takes a median 2.5 ms
  (max under 10 ms over 50 surfaces) where torch took 7–10 ms (max 22–33 ms) on the same machine.
* **Size.** Accuracy is bought with width and depth, throughput with their absence. Held-out 16,384
  surfaces, one thread, engine and surrogate timed back to back (``time_against_engine``), on 2-core
  AVX-512 machines: the default (64 wide, 3 blocks) has RMSE 1.8e-4 at about 0.7 µs a surface batched
  (130–220× the engine batched). The ``surrogate-fast`` preset (16 wide, 1 block, expected-vol base,
  absolute errors, 524,288 surfaces) has RMSE 7.4–7.5e-4 and p99 relative 0.82–0.84 % at 120–135 ns
  (870–930×) in the row-major torch forward this module used before; from 2,048 rows ``predict`` now
  runs the feature-major ``_BatchForward``, 17–20 % less time a surface in the same process: 930–980×
  in ``time_against_engine`` (130–145 ns against 137–143 µs), 1000–1400× when each side runs warm
  back to back (the engine's own time swings between 112 and 200 µs a surface with the hour here).
  Other small networks on 524,288 surfaces (RMSE, p99, × engine): 16×1 1.3e-3, 1.5 % (1240–1400×);
  16×2 8.6e-4, 0.98 % (950–1050×; relative errors: 9.7e-4, 0.78 %, 900–970×); 16×1 with the base but
  no log inputs 8.3e-4, 0.98 % (950–1020×); and on 262,144: 24×1 8.4e-4, 0.68 % (760–880×), 24×1
  with one-layer blocks 1.3e-3 (≈1000×), hardswish instead of SiLU 1.1e-3. The batched forward runs
  its float32 products near the core's peak (torch.compile, max-autotune included, was no faster than
  the hand-laid ``_BatchForward``, at a 20–30 s compile): the output product alone is a third of the
  fast preset's time, so on these machines its accuracy and 1000× meet only within the timing noise.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from numpy.typing import ArrayLike
from scipy import special
from scipy.stats import qmc
from torch import nn
from tqdm.auto import tqdm

from models import grid
from models.heston import PARAM_NAMES, iv_surface

FORMAT_VERSION = 1
# A Heston implied volatility is strictly positive; anything below this is an inversion of a price the
# pricer could not resolve (clipped to intrinsic), not a volatility.
IV_FLOOR = 1e-4
# Bucket definition: |ln K/F| below this is at the money (falls back to the closest strike rows).
ATM_HALF_WIDTH = 0.05
# Targets from the issue, reported next to the metrics.
TARGETS = {"mean_rel_error": 0.002, "p99_rel_error": 0.01, "rmse": 0.001, "speedup_batched": 1000.0,
           "calibration_seconds": 0.020}
DEFAULT_MODEL_DIR = Path("var/models/surrogate")
#: Named training runs, as ``SurrogateConfig`` fields that differ from its defaults (``python main.py
#: --mode train --model NAME``). "surrogate" is the accurate model the bot's features use; "surrogate-fast"
#: the smallest network that still meets every accuracy target, for throughput (see "Size" above).
PRESETS: dict[str, dict[str, Any]] = {
    "surrogate": {},
    "surrogate-fast": {"n_train": 524288, "width": 16, "n_blocks": 1, "expected_vol_base": True,
                       "error_units": "absolute"},
}
MODEL_FILE = "surrogate.pt"


# --------------------------------------------------------------------------------------------------
# Domain and grid


@dataclass(frozen=True)
class ParameterDomain:
    """Box of Heston parameters the surrogate is trained on and trusted in, in ``PARAM_NAMES`` order.

    The default is sized for crypto: theta and v0 from 10 % to 100 % vol, vol-of-vol to 250 %, skew
    from strongly negative to mildly positive; it contains Feller violations (2κθ < σ²) on purpose.
    """

    lower: tuple[float, ...] = (0.2, 0.01, 0.1, -0.95, 0.01)
    upper: tuple[float, ...] = (8.0, 1.0, 2.5, 0.2, 1.0)
    names: tuple[str, ...] = PARAM_NAMES

    def __post_init__(self) -> None:
        if tuple(self.names) != PARAM_NAMES:
            raise ValueError(f"domain names must be {PARAM_NAMES}, got {self.names}")
        lo, hi = np.asarray(self.lower, dtype=float), np.asarray(self.upper, dtype=float)
        if lo.shape != (5,) or hi.shape != (5,):
            raise ValueError("lower and upper need one bound per parameter (5)")
        if not (np.isfinite(lo).all() and np.isfinite(hi).all() and (lo < hi).all()):
            raise ValueError(f"need finite lower < upper, got {self.lower} / {self.upper}")
        if (np.delete(lo, 3) <= 0.0).any() or lo[3] <= -1.0 or hi[3] >= 1.0:
            raise ValueError("kappa, theta, sigma, v0 must stay > 0 and rho inside (-1, 1)")

    @property
    def lo(self) -> np.ndarray:
        """Lower bounds as a vector."""
        return np.asarray(self.lower, dtype=np.float64)

    @property
    def hi(self) -> np.ndarray:
        """Upper bounds as a vector."""
        return np.asarray(self.upper, dtype=np.float64)

    @property
    def unit_scale(self) -> np.ndarray:
        """Slope of ``to_unit`` per parameter: 2 / (hi − lo)."""
        return 2.0 / (self.hi - self.lo)

    @property
    def unit_offset(self) -> np.ndarray:
        """Intercept of ``to_unit`` per parameter: the box's lower face maps to −1."""
        return -1.0 - self.lo * self.unit_scale

    def to_unit(self, params: ArrayLike) -> np.ndarray:
        """Affine map of the box onto [-1, 1]^5: the network's input scale."""
        return np.asarray(params, dtype=np.float64) * self.unit_scale + self.unit_offset

    def from_unit(self, unit: ArrayLike) -> np.ndarray:
        """Inverse of ``to_unit``."""
        return self.lo + 0.5 * (np.asarray(unit, dtype=np.float64) + 1.0) * (self.hi - self.lo)

    def contains(self, params: ArrayLike, slack: float = 1e-9) -> np.ndarray:
        """Row-wise: is each parameter vector inside the box (up to a relative ``slack``)?"""
        p = np.atleast_2d(np.asarray(params, dtype=np.float64))
        pad = slack * (self.hi - self.lo)
        return ((p >= self.lo - pad) & (p <= self.hi + pad)).all(axis=1)

    def sample(self, n: int, seed: int, method: str = "sobol") -> np.ndarray:
        """``n`` seeded points of the box: scrambled Sobol (first ``n`` of a 2^m block) or uniform."""
        return self.from_unit(2.0 * _unit_cube(n, seed, method) - 1.0)

    def feller_fraction(self, params: ArrayLike) -> float:
        """Share of rows violating Feller (2κθ ≤ σ²): the domain deliberately contains them."""
        p = np.atleast_2d(np.asarray(params, dtype=np.float64))
        return float(np.mean(2.0 * p[:, 0] * p[:, 1] <= p[:, 2] ** 2))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form for model metadata."""
        return {"lower": list(self.lower), "upper": list(self.upper), "names": list(self.names)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParameterDomain:
        """Inverse of ``to_dict``."""
        return cls(tuple(data["lower"]), tuple(data["upper"]), tuple(data["names"]))


def _unit_cube(n: int, seed: int, method: str) -> np.ndarray:
    """The first ``n`` points of a seeded sequence in [0, 1)^5 (a longer ``n`` extends a shorter one)."""
    if n < 0:
        raise ValueError("n must be non-negative")
    if method == "uniform":
        return np.random.default_rng(seed).random((n, 5))
    if method != "sobol":
        raise ValueError(f"unknown sampling method {method!r} (use 'sobol' or 'uniform')")
    m = max(0, math.ceil(math.log2(max(n, 1))))
    return qmc.Sobol(d=5, scramble=True, seed=seed).random_base2(m)[:n]


def grid_hash(log_moneyness: ArrayLike = grid.LOG_MONEYNESS, maturities: ArrayLike = grid.MATURITIES) -> str:
    """SHA-256 of the grid (rounded to 12 digits): a saved model is only valid on the grid it learnt."""
    k = np.round(np.asarray(log_moneyness, dtype=np.float64), 12)
    t = np.round(np.asarray(maturities, dtype=np.float64), 12)
    digest = hashlib.sha256()
    for array in (k, t):
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def grid_meta() -> dict[str, Any]:
    """The project grid and its hash, as every saved model records them for :func:`load_checked`."""
    layout = {"log_moneyness": grid.LOG_MONEYNESS.tolist(), "maturities": grid.MATURITIES.tolist()}
    return {"grid": layout, "grid_hash": grid_hash()}


def load_checked(path: Path | str, kind: str, format_version: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A saved model's torch payload and metadata, refused unless its format and grid are this project's.

    Shared by every learned model of the Heston lab: the grid hash must match the grid stored beside it
    (else the file was edited) and the project's grid (else the model learnt another surface layout).
    """
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    meta = json.loads(payload["meta"])
    if meta.get("format_version") != format_version:
        raise ValueError(f"{kind} file format {meta.get('format_version')} != {format_version}")
    stored = grid_hash(meta["grid"]["log_moneyness"], meta["grid"]["maturities"])
    if meta["grid_hash"] != stored:
        raise ValueError(
            f"{kind} at {path}: its grid hash {meta['grid_hash'][:12]}… does not match its own stored "
            f"grid ({stored[:12]}…); the file is corrupt or was edited"
        )
    if meta["grid_hash"] != grid_hash():
        raise ValueError(
            f"{kind} at {path} was trained on another grid (hash {meta['grid_hash'][:12]}…, project "
            f"grid {grid_hash()[:12]}…); retrain it for models.grid"
        )
    return payload, meta


# --------------------------------------------------------------------------------------------------
# Training data


@dataclass
class SurfaceSet:
    """Parameters (n, 5) and engine surfaces (n, 10, 6), with what it cost to make them."""

    params: np.ndarray
    surfaces: np.ndarray
    n_rejected: int
    seconds: float
    from_cache: bool = False


def valid_surfaces(surfaces: np.ndarray, floor: float = IV_FLOOR) -> np.ndarray:
    """Row mask of surfaces that are finite and above ``floor`` everywhere."""
    flat = surfaces.reshape(surfaces.shape[0], -1)
    return np.isfinite(flat).all(axis=1) & (np.nan_to_num(flat, nan=0.0) > floor).all(axis=1)


def generate_surfaces(
    domain: ParameterDomain,
    n: int,
    seed: int,
    method: str = "sobol",
    batch_size: int = 4096,
    cache_dir: Path | str | None = None,
    progress: bool = True,
    pricer: Callable[[np.ndarray], np.ndarray] = iv_surface,
) -> SurfaceSet:
    """``n`` valid engine surfaces at seeded domain points, rejected points replaced by later ones.

    With ``cache_dir`` the set is stored as an .npz named by a hash of everything that defines it
    (domain, grid, n, seed, method, floor), so a re-run loads instead of pricing again.
    """
    if n <= 0:
        raise ValueError("n must be positive")
    cache_file = None
    if cache_dir is not None:
        key = json.dumps([domain.to_dict(), grid_hash(), n, seed, method, IV_FLOOR, FORMAT_VERSION])
        name = f"surfaces_n{n}_s{seed}_{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
        cache_file = Path(cache_dir) / name
        if cache_file.is_file():
            with np.load(cache_file) as data:
                return SurfaceSet(data["params"], data["surfaces"], int(data["n_rejected"]),
                                  float(data["seconds"]), from_cache=True)
    started = time.perf_counter()
    kept_p: list[np.ndarray] = []
    kept_s: list[np.ndarray] = []
    n_kept, n_rejected, drawn = 0, 0, 0
    # Draw a little more than n up front; top up from the same sequence if rejections eat the margin.
    pool = domain.from_unit(2.0 * _unit_cube(n + n // 50 + 16, seed, method) - 1.0)
    with tqdm(total=n, desc="pricing surfaces", disable=not progress, leave=False) as bar:
        while n_kept < n:
            if drawn >= pool.shape[0]:
                grown = drawn + max(1024, 2 * (n - n_kept))
                pool = domain.from_unit(2.0 * _unit_cube(grown, seed, method) - 1.0)
            batch = pool[drawn : drawn + min(batch_size, n - n_kept + 32)]
            drawn += batch.shape[0]
            surfaces = np.asarray(pricer(batch), dtype=np.float64)
            ok = valid_surfaces(surfaces)
            take = min(int(ok.sum()), n - n_kept)
            # Count rejections among the points actually used: up to the last one kept when this batch
            # completes the set (points priced beyond it were only slack).
            used = int(np.flatnonzero(ok)[take - 1]) + 1 if take and n_kept + take == n else ok.size
            n_rejected += int((~ok[:used]).sum())
            kept_p.append(batch[ok][:take])
            kept_s.append(surfaces[ok][:take])
            n_kept += take
            bar.update(take)
    result = SurfaceSet(np.concatenate(kept_p), np.concatenate(kept_s), n_rejected,
                        time.perf_counter() - started)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, params=result.params, surfaces=result.surfaces,
                            n_rejected=result.n_rejected, seconds=result.seconds)
        tmp.replace(cache_file)
    return result


# --------------------------------------------------------------------------------------------------
# PCA of the standardised surface


@dataclass
class SurfacePCA:
    """Per-point standardisation and principal components of training surfaces.

    ``mean``/``scale`` standardise each of the 60 points (of the IV, or of log IV when ``log``);
    ``components`` (k, 60) are the leading right singular vectors of the standardised data;
    ``singular_values`` and ``recon_rmse`` (IV RMSE when keeping 1..60 components) document the choice.
    """

    mean: np.ndarray
    scale: np.ndarray
    components: np.ndarray
    singular_values: np.ndarray
    recon_rmse: np.ndarray
    log: bool

    @property
    def n_components(self) -> int:
        """How many components are kept."""
        return int(self.components.shape[0])

    @classmethod
    def fit(cls, surfaces: np.ndarray, tolerance: float = 1e-5, log: bool = False,
            max_components: int | None = None) -> SurfacePCA:
        """Fit on (n, 10, 6) surfaces; keep the fewest components with IV reconstruction RMSE ≤ tolerance.

        The IV error of keeping k components is measured exactly on the training surfaces (decode and
        compare), so the log option is judged in the same units as the plain one.
        """
        flat = surfaces.reshape(surfaces.shape[0], -1).astype(np.float64)
        values = np.log(flat) if log else flat
        mean = values.mean(axis=0)
        scale = values.std(axis=0)
        scale = np.where(scale > 1e-12, scale, 1.0)
        z = (values - mean) / scale
        _, singular, vt = np.linalg.svd(z, full_matrices=False)
        coeffs = z @ vt.T
        recon_rmse = np.empty(vt.shape[0])
        for k in range(1, vt.shape[0] + 1):
            recon = mean + scale * (coeffs[:, :k] @ vt[:k])
            recon = np.exp(recon) if log else recon
            recon_rmse[k - 1] = math.sqrt(float(np.mean((recon - flat) ** 2)))
        below = np.flatnonzero(recon_rmse <= tolerance)
        k = int(below[0]) + 1 if below.size else vt.shape[0]
        if max_components is not None:
            k = min(k, max_components)
        return cls(mean, scale, vt[:k].copy(), singular, recon_rmse, log)

    def encode(self, surfaces: np.ndarray) -> np.ndarray:
        """Coefficients (n, k) of surfaces (n, 10, 6)."""
        flat = surfaces.reshape(surfaces.shape[0], -1)
        values = np.log(flat) if self.log else flat
        return ((values - self.mean) / self.scale) @ self.components.T

    def decode(self, coeffs: np.ndarray) -> np.ndarray:
        """Surfaces (n, 10, 6) from coefficients (n, k)."""
        values = self.mean + self.scale * (np.asarray(coeffs) @ self.components)
        values = np.exp(values) if self.log else values
        return values.reshape(-1, *grid.SHAPE)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays for the saved model."""
        return {"mean": self.mean, "scale": self.scale, "components": self.components,
                "singular_values": self.singular_values, "recon_rmse": self.recon_rmse}


# --------------------------------------------------------------------------------------------------
# Network


_ACTIVATIONS: dict[str, type[nn.Module]] = {"silu": nn.SiLU, "gelu": nn.GELU, "tanh": nn.Tanh}
# Columns of kappa, theta, sigma, v0: the parameters that span decades and get a log-scale input too.
_POSITIVE = [0, 1, 2, 4]
# How the training loss measures a surface error (see ``SurfaceLoss``).
_ERROR_UNITS = ("relative", "absolute")
# Columns of kappa, theta and v0: what ``expected_vol`` reads.
_EXPECTED_VOL_COLUMNS = tuple(PARAM_NAMES.index(name) for name in ("kappa", "theta", "v0"))


def expected_vol(params: torch.Tensor, maturities: torch.Tensor) -> torch.Tensor:
    """√(expected mean variance to each maturity): (n, 5) raw parameters → (n, len(maturities)).

    E[(1/T)∫₀ᵀ v dt] = θ + (v0 − θ)(1 − e^{−κT})/(κT) is the Heston ATM implied variance in the zero
    vol-of-vol limit: the level of each maturity's smile, in closed form. Given it as an input and as
    the base of the output, a small network only learns the smile around it (σ, ρ, the wings).
    """
    # Computed maturity-major, (nT, n), and returned as its transpose: every step then runs along rows
    # of n contiguous values, where (n, 1) × (nT,) broadcasts step six values at a time (half as fast).
    kappa, theta, v0 = (params[:, column].contiguous() for column in _EXPECTED_VOL_COLUMNS)
    decay = torch.outer(-maturities, kappa)
    return torch.addcmul(theta, v0 - theta, torch.expm1(decay) / decay).sqrt().T


def _expected_vol_numpy(kappa: np.ndarray, theta: np.ndarray, v0: np.ndarray, neg_maturities: np.ndarray,
                        out: np.ndarray | None = None) -> np.ndarray:
    """``expected_vol`` in numpy for the fast paths: κ, θ, v0 broadcast against −T, so the caller's
    shapes choose the layout (rows × maturities, or maturities × rows into ``out``)."""
    decay = np.multiply(neg_maturities, kappa)
    ratio = np.expm1(decay)
    ratio /= decay
    vol = np.multiply(v0 - theta, ratio, out=out)
    vol += theta
    return np.sqrt(vol, out=vol)


class _ResidualBlock(nn.Module):
    """Pre-activation residual block ``h + W₂ φ(W₁ φ(h))``, or ``h + W₁ φ(h)`` with one layer.

    The skip keeps deep stacks trainable; the one-layer block is a quarter cheaper per block for the
    smallest, fastest networks (one product and one activation instead of two).
    """

    def __init__(self, width: int, activation: str, layers: int = 2) -> None:
        super().__init__()
        if layers not in (1, 2):
            raise ValueError(f"a residual block has 1 or 2 layers, got {layers}")
        self.act = _ACTIVATIONS[activation]()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width) if layers == 2 else None
        # Start each block near the identity so depth does not blow up the initial output.
        last = self.fc2 if self.fc2 is not None else self.fc1
        with torch.no_grad():
            last.weight.mul_(0.1)
            last.bias.zero_()

    @property
    def layers(self) -> list[nn.Linear]:
        """The block's linear layers, in order."""
        return [self.fc1] if self.fc2 is None else [self.fc1, self.fc2]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Residual update."""
        x = h
        for layer in self.layers:
            x = layer(self.act(x))
        return h + x


class SurrogateNet(nn.Module):
    """Normalised parameters in [-1, 1]^5 → IV surface (n, 10, 6), through PCA coefficients.

    The PCA decode (mean, scale, components) and the domain bounds are buffers, so the whole map from
    raw parameters to IV is one differentiable module and is saved with the weights.
    """

    def __init__(self, width: int, n_blocks: int, activation: str, pca: SurfacePCA,
                 domain: ParameterDomain, log_inputs: bool = True, block_layers: int = 2,
                 expected_vol_base: bool = False) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        if expected_vol_base and pca.log:
            raise ValueError("expected_vol_base needs a PCA of the surface itself, not of its log")
        self.log_surface = pca.log
        self.log_inputs = log_inputs
        self.expected_vol_base = expected_vol_base
        self.activation = activation
        n_inputs = (len(PARAM_NAMES) + (len(_POSITIVE) if log_inputs else 0)
                    + (grid.N_MATURITIES if expected_vol_base else 0))
        self.stem = nn.Linear(n_inputs, width)
        self.blocks = nn.ModuleList(_ResidualBlock(width, activation, block_layers) for _ in range(n_blocks))
        self.act = _ACTIVATIONS[activation]()
        self.head = nn.Linear(width, pca.n_components)
        self.register_buffer("pca_mean", torch.tensor(pca.mean, dtype=torch.float32))
        self.register_buffer("pca_scale", torch.tensor(pca.scale, dtype=torch.float32))
        self.register_buffer("pca_components", torch.tensor(pca.components, dtype=torch.float32))
        self.register_buffer("domain_lo", torch.tensor(domain.lo, dtype=torch.float32))
        self.register_buffer("domain_hi", torch.tensor(domain.hi, dtype=torch.float32))
        # Not saved: the grid is the project's (its hash is checked on load), and models saved before
        # this buffer existed still load.
        maturities = torch.tensor(grid.MATURITIES, dtype=torch.float32)
        self.register_buffer("maturities", maturities, persistent=False)
        # The expected vol is √ of a mix of theta and v0, so it spans √ of their joint bounds.
        theta_v0 = list(_EXPECTED_VOL_COLUMNS[1:])
        self.vol_lo = math.sqrt(float(min(domain.lo[theta_v0])))
        self.vol_hi = math.sqrt(float(max(domain.hi[theta_v0])))

    def raw_params(self, unit: torch.Tensor) -> torch.Tensor:
        """[-1, 1] → raw parameters (the inverse of ``to_unit``)."""
        return self.domain_lo + 0.5 * (unit + 1.0) * (self.domain_hi - self.domain_lo)

    def features(self, unit: torch.Tensor, vol: torch.Tensor | None = None) -> torch.Tensor:
        """Network inputs: the unit coordinates, plus the positive parameters on a log scale to [-1, 1],
        plus the expected vol per maturity mapped to [-1, 1] (``vol``, with ``expected_vol_base``).

        Why logs: IV moves like √v0 and √theta, so the low-vol corner (0.01–0.05) is a sliver of the
        linear axis but a fifth of the log axis; both views of the same point cost four extra inputs.
        """
        inputs = [unit]
        if self.log_inputs:
            lo, hi = self.domain_lo[_POSITIVE], self.domain_hi[_POSITIVE]
            raw = self.raw_params(unit)[:, _POSITIVE]
            inputs.append(2.0 * torch.log(raw / lo) / torch.log(hi / lo) - 1.0)
        if vol is not None:
            inputs.append(2.0 * (vol - self.vol_lo) / (self.vol_hi - self.vol_lo) - 1.0)
        return torch.cat(inputs, dim=1) if len(inputs) > 1 else unit

    def coefficients(self, unit: torch.Tensor, vol: torch.Tensor | None = None) -> torch.Tensor:
        """PCA coefficients (n, k) of the standardised surface (of its residual to ``vol``)."""
        h = self.stem(self.features(unit, vol))
        for block in self.blocks:
            h = block(h)
        return self.head(self.act(h))

    def decode(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Surface (n, 10, 6) = μ + σ·(coeffs · components), exponentiated in log mode."""
        values = self.pca_mean + self.pca_scale * (coeffs @ self.pca_components)
        if self.log_surface:
            values = torch.exp(values)
        return values.reshape(-1, *grid.SHAPE)

    def forward(self, unit: torch.Tensor) -> torch.Tensor:
        """Surface from normalised parameters (the expected vol plus the decoded residual, when used)."""
        if not self.expected_vol_base:
            return self.decode(self.coefficients(unit))
        vol = expected_vol(self.raw_params(unit), self.maturities)
        return self.decode(self.coefficients(unit, vol)) + vol.unsqueeze(1)

    def to_unit(self, params: torch.Tensor) -> torch.Tensor:
        """Raw parameters → [-1, 1] (the same affine map as ``ParameterDomain.to_unit``)."""
        return 2.0 * (params - self.domain_lo) / (self.domain_hi - self.domain_lo) - 1.0


def _silu(x: np.ndarray) -> np.ndarray:
    # exp(−x) overflows to inf only where x < −88 (float32), and x / inf is SiLU's limit there, −0.
    with np.errstate(over="ignore"):
        return x / (1.0 + np.exp(-x))


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + special.erf(x / math.sqrt(2.0)))


_NUMPY_ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "silu": _silu, "gelu": _gelu, "tanh": np.tanh}


class _FastForward:
    """Plain numpy copy of a ``SurrogateNet`` for a few rows: flat surfaces (n, 60) from unit inputs.

    Why: at the few rows of a calibration step or a small prediction, per-call overhead is the cost,
    and a numpy call costs a third of a torch one (a Levenberg–Marquardt iteration, forward included,
    runs ~3× faster). Every layer is one matrix product; the log-input affine map is folded into the
    stem, and the head, the PCA decode and the de-standardisation into one (width → 60) layer:
    μ + σ ⊙ ((W h + b) C) = (σ ⊙ Wᵀ C)ᵀ h + (μ + σ ⊙ b C). Folded in float64, stored in ``dtype``.
    """

    def __init__(self, net: SurrogateNet, dtype: type[np.floating] = np.float64) -> None:
        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(torch.float64).clone().contiguous()

        def store(t: torch.Tensor | np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(t.numpy() if isinstance(t, torch.Tensor) else t, dtype=dtype)

        with torch.no_grad():
            self.activation = net.activation
            self.act = _NUMPY_ACTIVATIONS[net.activation]
            self.log_surface = net.log_surface
            weight, bias = cast(net.stem.weight), cast(net.stem.bias)
            n_par = len(PARAM_NAMES)
            domain_lo, domain_hi = cast(net.domain_lo), cast(net.domain_hi)
            # Raw parameters → unit coordinates, unit = scale·raw + offset (ParameterDomain.to_unit).
            unit_scale = 2.0 / (domain_hi - domain_lo)
            self.unit_map = (store(unit_scale), store(-1.0 - domain_lo * unit_scale))
            self.w_unit = store(weight[:, :n_par].T)
            self.w_log: np.ndarray | None = None
            self.w_vol: np.ndarray | None = None
            self.neg_maturities: np.ndarray | None = None
            self.positive: tuple[np.ndarray, np.ndarray] | None = None
            lo, hi = domain_lo[_POSITIVE], domain_hi[_POSITIVE]
            if net.log_inputs or net.expected_vol_base:
                # The raw positive parameters c0 + c1·u over all five columns: rho's column gets
                # 1 + 0·u, so its log is 0 and meets a zero weight row (cheaper than a gather).
                c0, c1 = torch.ones(n_par, dtype=torch.float64), torch.zeros(n_par, dtype=torch.float64)
                c0[_POSITIVE], c1[_POSITIVE] = 0.5 * (lo + hi), 0.5 * (hi - lo)
                self.positive = (store(c0), store(c1))
            column = n_par
            if net.log_inputs:
                # feature = s·log(raw) + t, with s and t folded into the stem.
                s = 2.0 / torch.log(hi / lo)
                t = -1.0 - s * torch.log(lo)
                w_log = weight[:, column : column + len(_POSITIVE)]
                w_log_rows = torch.zeros(n_par, weight.shape[0], dtype=torch.float64)
                w_log_rows[_POSITIVE] = (w_log * s).T
                self.w_log = store(w_log_rows)
                bias = bias + w_log @ t
                column += len(_POSITIVE)
            self.spread: np.ndarray | None = None
            if net.expected_vol_base:
                # feature = s·vol + t, folded into the stem the same way.
                self.neg_maturities = store(-cast(net.maturities))
                s = 2.0 / (net.vol_hi - net.vol_lo)
                w_vol = weight[:, column:]
                self.w_vol = store((w_vol * s).T)
                bias = bias + w_vol.sum(dim=1) * (-1.0 - s * net.vol_lo)
                # The base as a (maturities → flat grid) 0/1 matrix: one small product adds each
                # maturity's vol to its strikes, where a broadcast add over (n, 10, 6) costs 5× more.
                self.spread = store(np.tile(np.eye(grid.N_MATURITIES), grid.N_STRIKES))
            self.bias = store(bias)
            self.blocks = [[(store(cast(fc.weight).T), store(cast(fc.bias))) for fc in b.layers]
                           for b in net.blocks]
            components, scale = cast(net.pca_components), cast(net.pca_scale)
            self.w_out = store((cast(net.head.weight).T @ components) * scale)
            self.b_out = store(cast(net.pca_mean) + scale * (cast(net.head.bias) @ components))

    def __call__(self, unit: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Flat surfaces (n, 60) for unit parameters (n, 5), written into ``out`` when given."""
        h = unit @ self.w_unit + self.bias
        raw = self.positive[0] + self.positive[1] * unit if self.positive is not None else unit
        if self.w_log is not None:
            h += np.log(raw) @ self.w_log
        vol = None
        if self.w_vol is not None:
            kappa, theta, v0 = (raw[:, column : column + 1] for column in _EXPECTED_VOL_COLUMNS)
            vol = _expected_vol_numpy(kappa, theta, v0, self.neg_maturities)
            h += vol @ self.w_vol
        for layers in self.blocks:
            x = h
            for weight, bias in layers:
                x = self.act(x) @ weight + bias
            h = h + x
        surfaces = np.matmul(self.act(h), self.w_out, out=out)
        surfaces += self.b_out
        if vol is not None:
            surfaces += vol @ self.spread
        return np.exp(surfaces, out=surfaces) if self.log_surface else surfaces


# Out-variant of each activation: the batched forward writes activations straight into its buffers.
_ACTIVATION_OUT: dict[str, Callable[..., torch.Tensor]] = {
    "silu": torch.ops.aten.silu.out, "gelu": torch.ops.aten.gelu.out, "tanh": torch.ops.aten.tanh.out}
# Output rows are padded to a whole number of 16-float (AVX-512) vectors: the product is ~15 % faster.
_PADDED_POINTS = 64
# From this many rows ``predict`` runs ``_BatchForward`` (less work per row); below it the numpy
# ``_FastForward`` (less per call: ~50 µs against ~120 µs for one surface; even at 1,000–2,000 rows).
_BATCH_LAYOUT_ROWS = 2048
# |unit coordinate| above 1 + this is outside the domain (float64, as ``ParameterDomain.to_unit`` maps).
_UNIT_SLACK = 2e-9


class _BatchForward:
    """Throughput layout of a ``_FastForward`` (float32) for ``SurrogateModel.predict`` on many rows.

    Why a second layout of the same folded weights: at thousands of rows only per-row work counts, and
    three changes cut it by 12–17 % (timed interleaved with ``_FastForward``). Activations are kept
    feature-major, each feature a contiguous row of the chunk, where torch's vector kernels run
    (writing an activation into a row-major buffer with a bias column falls to a scalar loop, 6×
    slower). Every bias rides as a constant-one input row of its product, so no pass copies a bias
    into the output first. Output rows are padded to 64 floats, and the caller gets a view of the
    first 60. It reads raw parameters: the unit map is folded into the stem, and the log inputs and
    the expected vol are computed from the raw values directly.
    """

    def __init__(self, fast: _FastForward) -> None:
        """Re-lay the folded weights of ``fast`` (float64, so the folds are exact before rounding)."""
        def tensor(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.asarray(array, dtype=np.float64))

        n_par = len(PARAM_NAMES)
        unit_scale, unit_offset = (tensor(part) for part in fast.unit_map)
        w_unit = tensor(fast.w_unit)
        rows = [unit_scale[:, None] * w_unit]
        self.n_log = len(_POSITIVE) if fast.w_log is not None else 0
        if fast.w_log is not None:
            rows.append(tensor(fast.w_log)[_POSITIVE])
        self.n_vol = grid.N_MATURITIES if fast.w_vol is not None else 0
        self.neg_maturities: np.ndarray | None = None
        if fast.w_vol is not None and fast.neg_maturities is not None:
            rows.append(tensor(fast.w_vol))
            self.neg_maturities = np.asarray(fast.neg_maturities, dtype=np.float32)[:, None]
        rows.append((tensor(fast.bias) + unit_offset @ w_unit)[None])
        self.n_inputs = n_par + self.n_log + self.n_vol
        self.w_stem = torch.cat(rows).T.float().contiguous()
        self.width = self.w_stem.shape[0]
        self.blocks = [[torch.cat([tensor(weight), tensor(bias)[None]]).T.float().contiguous()
                        for weight, bias in layers] for layers in fast.blocks]
        out_rows = [tensor(fast.w_out)]
        if fast.spread is not None:
            out_rows.append(tensor(fast.spread))
        w_out = torch.cat([*out_rows, tensor(fast.b_out)[None]]).float()
        self.w_out = torch.zeros(w_out.shape[0], _PADDED_POINTS)
        self.w_out[:, : w_out.shape[1]] = w_out
        self.act_out = _ACTIVATION_OUT[fast.activation]
        self.unit_scale, self.unit_offset = unit_scale.numpy(), unit_offset.numpy()
        # How far a float32-rounded parameter can move its unit coordinate: twice float32's half-ulp
        # (2⁻²⁴, relative) of the largest face value, times the scale. Well inside this of a face the
        # float32 reading decides; nearer, ``predict`` decides in float64.
        faces = np.abs(np.stack([(-1.0 - self.unit_offset), (1.0 - self.unit_offset)]) / self.unit_scale)
        self.unit_error = 2.0 ** -23 * faces.max(axis=0) * self.unit_scale
        self.log_surface = fast.log_surface
        # The positive columns as runs of adjacent rows (source start, stop, destination), one log each.
        self.log_runs = _adjacent_runs(_POSITIVE, first_destination=n_par) if self.n_log else []

    def __call__(self, params: torch.Tensor, chunk: int) -> tuple[torch.Tensor, np.ndarray]:
        """Padded flat surfaces (n, 64), the grid in the first 60 columns, for raw parameters (n, 5),
        and each parameter's largest |unit coordinate| read from their float32 copies (NaN for a NaN
        input; within ``unit_error`` of the float64 value): the domain check rides on the chunk.
        """
        n_rows, n_par, width = params.shape[0], len(PARAM_NAMES), self.width
        chunk = max(1, min(chunk, n_rows))
        out = torch.empty(n_rows, _PADDED_POINTS)
        # Per chunk, each parameter's smallest and largest value (NaN if any is NaN): the affine unit
        # map is monotone, so they bound |unit| without mapping every row.
        extremes = np.empty((math.ceil(n_rows / chunk), 2, n_par), dtype=np.float32)
        # Feature-major buffers, each with its constant-one bias row last.
        inputs, act = torch.empty(self.n_inputs + 1, chunk), torch.empty(width + 1, chunk)
        head = torch.empty(width + self.n_vol + 1, chunk)
        for buffer in (inputs, act, head):
            buffer[-1] = 1.0
        hidden, step = torch.empty(width, chunk), torch.empty(width, chunk)
        # numpy views of the same memory: numpy's SIMD log, expm1 and sqrt are 2.5× faster than torch's.
        inputs_np, head_np = inputs.numpy(), head.numpy()
        for start in range(0, n_rows, chunk):
            m = min(chunk, n_rows - start)
            x_in, a, g, h, x = inputs[:, :m], act[:, :m], head[:, :m], hidden[:, :m], step[:, :m]
            x_in[:n_par].copy_(params[start : start + m].T)
            features = inputs_np[:, :m]
            np.min(features[:n_par], axis=1, out=extremes[start // chunk, 0])
            np.max(features[:n_par], axis=1, out=extremes[start // chunk, 1])
            for lo, hi, to in self.log_runs:
                np.log(features[lo:hi], out=features[to : to + hi - lo])
            if self.neg_maturities is not None:
                # The expected vol, written into the head's rows and copied to the stem's inputs.
                kappa, theta, v0 = (features[column] for column in _EXPECTED_VOL_COLUMNS)
                vol = _expected_vol_numpy(kappa, theta, v0, self.neg_maturities,
                                          out=head_np[width : width + self.n_vol, :m])
                features[n_par + self.n_log : self.n_inputs] = vol
            torch.mm(self.w_stem, x_in, out=h)
            for layers in self.blocks:
                source = h
                for weight in layers[:-1]:
                    self.act_out(source, out=a[:width])
                    torch.mm(weight, a, out=x)
                    source = x
                # The block's last product accumulates onto h in place: the residual add is free.
                self.act_out(source, out=a[:width])
                h.addmm_(layers[-1], a)
            self.act_out(h, out=g[:width])
            torch.mm(g.T, self.w_out, out=out[start : start + m])
        if self.log_surface:
            out.exp_()
        return out, np.abs(extremes * self.unit_scale + self.unit_offset).max(axis=(0, 1), initial=0.0)


def _adjacent_runs(columns: list[int], first_destination: int) -> list[tuple[int, int, int]]:
    """Sorted column indices as runs of adjacent ones: (start, stop, destination of start)."""
    runs: list[tuple[int, int, int]] = []
    destination = first_destination
    for column in columns:
        if runs and runs[-1][1] == column:
            runs[-1] = (runs[-1][0], column + 1, runs[-1][2])
        else:
            runs.append((column, column + 1, destination))
        destination += 1
    return runs


# --------------------------------------------------------------------------------------------------
# Configuration, loss, training


@dataclass(frozen=True)
class SurrogateConfig:
    """Everything that defines a trained surrogate; stored in its metadata.

    Defaults are the full run sized for ~15 minutes on one CPU thread (data generation included).
    """

    n_train: int = 131072
    n_val: int = 8192
    seed: int = 0
    sampler: str = "sobol"
    width: int = 64
    n_blocks: int = 3
    block_layers: int = 2
    activation: str = "silu"
    log_inputs: bool = True
    expected_vol_base: bool = False
    log_surface: bool = False
    pca_tolerance: float = 1e-5
    epochs: int = 300
    batch_size: int = 256
    lr: float = 6e-3
    lr_min: float = 1e-6
    warmup_epochs: int = 2
    weight_decay: float = 0.0
    huber_delta: float = 1.0
    smoothness_weight: float = 0.1
    otm_put_weight: float = 2.0
    error_units: str = "relative"
    generation_batch: int = 4096
    cache_dir: str | None = "var/models/surrogate/data"
    progress: bool = True
    num_threads: int | None = 1
    max_seconds: float | None = None

    def __post_init__(self) -> None:
        for name in ("n_train", "n_val", "width", "epochs", "batch_size", "generation_batch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.n_blocks < 0 or self.lr <= 0.0 or self.huber_delta <= 0.0:
            raise ValueError("n_blocks must be >= 0, lr and huber_delta > 0")
        if self.block_layers not in (1, 2):
            raise ValueError(f"block_layers must be 1 or 2, got {self.block_layers}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}")
        if self.error_units not in _ERROR_UNITS:
            raise ValueError(f"error_units must be one of {_ERROR_UNITS}, got {self.error_units!r}")
        if self.expected_vol_base and self.log_surface:
            raise ValueError("expected_vol_base and log_surface exclude each other")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SurrogateConfig:
        """Rebuild from metadata, ignoring keys this version does not know."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _second_difference(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x[i+1] − 2x[i] + x[i−1] along ``dim`` (grid-step units, so both directions weigh alike)."""
    n = x.shape[dim]
    return x.narrow(dim, 2, n - 2) - 2.0 * x.narrow(dim, 1, n - 2) + x.narrow(dim, 0, n - 2)


class SurfaceLoss(nn.Module):
    """Weighted Huber on the surface error (percent) + λ·(discrete H² seminorm of the error).

    The error is relative, ``100·(ŝ − s)/s``, or with ``error_units="absolute"`` taken against one
    reference volatility, ``100·(ŝ − s)/reference_iv``: the relative loss spends a small network's
    capacity on low-vol surfaces, the absolute one on the large-IV errors that dominate RMSE.
    """

    def __init__(self, huber_delta: float, smoothness_weight: float, otm_put_weight: float,
                 log_moneyness: np.ndarray = grid.LOG_MONEYNESS, error_units: str = "relative",
                 reference_iv: float = 1.0) -> None:
        super().__init__()
        if error_units not in _ERROR_UNITS:
            raise ValueError(f"error_units must be one of {_ERROR_UNITS}, got {error_units!r}")
        if not reference_iv > 0.0:
            raise ValueError(f"reference_iv must be positive, got {reference_iv}")
        self.relative = error_units == "relative"
        self.reference_iv = reference_iv
        weights = np.where(np.asarray(log_moneyness) < 0.0, otm_put_weight, 1.0)[:, None]
        weights = np.broadcast_to(weights, grid.SHAPE)
        self.register_buffer("weights", torch.tensor(weights / weights.mean(), dtype=torch.float32))
        self.huber = nn.HuberLoss(reduction="none", delta=huber_delta)
        self.smoothness_weight = smoothness_weight

    def forward(self, pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        """Scalar loss for (n, 10, 6) surfaces."""
        error = 100.0 * (pred - truth) / (truth if self.relative else self.reference_iv)
        fit = (self.weights * self.huber(error, torch.zeros_like(error))).mean()
        if self.smoothness_weight == 0.0:
            return fit
        rough = _second_difference(error, 1).pow(2).mean() + _second_difference(error, 2).pow(2).mean()
        return fit + self.smoothness_weight * rough


def _lr_factor(step: int, total: int, warmup: int, floor: float) -> float:
    """Linear warm-up then cosine decay to ``floor`` (a fraction of the peak rate)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class ThreadLimit:
    """Temporarily set torch's intra-op threads (restored on exit): reproducible timing and results."""

    def __init__(self, threads: int | None) -> None:
        self.threads, self.previous = threads, torch.get_num_threads()

    def __enter__(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.previous)


# --------------------------------------------------------------------------------------------------
# The model


class Predictor(Protocol):
    """Anything with a ``predict`` like ``SurrogateModel`` (evaluation only needs this)."""

    def predict(self, params: np.ndarray) -> np.ndarray: ...


@dataclass
class SurrogateModel:
    """A trained surrogate: network, domain, PCA, config, training history and metrics."""

    net: SurrogateNet
    domain: ParameterDomain
    pca: SurfacePCA
    config: SurrogateConfig
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    _fast: dict[str, _FastForward] = field(default_factory=dict, repr=False)
    _batch: _BatchForward | None = field(default=None, repr=False)
    _net64: SurrogateNet | None = field(default=None, repr=False)

    def fast_forward(self, dtype: type[np.floating] = np.float32) -> _FastForward:
        """Cached numpy copy (float32 for prediction and the calibration screen, float64 for LM)."""
        key = np.dtype(dtype).name
        if key not in self._fast:
            self._fast[key] = _FastForward(self.net, dtype)
        return self._fast[key]

    def float64_net(self) -> SurrogateNet:
        """Cached float64 copy of the module, without parameter gradients (L-BFGS differentiates
        through it with respect to its input only)."""
        if self._net64 is None:
            self._net64 = copy.deepcopy(self.net).double().requires_grad_(False)
        return self._net64

    def predict(self, params: ArrayLike, batch_size: int = 8192, check_domain: bool = True) -> np.ndarray:
        """IV surfaces (n, 10, 6) for parameters (n, 5); (10, 6) for one vector (5,); float32.

        float32 is the network's own precision (1e-7 against an error budget of 1e-3), and widening
        the output to float64 cost a fifth of a batched prediction. From ``_BATCH_LAYOUT_ROWS`` rows
        on, the result is a view whose rows are padded to 64 floats (see ``_BatchForward``);
        ``np.ascontiguousarray`` packs it where a caller needs that. Outside the training domain the
        network extrapolates without any guarantee, so that is refused unless ``check_domain=False``.
        """
        p = np.asarray(params, dtype=np.float64)
        single = p.ndim == 1
        p = np.atleast_2d(p)
        if p.ndim != 2 or p.shape[1] != len(PARAM_NAMES):
            raise ValueError(f"params must have shape (5,) or (n, 5) in order {PARAM_NAMES}, got {p.shape}")
        n_points = grid.N_STRIKES * grid.N_MATURITIES
        if p.shape[0] >= _BATCH_LAYOUT_ROWS:
            if self._batch is None:
                self._batch = _BatchForward(self.fast_forward(np.float64))
            # No grad mode needed: the forward's tensors are detached, so nothing records a graph.
            padded, peaks = self._batch(torch.from_numpy(np.ascontiguousarray(p)), chunk=batch_size)
            flat = padded.numpy()[:, :n_points]
            reach = float(peaks.max())
            if check_domain and not (peaks <= 1.0 - self._batch.unit_error).all():  # NaN fails too
                # Near a face (or past it): float32 rounding could decide either way; float64 decides.
                reach = float(np.abs(self.domain.to_unit(p)).max())
        else:
            unit = self.domain.to_unit(p)
            reach = float(np.abs(unit).max()) if p.shape[0] else 0.0
            predictor, x = self.fast_forward(np.float32), unit.astype(np.float32)
            flat = np.empty((p.shape[0], n_points), dtype=np.float32)
            # Chunks keep the hidden activations in cache; each chunk's output lands in place.
            for start in range(0, p.shape[0], batch_size):
                predictor(x[start : start + batch_size], out=flat[start : start + batch_size])
        if check_domain and not reach <= 1.0 + _UNIT_SLACK:  # NaN fails too
            bad = int((~self.domain.contains(p)).sum())
            raise ValueError(f"{bad} parameter row(s) outside the surrogate's domain {self.domain.to_dict()}")
        surfaces = flat.reshape(-1, *grid.SHAPE)
        return surfaces[0] if single else surfaces

    def save(self, path: Path | str) -> Path:
        """Write weights and metadata (domain, grid and its hash, PCA, config, metrics) to one file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format_version": FORMAT_VERSION,
            "domain": self.domain.to_dict(),
            **grid_meta(),
            "config": asdict(self.config),
            "pca": {"n_components": self.pca.n_components, "log": self.pca.log},
            "metrics": self.metrics,
            "history": self.history,
            "info": self.info,
        }
        payload = {
            "meta": json.dumps(meta),
            "state_dict": self.net.state_dict(),
            "pca": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.pca.to_arrays().items()},
        }
        torch.save(payload, path)
        return path

    @classmethod
    def load(cls, path: Path | str) -> SurrogateModel:
        """Read a saved model; refuses one whose grid differs from this project's grid (or was tampered)."""
        payload, meta = load_checked(path, "surrogate", FORMAT_VERSION)
        arrays = {k: v.numpy().astype(np.float64) for k, v in payload["pca"].items()}
        pca = SurfacePCA(arrays["mean"], arrays["scale"], arrays["components"], arrays["singular_values"],
                         arrays["recon_rmse"], bool(meta["pca"]["log"]))
        domain = ParameterDomain.from_dict(meta["domain"])
        config = SurrogateConfig.from_dict(meta["config"])
        net = SurrogateNet(config.width, config.n_blocks, config.activation, pca, domain, config.log_inputs,
                           config.block_layers, config.expected_vol_base)
        net.load_state_dict(payload["state_dict"])
        net.eval()
        return cls(net, domain, pca, config, meta.get("metrics", {}), meta.get("history", []),
                   meta.get("info", {}))


#: The public name of the trained surrogate (``Surrogate.load(path).predict(params)``), as used by callers.
Surrogate = SurrogateModel


def _surface_tensor(surfaces: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(surfaces, dtype=np.float32))


def _validation_stats(net: nn.Module, loss_fn: SurfaceLoss, unit: torch.Tensor,
                      truth: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        pred = torch.cat([net(unit[s : s + 8192]) for s in range(0, unit.shape[0], 8192)])
        loss = float(loss_fn(pred, truth))
        err = (pred - truth).double()
        rel = (err.abs() / truth.double())
        # torch.quantile refuses inputs above 2^24 elements; a validation set is far below that.
        p99 = float(torch.quantile(rel.flatten()[: 1 << 24], 0.99))
        return {"val_loss": loss, "val_rmse": float(err.pow(2).mean().sqrt()),
                "val_mean_rel": float(rel.mean()), "val_p99_rel": p99}


def train_surrogate(config: SurrogateConfig | None = None, domain: ParameterDomain | None = None,
                    train_set: SurfaceSet | None = None, val_set: SurfaceSet | None = None) -> SurrogateModel:
    """Generate (or load) data, fit PCA, train the network; deterministic for a given config.seed.

    The weights kept are those of the epoch with the lowest validation loss. ``train_set``/``val_set``
    may be passed to reuse surfaces already priced.
    """
    config = config or SurrogateConfig()
    domain = domain or ParameterDomain()
    started = time.perf_counter()
    with ThreadLimit(config.num_threads):
        if train_set is None:
            train_set = generate_surfaces(domain, config.n_train, config.seed, config.sampler,
                                          config.generation_batch, config.cache_dir, config.progress)
        if val_set is None:
            val_set = generate_surfaces(domain, config.n_val, config.seed + 1_000_003, config.sampler,
                                        config.generation_batch, config.cache_dir, config.progress)
        data_seconds = time.perf_counter() - started
        targets = train_set.surfaces
        if config.expected_vol_base:  # the network predicts the residual to the expected vol
            vol = expected_vol(torch.from_numpy(train_set.params), torch.tensor(grid.MATURITIES))
            targets = targets - vol.numpy()[:, None, :]
        pca = SurfacePCA.fit(targets, config.pca_tolerance, log=config.log_surface)

        torch.manual_seed(config.seed)
        net = SurrogateNet(config.width, config.n_blocks, config.activation, pca, domain, config.log_inputs,
                           config.block_layers, config.expected_vol_base)
        # The reference volatility of absolute errors: the training set's mean IV, so the Huber threshold
        # and λ keep the scale they have for relative errors.
        loss_fn = SurfaceLoss(config.huber_delta, config.smoothness_weight, config.otm_put_weight,
                              error_units=config.error_units, reference_iv=float(train_set.surfaces.mean()))
        x_train = torch.from_numpy(domain.to_unit(train_set.params).astype(np.float32))
        y_train = _surface_tensor(train_set.surfaces)
        x_val = torch.from_numpy(domain.to_unit(val_set.params).astype(np.float32))
        y_val = _surface_tensor(val_set.surfaces)

        optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        steps_per_epoch = math.ceil(x_train.shape[0] / config.batch_size)
        total_steps = steps_per_epoch * config.epochs
        warmup = steps_per_epoch * config.warmup_epochs
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: _lr_factor(step, total_steps, warmup, config.lr_min / config.lr))
        generator = torch.Generator().manual_seed(config.seed)
        baseline = _validation_stats(_MeanPredictor(y_train), loss_fn, x_val, y_val)
        best_state, best_loss, history = None, math.inf, []
        train_started = time.perf_counter()
        bar = tqdm(range(config.epochs), desc="training", disable=not config.progress, leave=False)
        for epoch in bar:
            net.train()
            order = torch.randperm(x_train.shape[0], generator=generator)
            running = 0.0
            for start in range(0, order.numel(), config.batch_size):
                index = order[start : start + config.batch_size]
                loss = loss_fn(net(x_train[index]), y_train[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                running += float(loss.detach()) * index.numel()
            net.eval()
            stats = _validation_stats(net, loss_fn, x_val, y_val)
            stats.update(epoch=epoch + 1, train_loss=running / order.numel(), lr=scheduler.get_last_lr()[0],
                         seconds=time.perf_counter() - train_started)
            history.append(stats)
            if stats["val_loss"] < best_loss:
                best_loss, best_state = stats["val_loss"], copy.deepcopy(net.state_dict())
            bar.set_postfix(val_rmse=f"{stats['val_rmse']:.2e}", val_rel=f"{stats['val_mean_rel']:.2e}")
            if config.max_seconds is not None and time.perf_counter() - started > config.max_seconds:
                break
        bar.close()
        if best_state is not None:
            net.load_state_dict(best_state)
        net.eval()
    info = {
        "n_train": int(train_set.params.shape[0]), "n_val": int(val_set.params.shape[0]),
        "n_rejected_train": train_set.n_rejected, "n_rejected_val": val_set.n_rejected,
        "feller_violations_train": domain.feller_fraction(train_set.params),
        "pca_components": pca.n_components, "pca_recon_rmse": float(pca.recon_rmse[pca.n_components - 1]),
        "data_seconds": data_seconds, "pricing_seconds": train_set.seconds + val_set.seconds,
        "data_from_cache": train_set.from_cache and val_set.from_cache,
        "train_seconds": time.perf_counter() - started - data_seconds,
        "total_seconds": time.perf_counter() - started, "epochs_run": len(history),
        "best_val_loss": best_loss, "baseline_val_loss": baseline["val_loss"],
        "baseline_val_rmse": baseline["val_rmse"],
        "n_weights": sum(p.numel() for p in net.parameters()),
    }
    return SurrogateModel(net, domain, pca, config, history=history, info=info)


class _MeanPredictor(nn.Module):
    """The training-mean surface for every input: the baseline a useful surrogate must beat."""

    def __init__(self, surfaces: torch.Tensor) -> None:
        super().__init__()
        self.mean = surfaces.mean(dim=0, keepdim=True)

    def forward(self, unit: torch.Tensor) -> torch.Tensor:
        """The mean surface, repeated."""
        return self.mean.expand(unit.shape[0], -1, -1)


# --------------------------------------------------------------------------------------------------
# Evaluation


def bucket_masks(log_moneyness: np.ndarray = grid.LOG_MONEYNESS,
                 maturities: np.ndarray = grid.MATURITIES) -> dict[str, np.ndarray]:
    """(nK, nT) masks of the report buckets: all, ATM, OTM put, OTM call, short tenor, long tenor.

    ATM is |ln K/F| < 0.05, or the strike row(s) closest to the money when none is that close; short
    tenor is the first two maturities, long the last two.
    """
    k = np.asarray(log_moneyness, dtype=np.float64)
    n_t = np.asarray(maturities).size
    atm_rows = np.abs(k) < ATM_HALF_WIDTH
    if not atm_rows.any():
        atm_rows = np.isclose(np.abs(k), np.abs(k).min())
    cols = np.arange(n_t)
    rows = np.ones((k.size, 1), dtype=bool)
    return {
        "overall": np.ones((k.size, n_t), dtype=bool),
        "atm": np.broadcast_to(atm_rows[:, None], (k.size, n_t)),
        "otm_put": np.broadcast_to((k < 0.0)[:, None], (k.size, n_t)),
        "otm_call": np.broadcast_to((k > 0.0)[:, None], (k.size, n_t)),
        "short_tenor": rows & (cols < 2)[None, :],
        "long_tenor": rows & (cols >= n_t - 2)[None, :],
    }


def surface_metrics(pred: np.ndarray, truth: np.ndarray, log_moneyness: np.ndarray = grid.LOG_MONEYNESS,
                    maturities: np.ndarray = grid.MATURITIES) -> dict[str, dict[str, float]]:
    """Error statistics of (n, nK, nT) predictions, overall and per bucket.

    R² is against the bucket's own mean; relative errors are |pred − truth| / truth.
    """
    pred = np.asarray(pred, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if pred.shape != truth.shape or pred.ndim != 3:
        raise ValueError(f"pred and truth must both be (n, nK, nT), got {pred.shape} and {truth.shape}")
    out: dict[str, dict[str, float]] = {}
    for name, mask in bucket_masks(log_moneyness, maturities).items():
        p, t = pred[:, mask], truth[:, mask]
        err = p - t
        abs_err = np.abs(err)
        rel = abs_err / np.abs(t)
        ss_tot = float(np.sum((t - t.mean()) ** 2))
        out[name] = {
            "n_points": int(t.size),
            "r2": 1.0 - float(np.sum(err**2)) / ss_tot if ss_tot > 0 else float("nan"),
            "rmse": float(np.sqrt(np.mean(err**2))),
            "mae": float(abs_err.mean()),
            "max_abs": float(abs_err.max()),
            "median_abs": float(np.median(abs_err)),
            "mean_rel": float(rel.mean()),
            "p99_rel": float(np.percentile(rel, 99)),
        }
    return out


def time_against_engine(model: SurrogateModel, params: np.ndarray, n_single: int = 20,
                        n_engine_batch: int = 512, n_surrogate_batch: int = 65536,
                        repeats: int = 15) -> dict[str, float]:
    """Seconds per surface, single call and batched, surrogate vs ``iv_surface``.

    Each repeat times the four cases back to back and each keeps its fastest repeat (timeit's rule:
    slower repeats measure other processes). Interleaving makes both sides see the same machine: on a
    shared 2-core VM the speed swings by a third from one minute to the next, and timing the engine
    first and the surrogate later measured ratios from 600× to 1300× for one model.
    """
    params = np.asarray(params, dtype=np.float64)
    rows = params[np.arange(max(n_surrogate_batch, n_engine_batch)) % params.shape[0]]
    singles = rows[:n_single]
    model.predict(rows[:256])  # warm-up (builds the fast forward)
    iv_surface(rows[:8])
    cases: dict[str, tuple[Callable[[], object], int]] = {
        "engine_single": (lambda: [iv_surface(p) for p in singles], n_single),
        "engine_batch": (lambda: iv_surface(rows[:n_engine_batch]), n_engine_batch),
        "surrogate_single": (lambda: [model.predict(p) for p in singles], n_single),
        "surrogate_batch": (lambda: model.predict(rows[:n_surrogate_batch]), n_surrogate_batch),
    }
    best = dict.fromkeys(cases, math.inf)
    for _ in range(repeats):
        for name, (run, n) in cases.items():
            started = time.perf_counter()
            run()
            best[name] = min(best[name], (time.perf_counter() - started) / n)
    engine_single, engine_batch = best["engine_single"], best["engine_batch"]
    surrogate_single, surrogate_batch = best["surrogate_single"], best["surrogate_batch"]
    return {
        "engine_single_s": engine_single, "engine_batched_s": engine_batch,
        "surrogate_single_s": surrogate_single, "surrogate_batched_s": surrogate_batch,
        "speedup_single": engine_single / surrogate_single,
        "speedup_batched": engine_batch / surrogate_batch,
        "speedup_batched_vs_engine_single": engine_single / surrogate_batch,
        "torch_threads": torch.get_num_threads(),
    }


def evaluate(model: Predictor, params: ArrayLike, truth: ArrayLike, timing: bool = True) -> dict[str, Any]:
    """Accuracy on held-out (params, engine surfaces), per bucket, plus speed against the engine."""
    params = np.asarray(params, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    pred = model.predict(params)
    result: dict[str, Any] = {"n_surfaces": int(params.shape[0]), "buckets": surface_metrics(pred, truth)}
    if timing and isinstance(model, SurrogateModel):
        result["speed"] = time_against_engine(model, params)
    return result


# --------------------------------------------------------------------------------------------------
# Calibration through the surrogate


_SCREEN_POINTS = 512
_POLISH_STARTS = 2
# tanh(±12) is 1 − 8e-11 from the face: far enough for any fit, finite for the Jacobian.
_Z_LIMIT = 12.0
_FD_STEP = 1e-5
_LM_FTOL = 1e-10
_LM_XTOL = 1e-9


def _screen_design(seed: int = 12345) -> np.ndarray:
    """A fixed Sobol design in (-1, 1)^5 for the cold-start screen (kept off the faces where tanh⁻¹ = ∞)."""
    return 0.98 * (2.0 * _unit_cube(_SCREEN_POINTS, seed, "sobol") - 1.0)


_SCREEN = _screen_design()
_SCREEN_FLOAT32 = _SCREEN.astype(np.float32)


def _residuals_and_jacobian(net: _FastForward, z: np.ndarray, target: np.ndarray,
                            sqrt_w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted residuals (S, 60) at ``z`` (S, 5) and their Jacobian (S, 60, 5) from one batched forward.

    Central differences in float64 with step 1e-5 in z: truncation ~1e-10 relative, far below what LM
    can notice, and the 11 rows per start go through the network as one batch.
    """
    n_starts, n_par = z.shape
    steps = _FD_STEP * np.eye(n_par)
    rows = np.concatenate([z[:, None, :], z[:, None, :] + steps, z[:, None, :] - steps], axis=1)
    out = net(np.tanh(rows.reshape(-1, n_par))).reshape(n_starts, 2 * n_par + 1, -1)
    residual = (out[:, 0] - target) * sqrt_w
    jacobian = ((out[:, 1 : n_par + 1] - out[:, n_par + 1 :]) / (2.0 * _FD_STEP) * sqrt_w).transpose(0, 2, 1)
    return residual, jacobian


def _levenberg_marquardt(net: _FastForward, z: np.ndarray, target: np.ndarray, sqrt_w: np.ndarray,
                         max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """Batched LM with Marquardt's diagonal scaling; every start keeps its own damping and stopping test.

    Each trial point is evaluated together with its finite-difference stencil (one network pass per
    iteration): an accepted step then already has its Jacobian. A start is done when the model predicts
    less than ``_LM_FTOL`` of relative cost reduction for its next step (MINPACK's ftol test), its step
    is below ``_LM_XTOL`` in z, or its RMSE is below 1e-10. In numpy: with 2 starts × 5 unknowns every
    array is tiny, and a numpy call costs a third of a torch one.
    """
    residual, jacobian = _residuals_and_jacobian(net, z, target, sqrt_w)
    cost = np.square(residual).sum(axis=1)
    damping = np.full_like(cost, 1e-3)
    done = cost <= 1e-20
    eye = np.eye(z.shape[1])
    for _ in range(max_iter):
        jt = jacobian.transpose(0, 2, 1)
        normal = jt @ jacobian
        gradient = (jt @ residual[:, :, None])[:, :, 0]
        diagonal = np.diagonal(normal, axis1=1, axis2=2)
        scaled = normal + damping[:, None, None] * (diagonal[:, :, None] * eye + 1e-12 * eye)
        step = -np.linalg.solve(scaled, gradient[:, :, None])[:, :, 0]
        predicted = cost - np.square(residual + (jacobian @ step[:, :, None])[:, :, 0]).sum(axis=1)
        small_step = np.abs(step).max(axis=1) <= _LM_XTOL * (1.0 + np.abs(z).max(axis=1))
        done = done | (predicted <= _LM_FTOL * cost) | small_step
        if done.all():
            break
        trial = np.clip(z + step, -_Z_LIMIT, _Z_LIMIT)
        trial_residual, trial_jacobian = _residuals_and_jacobian(net, trial, target, sqrt_w)
        trial_cost = np.square(trial_residual).sum(axis=1)
        better = (trial_cost < cost) & ~done
        gain = (cost - trial_cost) / np.maximum(predicted, 1e-300)
        # Nielsen's rule: shrink the damping by up to 3x on a good step, grow it on a rejected one
        # (a huge gain overflows the cube to -inf, which the floor of 1/3 absorbs).
        with np.errstate(over="ignore"):
            shrink = np.maximum(1.0 - (2.0 * gain - 1.0) ** 3, 1.0 / 3.0)
        damping = np.where(better, np.maximum(damping * shrink, 1e-12), damping * 4.0)
        z = np.where(better[:, None], trial, z)
        cost = np.where(better, trial_cost, cost)
        residual = np.where(better[:, None], trial_residual, residual)
        jacobian = np.where(better[:, None, None], trial_jacobian, jacobian)
        done = done | (cost <= 1e-20)
    return z, cost


def _lbfgs(net: SurrogateNet, z0: np.ndarray, target: np.ndarray, sqrt_w: np.ndarray,
           max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """L-BFGS on the stacked starts (their losses are independent, so the sum separates), through a
    float64 copy of the module, with autograd."""
    z = torch.from_numpy(z0).requires_grad_(True)
    target_t, sqrt_w_t = torch.from_numpy(target), torch.from_numpy(sqrt_w)
    optimizer = torch.optim.LBFGS([z], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-12,
                                  tolerance_change=1e-16, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        residual = (net(torch.tanh(z)).reshape(z.shape[0], -1) - target_t) * sqrt_w_t
        loss = 1e4 * residual.pow(2).sum()  # scaled so the tolerances bite at IV errors of ~1e-6
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        cost = ((net(torch.tanh(z)).reshape(z.shape[0], -1) - target_t) * sqrt_w_t).pow(2).sum(dim=1)
    return z.detach().numpy(), cost.numpy()


def calibrate_with_surrogate(
    iv_market: ArrayLike,
    model: SurrogateModel,
    x0: ArrayLike | None = None,
    weights: ArrayLike | None = None,
    max_iter: int = 50,
    method: str = "lm",
) -> tuple[np.ndarray, float, float]:
    """Fit (kappa, theta, sigma, rho, v0) to a (10, 6) market IV surface through the surrogate.

    Returns (params, weighted IV RMSE of the surrogate fit over the quoted points, seconds); NaN quotes
    are ignored. The normalised parameters are ``tanh(z)``, so every iterate is inside the domain.
    Without ``x0`` the best ``_POLISH_STARTS`` points of a 512-point Sobol screen (one batched forward
    pass) are polished together. ``method="lm"`` (default) is Levenberg–Marquardt with a
    central-difference Jacobian (one batched pass, see ``_residuals_and_jacobian``): 60 residuals in
    5 unknowns is the textbook Gauss–Newton case, and it converges in a handful of iterations where
    L-BFGS (``method="lbfgs"``) must first learn the curvature the Jacobian gives for free.
    """
    started = time.perf_counter()
    if method not in ("lm", "lbfgs"):
        raise ValueError(f"method must be 'lm' or 'lbfgs', got {method!r}")
    market = np.asarray(iv_market, dtype=np.float64)
    if market.shape != grid.SHAPE:
        raise ValueError(f"iv_market must have the grid's shape {grid.SHAPE}, got {market.shape}")
    w = np.ones(grid.SHAPE) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != grid.SHAPE or (w < 0).any():
        raise ValueError(f"weights must be non-negative with shape {grid.SHAPE}")
    mask = np.isfinite(market) & np.isfinite(w) & (w > 0)
    if not mask.any():
        raise ValueError("the surface has no finite, positively weighted quote")
    target = np.where(mask, market, 0.0).reshape(1, -1)
    w_used = np.where(mask, w, 0.0)
    sqrt_w = np.sqrt(w_used / w_used.sum()).reshape(1, -1)
    if x0 is None:
        # The screen only ranks points, so float32 (twice as fast on 512 rows) is plenty.
        screen = model.fast_forward(np.float32)(_SCREEN_FLOAT32)
        sse = np.square((screen - target) * sqrt_w).sum(axis=1)
        starts = _SCREEN[np.argsort(sse, kind="stable")[:_POLISH_STARTS]]
    else:
        unit0 = model.domain.to_unit(np.asarray(x0, dtype=np.float64).reshape(1, -1))
        starts = np.clip(unit0, -0.999, 0.999)
    z0 = np.arctanh(starts)
    if method == "lm":
        z, cost = _levenberg_marquardt(model.fast_forward(np.float64), z0, target, sqrt_w, max_iter)
    else:
        z, cost = _lbfgs(model.float64_net(), z0, target, sqrt_w, max_iter)
    best = int(np.argmin(cost))
    params = model.domain.from_unit(np.tanh(z[best]))
    return params, math.sqrt(max(float(cost[best]), 0.0)), time.perf_counter() - started


# --------------------------------------------------------------------------------------------------
# Report and CLI entry


def write_report(folder: Path | str, model: SurrogateModel, params: np.ndarray, truth: np.ndarray,
                 metrics: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write ``report.json`` (metrics, config, data and PCA facts, targets) and ``residuals.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    metrics = metrics if metrics is not None else evaluate(model, params, truth, timing=False)
    pred = model.predict(params)
    residual = (pred - truth).ravel()
    relative = 100.0 * residual / truth.ravel()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].hist(residual * 1e4, bins=200, color="tab:blue")
    axes[0].set_xlabel("surrogate − engine IV (bp of vol)")
    axes[0].set_yscale("log")
    axes[1].hist(relative, bins=200, color="tab:orange")
    axes[1].set_xlabel("relative IV error (%)")
    axes[1].set_yscale("log")
    fig.suptitle(f"Residuals on {params.shape[0]} held-out surfaces ({residual.size} points)")
    fig.tight_layout()
    fig.savefig(folder / "residuals.png", dpi=110)
    plt.close(fig)
    report = {
        "metrics": metrics, "targets": TARGETS, "config": asdict(model.config), "info": model.info,
        "domain": model.domain.to_dict(), "grid_hash": grid_hash(),
        "history_tail": model.history[-5:], **(extra or {}),
    }
    path = folder / "report.json"
    path.write_text(json.dumps(report, indent=2, default=float))
    return path


def format_metrics_table(metrics: dict[str, Any]) -> str:
    """Plain-text table of the bucket metrics (IV in absolute vol units; relative errors in %)."""
    header = (f"{'bucket':<12}{'R2':>10}{'RMSE':>10}{'MAE':>10}{'max':>10}{'median':>10}"
              f"{'mean rel%':>11}{'p99 rel%':>10}")
    lines = [header, "-" * len(header)]
    for name, m in metrics["buckets"].items():
        lines.append(f"{name:<12}{m['r2']:>10.6f}{m['rmse']:>10.2e}{m['mae']:>10.2e}{m['max_abs']:>10.2e}"
                     f"{m['median_abs']:>10.2e}{100 * m['mean_rel']:>11.4f}{100 * m['p99_rel']:>10.4f}")
    return "\n".join(lines)


def calibration_benchmark(model: SurrogateModel, params: np.ndarray, surfaces: np.ndarray,
                          n: int = 50) -> dict[str, float]:
    """Cold-start surrogate calibration on ``n`` engine surfaces: time, fit RMSE and parameter error."""
    calibrate_with_surrogate(surfaces[0], model)  # warm-up (float64 copy, allocator)
    seconds, rmses, unit_errors = [], [], []
    for p, s in zip(params[:n], surfaces[:n], strict=False):
        fitted, rmse, dt = calibrate_with_surrogate(s, model)
        seconds.append(dt)
        rmses.append(rmse)
        unit_errors.append(np.abs(model.domain.to_unit(fitted) - model.domain.to_unit(p)))
    unit = np.array(unit_errors)
    return {
        "n": len(seconds), "median_seconds": float(np.median(seconds)),
        "mean_seconds": float(np.mean(seconds)),
        "p90_seconds": float(np.percentile(seconds, 90)), "median_fit_rmse": float(np.median(rmses)),
        "median_unit_param_error": {name: float(v) for name, v in zip(PARAM_NAMES, np.median(unit, axis=0),
                                                                       strict=True)},
    }


def _targets_status(metrics: dict[str, Any], calibration: dict[str, float]) -> dict[str, bool]:
    overall, speed = metrics["buckets"]["overall"], metrics.get("speed", {})
    return {
        "mean_rel_error<=0.2%": overall["mean_rel"] <= TARGETS["mean_rel_error"],
        "p99_rel_error<=1%": overall["p99_rel"] <= TARGETS["p99_rel_error"],
        "rmse<=0.001": overall["rmse"] <= TARGETS["rmse"],
        "speedup_batched>=1000x": speed.get("speedup_batched", 0.0) >= TARGETS["speedup_batched"],
        "calibration<20ms": calibration.get("median_seconds", math.inf) < TARGETS["calibration_seconds"],
    }


def surrogate_main(out: Path, seed: int = 0, preset: str = "surrogate", n_test: int = 16384,
                   overrides: Sequence[tuple[str, Any]] = ()) -> int:
    """Train a preset (plus ``overrides``), evaluate on held-out surfaces, benchmark, save model and
    report into ``out``; print a table."""
    out = Path(out)
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    base = SurrogateConfig(cache_dir=str(out / "data"), seed=seed)
    config = replace(base, **{**PRESETS[preset], **dict(overrides)})
    domain = ParameterDomain()
    with ThreadLimit(config.num_threads):
        model = train_surrogate(config, domain)
        test = generate_surfaces(domain, n_test, seed + 2_000_003, config.sampler, config.generation_batch,
                                 config.cache_dir, config.progress)
        metrics = evaluate(model, test.params, test.surfaces, timing=True)
        calibration = calibration_benchmark(model, test.params, test.surfaces)
    metrics["n_rejected_test"] = test.n_rejected
    metrics["calibration"] = calibration
    status = _targets_status(metrics, calibration)
    metrics["targets_met"] = status
    model.metrics = metrics
    path = model.save(out / MODEL_FILE)
    write_report(out, model, test.params, test.surfaces, metrics)
    info, speed = model.info, metrics["speed"]
    print(f"surrogate: {info['n_weights']} weights, {info['pca_components']} PCA components "
          f"(recon RMSE {info['pca_recon_rmse']:.1e}), {info['epochs_run']} epochs")
    print(f"data: {info['n_train']} train / {info['n_val']} val / {test.params.shape[0]} test surfaces; "
          f"rejected {info['n_rejected_train']} / {info['n_rejected_val']} / {test.n_rejected}; "
          f"{info['data_seconds']:.0f} s pricing, {info['train_seconds']:.0f} s training")
    print(format_metrics_table(metrics))
    print(f"speed per surface: engine {speed['engine_single_s'] * 1e3:.3f} ms single, "
          f"{speed['engine_batched_s'] * 1e6:.1f} us batched; "
          f"surrogate {speed['surrogate_single_s'] * 1e6:.1f} us single, "
          f"{speed['surrogate_batched_s'] * 1e6:.3f} us batched -> x{speed['speedup_batched']:.0f} "
          f"batched, x{speed['speedup_single']:.0f} single")
    print(f"calibration through surrogate: median {calibration['median_seconds'] * 1e3:.1f} ms, "
          f"p90 {calibration['p90_seconds'] * 1e3:.1f} ms, "
          f"median fit RMSE {calibration['median_fit_rmse']:.1e}")
    for name, ok in status.items():
        print(f"  target {name}: {'met' if ok else 'NOT met'}")
    print(f"saved {path}")
    return 0
