"""The feature-module contract and its registry.

A feature module owns a small piece of market context (a price history, the last
IV surface, ...) that it updates from the events it declares, and turns into a
fixed, ordered set of named floats at each decision. Modules register themselves
by name with :func:`register_feature_module`; every module file of this package
is imported on the first lookup, so adding a module is one new file in
``bot/features/`` plus its name in the feature-engine config.

Naming convention, so that policies can read features by name: a module's local
names look like ``{instrument or underlying}.{field}`` (``SYNTH:BTCUSDT.ret_5m``)
and the engine prefixes them with the module name (``market.SYNTH:BTCUSDT.ret_5m``).
Durations inside names use :func:`duration_label` (``60`` → ``1m``, ``2592000`` → ``30d``).
"""

from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel

from bot.events import Event, split_instrument

NANOS_PER_SECOND = 1_000_000_000
SECONDS_PER_YEAR = 365.0 * 24.0 * 3600.0  # crypto trades every day: annualise over calendar time

M = TypeVar("M", bound="type[FeatureModule]")

# The embedded synthetic market's instruments: the default of the per-instrument modules.
SYNTHETIC_INSTRUMENTS = ("SYNTH:BTCUSDT", "SYNTH:BTCUSDT-PERP", "SYNTH:DOGEUSDT", "SYNTH:DOGEUSDT-PERP")

_REGISTRY: dict[str, type[FeatureModule]] = {}


class FeatureModule(ABC):
    """One source of features: reads its event types, produces its named floats.

    Subclasses set ``config_type`` (a pydantic model with defaults and
    ``extra="forbid"``) and ``version`` (bump it when the meaning of a feature
    changes, so the schema hash changes and models trained on the old meaning are
    refused). ``on_event`` must be O(1) per event; ``compute`` runs only at decision
    ticks and may do O(window) work. ``compute`` never returns NaN: missing data maps
    to a documented neutral value (usually 0.0), with availability flags where a
    consumer needs to tell "zero" from "unknown".
    """

    name: ClassVar[str]
    config_type: ClassVar[type[BaseModel]]
    version: ClassVar[int] = 1

    def __init__(self, config: BaseModel) -> None:
        if not isinstance(config, self.config_type):
            raise TypeError(f"{type(self).__name__} needs a {self.config_type.__name__}, got {config!r}")
        self.config = config

    @property
    @abstractmethod
    def event_types(self) -> tuple[type[Event], ...]:
        """Event types this module reads; the engine subscribes ``on_event`` to exactly these."""

    @property
    @abstractmethod
    def feature_names(self) -> tuple[str, ...]:
        """Local feature names, in the fixed order of the vector; known from the config alone."""

    @abstractmethod
    def on_event(self, event: Event) -> None:
        """Update this module's context with one event (O(1))."""

    @abstractmethod
    def compute(self, now_ns: int) -> dict[str, float]:
        """Every name of ``feature_names`` mapped to a finite float, as of event time ``now_ns``."""


def register_feature_module(name: str) -> Callable[[M], M]:
    """Class decorator: make a module available to the engine config under ``name``."""

    def decorate(cls: M) -> M:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"feature module name {name!r} is already taken by {existing.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def import_submodules(package: str) -> list[str]:
    """Import every module of ``package`` in sorted order (so registration order is fixed)."""
    root = importlib.import_module(package)
    names = sorted(info.name for info in pkgutil.iter_modules(root.__path__, prefix=f"{package}."))
    for name in names:
        importlib.import_module(name)
    return names


def feature_module_class(name: str) -> type[FeatureModule]:
    """The module class registered under ``name``, importing this package's modules first if needed."""
    if name not in _REGISTRY:
        import_submodules(__package__ or "bot.features")
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise ValueError(f"unknown feature module {name!r} (known: {known})") from None


def create_feature_module(name: str, params: Mapping[str, Any]) -> FeatureModule:
    """Build the module ``name`` with its config validated from ``params``."""
    cls = feature_module_class(name)
    return cls(cls.config_type.model_validate(dict(params)))


def duration_label(seconds: float) -> str:
    """Short label of a duration for feature names: 30s, 5m, 1h, 30d (whole units only)."""
    whole = int(seconds)
    if whole != seconds or whole <= 0:
        raise ValueError(f"durations in feature names must be whole positive seconds, got {seconds}")
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if whole % size == 0:
            return f"{whole // size}{unit}"
    return f"{whole}s"


def unique_instrument_ids(ids: list[str]) -> list[str]:
    """``ids`` if every one is a well-formed instrument id and none repeats (a config validator)."""
    for instrument in ids:
        split_instrument(instrument)
    if len(set(ids)) != len(ids):
        raise ValueError(f"instruments must be unique, got {ids}")
    return ids


def fresh_reading(
    names: tuple[str, ...],
    prefix: str,
    reading: Mapping[str, float],
    received_ns: int | None,
    now_ns: int,
    max_age_s: float,
) -> dict[str, float]:
    """Features of a module that holds one timed reading (a surface, a fit): every name 0.0 until
    the first, then ``{prefix}age_s`` (capped at ``max_age_s``) and, while the reading is no older
    than ``max_age_s``, ``{prefix}available`` = 1.0 and the reading's values under ``prefix``."""
    values = dict.fromkeys(names, 0.0)
    if received_ns is None:
        return values
    age_s = max(0.0, (now_ns - received_ns) / NANOS_PER_SECOND)
    values[prefix + "age_s"] = min(age_s, max_age_s)
    if age_s <= max_age_s:
        values[prefix + "available"] = 1.0
        values.update({prefix + name: value for name, value in reading.items()})
    return values
