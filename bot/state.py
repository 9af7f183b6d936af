"""The state builder: online z-score normalisation and the last ``window`` vectors as one state.

Features have wildly different scales (funding 1e-4, IV 0.6, history in seconds)
and drift over time, so each is normalised by running statistics of the stream
itself (Welford's algorithm, exact and numerically stable) instead of a scaler
fitted once. The normaliser updates with a vector *before* normalising it: the
first observation maps to 0, and an outlier's z-score is bounded by ``sqrt(n − 1)``
on top of the ``±clip`` clipping. Z-scores use the population standard deviation; a
feature that has not varied yet maps to 0.

A z-score only says where a value sits in the stream's own history, so it loses the
level and the sign: a funding rate that has been +0.01 % all along reads 0, the same as
one that has been −0.05 % all along. Features whose level matters and whose scale is
known (funding and basis in basis points, the account's own exposure) are therefore
scaled by a fixed divisor instead (``fixed_scales``: glob pattern of feature names →
divisor), then clipped like the rest.

Both the statistics and the window of past vectors round-trip through
:meth:`StateBuilder.state_dict` (plain JSON types, floats exact), so a restarted run
resumes normalisation exactly where it stopped instead of re-learning it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

STATE_DICT_VERSION = 1


class StateBuilderConfig(BaseModel):
    """Window length (decisions) and z-score clip of the policy's state."""

    model_config = ConfigDict(extra="forbid")

    window: int = Field(16, ge=1)
    clip: float = Field(5.0, gt=0)
    fixed_scales: dict[str, float] = Field(
        default_factory=lambda: {"*.funding": 1e-4, "*.basis": 1e-4, "*.exposure": 1.0, "*.available": 1.0},
        description="glob of feature names → fixed divisor, instead of the running z-score (first match)",
    )

    @field_validator("fixed_scales")
    @classmethod
    def _positive_scales(cls, scales: dict[str, float]) -> dict[str, float]:
        bad = {pattern: scale for pattern, scale in scales.items() if not scale > 0}
        if bad:
            raise ValueError(f"fixed scales must be positive, got {bad}")
        return scales

    def scales_for(self, feature_names: Sequence[str]) -> list[float | None]:
        """Each feature's fixed divisor (the first matching pattern's), None for a running z-score."""
        patterns = self.fixed_scales.items()
        return [
            next((scale for pattern, scale in patterns if fnmatch.fnmatchcase(name, pattern)), None)
            for name in feature_names
        ]


class RunningNormalizer:
    """Per-feature running mean and variance (Welford); clipped z-scores."""

    def __init__(self, dim: int, clip: float = 5.0) -> None:
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        if not clip > 0:
            raise ValueError(f"clip must be positive, got {clip}")
        self.dim = dim
        self.clip = clip
        self.count = 0
        self.mean = np.zeros(dim, dtype=np.float64)
        self._m2 = np.zeros(dim, dtype=np.float64)  # sum of squared deviations from the mean

    @property
    def var(self) -> np.ndarray:
        """Population variance of the vectors seen so far (zeros before any)."""
        return self._m2 / self.count if self.count else np.zeros(self.dim)

    def update(self, x: np.ndarray) -> None:
        x = self._checked(x)
        self.count += 1
        delta = x - self.mean
        self.mean += delta / self.count
        self._m2 += delta * (x - self.mean)

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """``(x − mean) / std`` clipped to ``±clip``; 0 where the standard deviation is 0."""
        x = self._checked(x)
        std = np.sqrt(self.var)
        varied = std > 0.0
        z = np.zeros(self.dim, dtype=np.float64)
        z[varied] = (x[varied] - self.mean[varied]) / std[varied]
        return np.clip(z, -self.clip, self.clip)

    def _checked(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.shape != (self.dim,):
            raise ValueError(f"expected a vector of shape ({self.dim},), got {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError("feature vector has non-finite values")
        return x

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean.tolist(), "m2": self._m2.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mean = np.asarray(state["mean"], dtype=np.float64)
        m2 = np.asarray(state["m2"], dtype=np.float64)
        if mean.shape != (self.dim,) or m2.shape != (self.dim,):
            raise ValueError(
                f"normaliser state has dims {mean.shape}/{m2.shape}, this normaliser has ({self.dim},)"
            )
        count = int(state["count"])
        if count < 0:
            raise ValueError(f"normaliser count must be >= 0, got {count}")
        self.count, self.mean, self._m2 = count, mean, m2


class StateBuilder:
    """Normalises each feature vector and keeps the last ``window`` of them, oldest first.

    The state is a ``[window, dim]`` array, zero rows first until ``window`` vectors
    have been seen. It is kept as one array shifted by a row per update (a few kB per
    decision), which keeps the layout trivially the one the policy sees.
    ``schema_hash``, when given, is stored with the state and checked on load, so a
    state saved under another feature schema of the same width is refused.
    ``fixed_scales`` (one entry per feature, None for the running z-score) divides the
    features whose level matters by a fixed scale instead.
    """

    def __init__(
        self,
        dim: int,
        window: int = 16,
        clip: float = 5.0,
        schema_hash: str | None = None,
        fixed_scales: Sequence[float | None] | None = None,
    ) -> None:
        if window <= 0:
            raise ValueError(f"window must be positive, got {window}")
        self.normalizer = RunningNormalizer(dim, clip)
        self.dim = dim
        self.window = window
        self.schema_hash = schema_hash
        scales = list(fixed_scales) if fixed_scales is not None else [None] * dim
        if len(scales) != dim:
            raise ValueError(f"expected {dim} fixed scales (None for running), got {len(scales)}")
        self._fixed = np.array([i for i, scale in enumerate(scales) if scale is not None], dtype=np.int64)
        self._scales = np.array([scale for scale in scales if scale is not None], dtype=np.float64)
        if not np.all(self._scales > 0):
            raise ValueError("fixed scales must be positive")
        self._rows = np.zeros((window, dim), dtype=np.float64)

    def update(self, vector: np.ndarray) -> np.ndarray:
        """Add one raw feature vector; returns the new ``[window, dim]`` state (a copy)."""
        self.normalizer.update(vector)
        row = self.normalizer.normalize(vector)
        if self._fixed.size:
            fixed = np.asarray(vector, dtype=np.float64)[self._fixed] / self._scales
            row[self._fixed] = np.clip(fixed, -self.normalizer.clip, self.normalizer.clip)
        self._rows[:-1] = self._rows[1:]
        self._rows[-1] = row
        return self.state()

    def state(self) -> np.ndarray:
        """The current ``[window, dim]`` state, oldest row first (a copy)."""
        return self._rows.copy()

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: Python ints and floats, which JSON round-trips exactly."""
        return {
            "version": STATE_DICT_VERSION,
            "dim": self.dim,
            "window": self.window,
            "schema_hash": self.schema_hash,
            "normalizer": self.normalizer.state_dict(),
            "rows": self._rows.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; dims, window and schema must match this builder."""
        if state.get("version") != STATE_DICT_VERSION:
            raise ValueError(f"unsupported state builder version {state.get('version')!r}")
        if state["dim"] != self.dim or state["window"] != self.window:
            raise ValueError(
                f"saved state is [window={state['window']}, dim={state['dim']}], this builder is "
                f"[window={self.window}, dim={self.dim}]: the feature config or state window changed"
            )
        saved_hash = state.get("schema_hash")
        if self.schema_hash is not None and saved_hash is not None and saved_hash != self.schema_hash:
            raise ValueError(
                f"saved state was built for feature schema {saved_hash[:12]}, this run uses "
                f"{self.schema_hash[:12]}: start the normaliser afresh or restore the old feature config"
            )
        rows = np.asarray(state["rows"], dtype=np.float64)
        if rows.shape != (self.window, self.dim):
            raise ValueError(f"saved rows have shape {rows.shape}, expected {(self.window, self.dim)}")
        self.normalizer.load_state_dict(state["normalizer"])
        self._rows = rows
