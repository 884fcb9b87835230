"""The autoscaling loop: collects each deployment's metrics and hands them to its policy.

The decision is the policy's (pure, shared with the simulator); this loop only measures — the
concurrency of a deployment is its requests in flight on replicas plus those waiting in the
activator, sampled every tick — and passes the policy's answer to the replica manager. A
deployment with requests waiting and no replica is decided on at once, not at the next tick, so
scaling from zero does not wait out a tick.

With a memory (the control plane's SQLite store), every decision is saved with the samples and
the policy's state; a restarted control plane calls `resume()` after adopting its replicas, so
each deployment continues from where it stopped and holds what was adopted (see policy.py)
instead of deciding from an empty history (which scaled every deployment down at once).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from headway.infra.autoscale.policy import POLICIES
from headway.infra.autoscale.types import AutoscaleConfig, DeploymentMetrics, ResumablePolicy, ScaleDecision

log = logging.getLogger("headway.autoscale")


@dataclass
class _Track:
    policy: ResumablePolicy
    key: str                                   # the spec fields the policy was built from
    tick_s: float
    window_s: float
    samples: deque[tuple[float, float]] = field(default_factory=deque)
    last: float = -1e18
    decision: ScaleDecision | None = None


@dataclass(frozen=True)
class Observed:
    """What the loop measured of one deployment at one moment."""

    concurrency: float
    ready: int
    starting: int
    queued: int
    startup_s: float | None
    latency_p95_s: float | None


class AutoscaleMemory(Protocol):
    """Where the loop keeps each deployment's autoscaler state (the control plane's Store)."""

    def autoscaler_state(self, name: str) -> dict[str, Any] | None: ...
    def put_autoscaler_state(self, name: str, state: dict[str, Any]) -> None: ...


class AutoscaleLoop:
    """``waiting(name)`` is the cheap check run every poll: whether requests wait with no
    replica at all (then decide at once); ``observe(name)`` measures everything, only when a
    decision is due; either returns None for a deployment that is gone (its policy is dropped)."""

    def __init__(self, observe: Callable[[str], Observed | None], apply: Callable[[str, int, str], None],
                 *, waiting: Callable[[str], bool | None] | None = None, poll_s: float = 0.05,
                 clock: Callable[[], float] = time.monotonic, memory: AutoscaleMemory | None = None,
                 wall: Callable[[], float] = time.time):
        self.observe = observe
        self.waiting = waiting or (lambda name: (o := observe(name)) is not None and o.queued > 0
                                   and o.ready + o.starting == 0)
        self.apply = apply
        self.poll_s = poll_s
        self.clock = clock
        self.wall = wall
        self.memory = memory
        self.tracks: dict[str, _Track] = {}

    def configure(self, name: str, policy: str, key: str, config: AutoscaleConfig, tick_s: float, window_s: float) -> None:
        """(Re)build a deployment's policy when its settings changed (keeping the samples and holding
        the last decision, as after a restart); keep it (and its state) otherwise."""
        track = self.tracks.get(name)
        if track is None or track.key != key:
            new = self.tracks[name] = _Track(POLICIES[policy](config), key, tick_s, window_s)
            if track is not None and track.decision is not None:
                # new settings, same load: keep the samples, and what was decided until they say otherwise
                now = self.clock()
                new.samples = deque(track.samples)
                covered = now - new.samples[0][0] if new.samples else 0.0
                new.policy.resume({}, 0.0, track.decision.desired, covered, now)

    def forget(self, name: str) -> None:
        self.tracks.pop(name, None)

    def resume(self, name: str, adopted: int) -> ScaleDecision | None:
        """After a control-plane restart (call after `configure`): restore the deployment's saved
        samples and policy state, moved onto this process's clock, and hold the `adopted` replicas
        (ready + starting found running). Returns the resumed decision (at least `adopted`
        within the bounds) for the caller to apply; None for an unknown deployment."""
        track = self.tracks.get(name)
        if track is None:
            return None
        now = self.clock()
        saved = self.memory.autoscaler_state(name) if self.memory is not None else None
        state: dict[str, Any] = saved if isinstance(saved, dict) else {}
        shift = 0.0
        if isinstance(state.get("clock"), (int, float)) and isinstance(state.get("wall"), (int, float)):
            # a saved time t happened (wall_now - wall) before now on the wall clock
            shift = (now - state["clock"]) - (self.wall() - state["wall"])
        samples = [(float(t) + shift, float(c)) for t, c in _pairs(state.get("samples"))
                   if now - track.window_s - track.tick_s <= float(t) + shift <= now]
        track.samples = deque(samples)
        policy_state = state.get("policy") if state.get("key") == track.key else None
        covered = now - samples[0][0] if samples else 0.0
        track.policy.resume(policy_state if isinstance(policy_state, dict) else {}, shift, adopted, covered, now)
        desired = adopted
        saved_at = state.get("wall")
        if isinstance(state.get("desired"), int) and isinstance(saved_at, (int, float)) \
                and self.wall() - saved_at <= track.window_s:
            desired = max(adopted, state["desired"])     # recent enough to still stand (e.g. one died meanwhile)
        track.decision = ScaleDecision(desired, "resumed")
        log.info("%s: autoscaler resumed (%d replica(s) adopted, %d sample(s) restored, last decision %s)",
                 name, adopted, len(samples), state.get("desired", "none"))
        return track.decision

    def _save(self, name: str, track: _Track, now: float) -> None:
        if self.memory is None or track.decision is None:
            return
        self.memory.put_autoscaler_state(name, {
            "key": track.key, "clock": now, "wall": self.wall(), "desired": track.decision.desired,
            "reason": track.decision.reason, "samples": [[t, c] for t, c in track.samples],
            "policy": track.policy.state()})

    def step(self) -> None:
        now = self.clock()
        for name, track in list(self.tracks.items()):
            if now - track.last < track.tick_s:
                from_zero = self.waiting(name)
                if from_zero is None:
                    self.forget(name)
                if not from_zero:
                    continue
            o = self.observe(name)
            if o is None:
                self.forget(name)
                continue
            track.last = now
            track.samples.append((now, o.concurrency))
            while track.samples and track.samples[0][0] < now - track.window_s - track.tick_s:
                track.samples.popleft()
            m = DeploymentMetrics(samples=tuple(track.samples), ready=o.ready, starting=o.starting, queued=o.queued,
                                  startup_s=o.startup_s, latency_p95_s=o.latency_p95_s)
            track.decision = track.policy.decide(m, now)
            self.apply(name, track.decision.desired, track.decision.reason)
            self._save(name, track, now)

    async def run(self) -> None:
        while True:
            try:
                self.step()
            except Exception:   # the loop must outlive one bad step; the error is logged
                log.exception("autoscaler step failed")
            await asyncio.sleep(self.poll_s)


def _pairs(value: object) -> list[tuple[float, float]]:
    if not isinstance(value, list):
        return []
    return [(p[0], p[1]) for p in value
            if isinstance(p, list) and len(p) == 2 and all(isinstance(x, (int, float)) for x in p)]
