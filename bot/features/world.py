"""What the volatility world model makes of an IV surface: how unusual it is, what it imagines next.

The world model (``models/world_model.py``, ``--mode train --model world``) encodes each surface into a
small latent; its latent energy is the squared Mahalanobis distance to the training latents (about
``latent_dim`` on ordinary days, far more in a crash), and its GRU rolls the latent forward in steps of
the model's ``dt`` (one week by default). This module owns the latent history of ``underlying``, so a
policy reads the model's view by name (the hedger, ``strategies/hedger.py``) and a replay gives the same
values bit for bit (same surfaces → same latents on one torch thread).

Surfaces arrive every few minutes but the dynamics step is a week, so the history the rollout starts from
holds anchors at least ``history_interval_s`` apart (default: the model's step), at most
``history_length`` of them, and the latest surface's latent last. Each new surface is encoded at the next
decision (not on the event: ``on_event`` stays O(1)); the rollout runs once per new surface.

Local names are ``{underlying}.{field}``; fields, in order:

- ``available``: 1.0 while a surface newer than ``max_age_s`` is held, else 0.0 and every other field
  except ``age_s`` is 0.0;
- ``age_s``: seconds since that surface (capped at ``max_age_s``; 0.0 before any);
- ``energy``: latent energy of the latest surface;
- ``tail_energy``: the highest energy on the imagined path (``rollout_steps`` steps of the dynamics);
- ``atm_iv``: the latest surface's ATM IV at the grid's shortest tenor;
- ``tail_atm_iv``: the highest ATM IV at that tenor on the imagined (decoded) path;
- ``history``: latents in the history the rollout started from.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import structlog
from pydantic import BaseModel, ConfigDict, Field

from bot.events import Event, IVSurface
from bot.features.base import (
    NANOS_PER_SECOND,
    SECONDS_PER_YEAR,
    FeatureModule,
    fresh_reading,
    register_feature_module,
)
from bot.features.surface import SurfaceSnapshot

log = structlog.get_logger(__name__)
FIELDS = ("available", "age_s", "energy", "tail_energy", "atm_iv", "tail_atm_iv", "history")


class WorldFeaturesConfig(BaseModel):
    """Which model, which surfaces, and how far back and ahead the model looks."""

    model_config = ConfigDict(extra="forbid")

    model_path: Path | None = Field(
        None, description="world model file or folder (--mode train --model world)"
    )
    underlying: str = Field("BTC", min_length=1)
    history_interval_s: float | None = Field(
        None, gt=0, description="spacing of the history's latents; None: the model's step"
    )
    history_length: int = Field(8, ge=1, description="latents the rollout starts from, the latest included")
    rollout_steps: int = Field(4, ge=1, description="imagined steps of the model's dynamics")
    max_age_s: float = Field(900.0, gt=0, description="an older surface counts as unavailable")


def resolve_model_file(path: Path | str) -> Path:
    """The model file of ``path`` (a ``world_model.pt`` or the folder holding it); ValueError when missing."""
    from models.world_model import MODEL_FILE

    candidate = Path(path)
    if candidate.is_dir():
        candidate = candidate / MODEL_FILE
    if not candidate.is_file():
        raise ValueError(
            f"no world model at {path} (train one with: python main.py --mode train --model world --out DIR)"
        )
    return candidate


@register_feature_module("world")
class WorldFeatures(FeatureModule):
    """Latent energy of the latest surface and the tail of the world model's imagined path."""

    config_type = WorldFeaturesConfig
    config: WorldFeaturesConfig

    def __init__(self, config: WorldFeaturesConfig) -> None:
        super().__init__(config)
        if config.model_path is None:
            raise ValueError(
                "the world feature module needs model_path (a model from --mode train --model world)"
            )
        from models.world_model import ATM_ROW, WorldModel

        self.model_file = resolve_model_file(config.model_path)
        self._model = WorldModel.load(self.model_file)
        self._atm_row = ATM_ROW
        interval_s = config.history_interval_s or self._model.config.dt * SECONDS_PER_YEAR
        self._interval_ns = round(interval_s * NANOS_PER_SECOND)
        self._anchors: deque[tuple[int, np.ndarray]] = deque(maxlen=config.history_length)
        self._pending: IVSurface | None = None
        self._values: dict[str, float] = {}
        self._received_ns: int | None = None
        self._names = tuple(f"{config.underlying}.{field}" for field in FIELDS)

    @property
    def event_types(self) -> tuple[type[Event], ...]:
        return (IVSurface,)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self._names

    def on_event(self, event: Event) -> None:
        if isinstance(event, IVSurface) and event.underlying == self.config.underlying:
            self._pending = event  # encoded at the next decision: only the newest matters

    def compute(self, now_ns: int) -> dict[str, float]:
        if self._pending is not None:
            self._read(self._pending)
            self._pending = None
        config = self.config
        return fresh_reading(
            self._names, f"{config.underlying}.", self._values, self._received_ns, now_ns, config.max_age_s
        )

    def _read(self, surface: IVSurface) -> None:
        """Encode the surface, extend the history, imagine the next ``rollout_steps`` steps."""
        try:
            grid_iv = SurfaceSnapshot(surface).on_grid()
        except ValueError as error:
            log.warning("world_surface_ignored", underlying=surface.underlying, error=str(error))
            return
        model, ts = self._model, surface.ts_recv
        latent = model.encode(grid_iv)
        if not self._anchors or ts - self._anchors[-1][0] >= self._interval_ns:
            self._anchors.append((ts, latent))
            history = [z for _, z in self._anchors]
        else:  # the latest latent rides after the anchors until it is old enough to become one
            keep = self.config.history_length - 1
            history = [*[z for _, z in self._anchors][max(0, len(self._anchors) - keep) :], latent]
        path = model.rollout(np.stack(history), self.config.rollout_steps)
        path_atm = model.decode(path)[:, self._atm_row, 0]
        self._values = {
            "energy": float(model.energy(latent)),
            "tail_energy": float(model.energy(path).max()),
            "atm_iv": float(grid_iv[self._atm_row, 0]),
            "tail_atm_iv": float(path_atm.max()),
            "history": float(len(history)),
        }
        self._received_ns = ts
