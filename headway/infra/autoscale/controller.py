"""The autoscaling loop: collects each deployment's metrics and hands them to its policy.

The decision is the policy's (pure, shared with the simulator); this loop only measures — the
concurrency of a deployment is its requests in flight on replicas plus those waiting in the
activator, sampled every tick — and passes the policy's answer to the replica manager. A
deployment with requests waiting and no replica is decided on at once, not at the next tick, so
scaling from zero does not wait out a tick.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from headway.infra.autoscale.policy import POLICIES
from headway.infra.autoscale.types import AutoscalePolicy, DeploymentMetrics, ScaleDecision

log = logging.getLogger("headway.autoscale")


@dataclass
class _Track:
    policy: AutoscalePolicy
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


class AutoscaleLoop:
    """``waiting(name)`` is the cheap check run every poll: whether requests wait with no
    replica at all (then decide at once); ``observe(name)`` measures everything, only when a
    decision is due; either returns None for a deployment that is gone (its policy is dropped)."""

    def __init__(self, observe: Callable[[str], Observed | None], apply: Callable[[str, int, str], None],
                 *, waiting: Callable[[str], bool | None] | None = None, poll_s: float = 0.05,
                 clock: Callable[[], float] = time.monotonic):
        self.observe = observe
        self.waiting = waiting or (lambda name: (o := observe(name)) is not None and o.queued > 0
                                   and o.ready + o.starting == 0)
        self.apply = apply
        self.poll_s = poll_s
        self.clock = clock
        self.tracks: dict[str, _Track] = {}

    def configure(self, name: str, policy: str, key: str, config: object, tick_s: float, window_s: float) -> None:
        """(Re)build a deployment's policy when its settings changed; keep it (and its state) otherwise."""
        track = self.tracks.get(name)
        if track is None or track.key != key:
            self.tracks[name] = _Track(POLICIES[policy](config), key, tick_s, window_s)  # type: ignore[arg-type]

    def forget(self, name: str) -> None:
        self.tracks.pop(name, None)

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

    async def run(self) -> None:
        while True:
            try:
                self.step()
            except Exception:   # the loop must outlive one bad step; the error is logged
                log.exception("autoscaler step failed")
            await asyncio.sleep(self.poll_s)
