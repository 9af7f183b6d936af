"""Buy-and-hold: constant target exposures, the benchmark every other policy must beat."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from strategies.base import Observation, Policy, register_policy


class HoldPolicyConfig(BaseModel):
    """Target exposure per instrument, held for the whole run."""

    model_config = ConfigDict(extra="forbid")

    targets: dict[str, float] = Field(default_factory=lambda: {"SYNTH:BTCUSDT": 1.0}, min_length=1)


class HoldPolicy(Policy):
    """Always asks for the same exposures; the order manager only trades the drift away from them."""

    name = "hold"

    def __init__(self, config: HoldPolicyConfig | None = None) -> None:
        self.config = config or HoldPolicyConfig()
        self.instruments = tuple(self.config.targets)

    def targets(self, observation: Observation) -> Mapping[str, float]:
        return self.config.targets


@register_policy("hold")
def load_hold_policy(path: str | None, settings: Any) -> HoldPolicy:
    """``hold`` takes no path; its config is the ``hold`` section of the settings, if any."""
    if path is not None:
        raise ValueError(f"the hold policy takes no path, got {path!r}")
    section = getattr(settings, "hold", None)
    return HoldPolicy(HoldPolicyConfig.model_validate(section) if section is not None else None)
