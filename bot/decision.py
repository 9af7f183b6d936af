"""The decision loop and the run fingerprints.

At every decision tick of event time the loop turns the feature vector into the
state builder's observation and queues it. The driver resolves queued observations
right after the inbound event that crossed the tick has been dispatched: paper, live
and backtest runs ask the policy (:meth:`Engine.feed <bot.app.Engine.feed>`), the gym
environment hands the observation to the agent and applies its action. Both take the
same path at the same point of the event stream, so every mode makes the same
decisions from the same events.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Mapping

import numpy as np
import structlog

from bot.bus import EventBus
from bot.events import Fill, TargetExposure, encode
from bot.features.engine import FeatureEngine
from bot.state import StateBuilder
from strategies.base import Observation, Policy

NANOS_PER_SECOND = 1_000_000_000
log = structlog.get_logger(__name__)


class RunFingerprint:
    """sha256 of a run's fills and of its observation stream, to prove two runs identical."""

    def __init__(self, bus: EventBus) -> None:
        self._fills = hashlib.sha256()
        self._observations = hashlib.sha256()
        self.fill_count = 0
        self.observation_count = 0
        bus.subscribe(Fill, self._on_fill)

    def _on_fill(self, fill: Fill) -> None:
        self._fills.update(encode(fill))
        self.fill_count += 1

    def add_observation(self, observation: Observation) -> None:
        self._observations.update(observation.ts_ns.to_bytes(8, "little", signed=True))
        self._observations.update(np.ascontiguousarray(observation.state, dtype="<f8").tobytes())
        self.observation_count += 1

    @property
    def fills_sha256(self) -> str:
        return self._fills.hexdigest()

    @property
    def obs_sha256(self) -> str:
        return self._observations.hexdigest()


class DecisionLoop:
    """features → state on an event-time timer; queued observations → ``TargetExposure``."""

    def __init__(
        self,
        bus: EventBus,
        features: FeatureEngine,
        state_builder: StateBuilder,
        policy: Policy,
        interval_s: float,
        fingerprint: RunFingerprint,
        after_decision: Callable[[int], None] | None = None,
    ) -> None:
        self.bus = bus
        self.features = features
        self.state_builder = state_builder
        self.policy = policy
        self.fingerprint = fingerprint
        self.after_decision = after_decision
        self.decisions = 0
        self.pending: deque[Observation] = deque()
        self.last_observation: Observation | None = None
        bus.clock.set_timer("decision", int(interval_s * NANOS_PER_SECOND), self.on_tick)

    def on_tick(self, now_ns: int) -> None:
        """Observe at the tick's time; the action waits until the current event is dispatched."""
        self.pending.append(self.observe(now_ns))

    def observe(self, now_ns: int) -> Observation:
        """Build the observation for ``now_ns``; updates the normaliser and the fingerprint."""
        vector = self.features.vector(now_ns)
        state = self.state_builder.update(vector)
        observation = Observation(
            ts_ns=now_ns,
            state=state,
            features=dict(zip(self.features.feature_names, vector.tolist(), strict=True)),
            feature_names=tuple(self.features.feature_names),
            instruments=tuple(self.policy.instruments),
        )
        self.fingerprint.add_observation(observation)
        self.last_observation = observation
        return observation

    def resolve_with_policy(self) -> None:
        """Answer every queued observation with the policy (paper, live and backtest)."""
        while self.pending:
            observation = self.pending.popleft()
            targets = self.policy.act(observation)
            log.debug("decision", ts=observation.ts_ns, targets=targets)
            self.apply(targets)

    def apply(self, targets: Mapping[str, float]) -> None:
        """Publish one TargetExposure per traded instrument, in the policy's fixed order, now."""
        now_ns = self.bus.clock.now_ns()
        for instrument in self.policy.instruments:
            self.bus.publish(
                TargetExposure(
                    ts_event=now_ns,
                    ts_recv=now_ns,
                    instrument=instrument,
                    target=float(targets.get(instrument, 0.0)),
                    policy=self.policy.name,
                )
            )
        self.decisions += 1
        if self.after_decision is not None:
            self.after_decision(now_ns)
