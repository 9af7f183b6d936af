"""The feature engine: feature modules wired to the bus, one vector in a fixed, hashed order.

The engine subscribes each module to the event types it declares, so modules see
events in the bus's deterministic order and nothing else. At a decision tick,
:meth:`FeatureEngine.vector` concatenates the modules' features in config order, each
module in its declared order. :meth:`FeatureEngine.schema` records that order with
each module's name, version and full config; its hash identifies the meaning of
every column, and the training code refuses a model trained on another one.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import structlog
from pydantic import BaseModel, ConfigDict, Field, model_validator

from bot.bus import EventBus
from bot.events import RegimeLabel
from bot.features.base import FeatureModule, create_feature_module, feature_module_class

SCHEMA_VERSION = 1
log = structlog.get_logger(__name__)


class FeatureModuleSpec(BaseModel):
    """One module of the engine: its registered name and its config fields."""

    model_config = ConfigDict(extra="forbid")

    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_module(self) -> FeatureModuleSpec:
        feature_module_class(self.name).config_type.model_validate(self.params)
        return self


class FeatureEngineConfig(BaseModel):
    """Which feature modules to run, in vector order, with their parameters."""

    model_config = ConfigDict(extra="forbid")

    modules: list[FeatureModuleSpec] = Field(
        default_factory=lambda: [
            FeatureModuleSpec(name="market"),
            FeatureModuleSpec(name="surface"),
            FeatureModuleSpec(name="pseudo_surface"),
            FeatureModuleSpec(name="position"),
        ],
        min_length=1,
    )


class FeatureEngine:
    """Feature modules subscribed to the bus; produces the feature vector at decision time."""

    def __init__(self, bus: EventBus, modules: Sequence[FeatureModule]) -> None:
        if not modules:
            raise ValueError("a feature engine needs at least one module")
        names: list[str] = []
        for module in modules:
            for event_type in module.event_types:
                # A subscription to RegimeLabel or to any base of it (Event) would leak the
                # synthetic market's true regime into features.
                if issubclass(RegimeLabel, event_type):
                    raise ValueError(
                        f"feature module {module.name!r} subscribes to {event_type.__name__}, "
                        "which would deliver RegimeLabel (evaluation only)"
                    )
            names.extend(f"{module.name}.{local}" for local in module.feature_names)
        duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
        if duplicates:
            raise ValueError(f"feature names appear twice: {duplicates[:5]}")
        for module in modules:
            for event_type in module.event_types:
                bus.subscribe(event_type, module.on_event)
        self.modules: tuple[FeatureModule, ...] = tuple(modules)
        self.feature_names: tuple[str, ...] = tuple(names)

    @property
    def dim(self) -> int:
        return len(self.feature_names)

    def vector(self, now_ns: int) -> np.ndarray:
        """All features as of event time ``now_ns``, float64 in ``feature_names`` order.

        A module returning a wrong set of names is a bug and raises. A non-finite value
        is a bug too, but one bad column must not poison the running normaliser for
        good, so it is logged and replaced by 0.0.
        """
        out = np.empty(self.dim, dtype=np.float64)
        position = 0
        for module in self.modules:
            values = module.compute(now_ns)
            if len(values) != len(module.feature_names):
                raise ValueError(
                    f"feature module {module.name!r} returned {len(values)} values "
                    f"for {len(module.feature_names)} names"
                )
            for local in module.feature_names:
                value = float(values[local])
                if not math.isfinite(value):
                    log.warning("feature_not_finite", feature=f"{module.name}.{local}", value=value)
                    value = 0.0
                out[position] = value
                position += 1
        return out

    def schema(self) -> dict[str, Any]:
        """Names in vector order, and each module's name, version, config and local names."""
        return {
            "schema_version": SCHEMA_VERSION,
            "feature_names": list(self.feature_names),
            "modules": [
                {
                    "name": module.name,
                    "version": module.version,
                    "config": module.config.model_dump(mode="json"),
                    "feature_names": list(module.feature_names),
                }
                for module in self.modules
            ],
        }

    def schema_hash(self) -> str:
        """sha256 of the canonical JSON of :meth:`schema` (sorted keys, no spaces)."""
        canonical = json.dumps(self.schema(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def build_feature_engine(bus: EventBus, config: FeatureEngineConfig | None = None) -> FeatureEngine:
    """The engine of ``config`` (defaults: market, surface, pseudo_surface) subscribed to ``bus``."""
    config = config if config is not None else FeatureEngineConfig()
    return FeatureEngine(bus, [create_feature_module(spec.name, spec.params) for spec in config.modules])
