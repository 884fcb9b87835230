"""The event loop: a trace through a fleet, an autoscaling policy and a router policy.

Drives the policies the way the live loops do:
- every `tick_s` (simulated) the loop samples concurrency (requests in flight on replicas plus
  requests waiting in the activator), and calls `autoscaler.decide()` with the samples of the
  last `window_s` and a tick, the ready and starting counts, the activator's depth, the mean
  measured startup time and the p95 time to first token of the last stable window; it then
  starts or lets go the difference to the decision; a request that arrives to a deployment
  with no replica at all is decided on at once, not at the next tick; during `warmup_s` the
  initial replicas serve and samples are taken, but no decision is asked for (every policy
  starts with the same fleet and a full window, not from a cold start it never sees live);
- every request that finds a ready replica with room is placed by `router.choose()` among
  exactly those replicas; `observe()` hears `started` and `finished` (as the live router's
  proxy reports them);
- a request that finds none waits in the activator (FIFO, at most `activator_size`); it is
  placed as soon as room frees, and dropped if it has waited `activator_timeout_s`.
Events are kept in one heap (replica ready, a replica's next completion); arrivals and ticks
are two sorted streams merged with it. A request meets the SLA when its time to first token
(arrival to first token: the activator wait, the prefill and one decode step) is within
`ttft_objective_s` and its mean time per output token after the first (TPOT, which grows with
the replica's batch) within `tpot_objective_s`.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from array import array
from collections import deque
from dataclasses import dataclass, field

from headway.infra.autoscale.types import AutoscalePolicy, DeploymentMetrics
from headway.infra.router.policies.base import PolicyBase
from headway.infra.router.types import RouteEvent, RouteRequest, RoutingPolicy
from headway.sim.arrivals import Trace
from headway.sim.fleet import Fleet, Replica
from headway.sim.service import DEFAULT, ServiceModel

_READY, _COMPLETE = 0, 1
_BUCKETS = 96                       # latency histogram: bucket k holds [10 ms * 1.2^k, 10 ms * 1.2^(k+1))
_LOG_GROWTH = math.log(1.2)


@dataclass(frozen=True)
class SimConfig:
    max_concurrency: int = 32           # requests a replica holds at most (the engine's batch slots)
    startup_s: float = 30.0             # scheduled -> ready
    startup_spread_s: float = 0.0       # each startup drawn uniformly from startup_s +- this
    tick_s: float = 1.0                 # the control loop's period
    ttft_objective_s: float = 2.0       # the SLA: time to first token within this
    tpot_objective_s: float | None = 0.05  # and (if set) mean time per output token after the first within this
    activator_size: int = 1_000_000
    activator_timeout_s: float = 120.0
    initial_replicas: int = 0           # ready at t=0
    warmup_s: float = 0.0               # the autoscaler is first consulted after this (samples still taken)
    tail_s: float = 1800.0              # after the trace, how long in-flight work may still finish
    seed: int = 0

    def __post_init__(self) -> None:
        errors = []
        if self.max_concurrency < 1 or self.activator_size < 0 or self.initial_replicas < 0:
            errors.append("max_concurrency must be >= 1, activator_size and initial_replicas >= 0")
        if self.startup_s < 0 or not 0 <= self.startup_spread_s <= self.startup_s:
            errors.append(f"need startup_s >= 0 and 0 <= startup_spread_s <= startup_s, got "
                          f"{self.startup_s}, {self.startup_spread_s}")
        if self.tpot_objective_s is not None and self.tpot_objective_s <= 0:
            errors.append(f"tpot_objective_s must be > 0 (or None for no TPOT objective), got {self.tpot_objective_s}")
        if self.tick_s <= 0 or self.ttft_objective_s <= 0 or self.activator_timeout_s < 0 or self.tail_s < 0:
            errors.append("tick_s and ttft_objective_s must be > 0, activator_timeout_s and tail_s >= 0")
        if self.warmup_s < 0:
            errors.append(f"warmup_s must be >= 0, got {self.warmup_s}")
        if errors:
            raise ValueError("invalid simulator config: " + "; ".join(errors))


@dataclass
class RunResult:
    policy: str
    requests: int
    ttft_s: array                       # per request; NaN when it never started (dropped, unfinished)
    e2e_s: array
    tpot_s: array                       # mean seconds per output token after the first; NaN if not finished
    dropped: int = 0                    # timed out in the activator or found it full
    unfinished: int = 0                 # still held when the tail ran out
    replica_seconds: float = 0.0        # every replica from asked-for to gone, starting time included
    scale_ups: int = 0                  # decisions that raised the total
    scale_downs: int = 0
    replicas_started: int = 0
    peak_replicas: int = 0              # most replicas held at once (any phase)
    end_s: float = 0.0
    wall_s: float = 0.0
    timeline: list[tuple[float, int, int, float]] = field(default_factory=list)  # (t, held, desired, concurrency)


class _Latency:
    """TTFTs by tick in log buckets; p95 over the last `window` ticks without sorting."""

    def __init__(self, window_ticks: int):
        self.ticks: deque[list[int]] = deque()
        self.window = max(1, window_ticks)
        self.total = [0] * _BUCKETS
        self.current = [0] * _BUCKETS

    def add(self, seconds: float) -> None:
        k = 0 if seconds <= 0.01 else min(_BUCKETS - 1, int(math.log(seconds / 0.01) / _LOG_GROWTH))
        self.current[k] += 1

    def roll(self) -> float | None:
        """Close the tick; the p95 over the window (upper edge of its bucket), None if empty."""
        self.ticks.append(self.current)
        self.total = [a + b for a, b in zip(self.total, self.current)]
        if len(self.ticks) > self.window:
            self.total = [a - b for a, b in zip(self.total, self.ticks.popleft())]
        self.current = [0] * _BUCKETS
        n = sum(self.total)
        if n == 0:
            return None
        seen, need = 0, 0.95 * n
        for k, c in enumerate(self.total):
            seen += c
            if seen >= need:
                return 0.01 * 1.2 ** (k + 1)
        return 0.01 * 1.2 ** _BUCKETS


def simulate(trace: Trace, autoscaler: AutoscalePolicy, router: RoutingPolicy, cfg: SimConfig = SimConfig(),
             model: ServiceModel = DEFAULT, *, window_s: float = 60.0, keep_timeline: bool = False) -> RunResult:
    """Run the trace to the end (and its in-flight work through `tail_s`); see the module docstring."""
    wall0 = time.perf_counter()
    times, prompts, outputs = trace.times, trace.prompt_tokens, trace.output_tokens
    n_req = len(times)
    nan = float("nan")
    res = RunResult(getattr(autoscaler, "name", type(autoscaler).__name__), n_req,
                    array("d", [nan]) * n_req, array("d", [nan]) * n_req, array("d", [nan]) * n_req)
    admitted = array("d", [nan]) * n_req
    rng = random.Random(cfg.seed)
    heap: list[tuple[float, int, int, Replica, int]] = []
    seq = 0

    def schedule(at: float, r: Replica) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(heap, (at, seq, _COMPLETE, r, r.version))

    fleet = Fleet(model, cfg.max_concurrency, schedule)
    by_id = fleet.by_id
    latency = _Latency(round(window_s / cfg.tick_s))
    samples: deque[tuple[float, float]] = deque()   # the stable window and a tick, as the live loop keeps
    startups: list[float] = []
    queue: deque[int] = deque()

    def start_replica(now: float) -> None:
        nonlocal seq
        spread = cfg.startup_spread_s
        startup = cfg.startup_s + (rng.uniform(-spread, spread) if spread else 0.0)
        r = fleet.start(now, startup)
        res.replicas_started += 1
        seq += 1
        heapq.heappush(heap, (r.ready_at, seq, _READY, r, 0))

    # events go to a router that listens (least-load and round-robin keep PolicyBase's no-op)
    listens = getattr(type(router), "observe", None) is not PolicyBase.observe

    def place(i: int, now: float) -> None:
        req = RouteRequest("sim", i)
        r = by_id[router.choose(req, fleet.views, now)]
        ttft = now - times[i] + fleet.admit(r, i, prompts[i], outputs[i], now)
        res.ttft_s[i] = ttft
        admitted[i] = now
        latency.add(ttft)
        if listens:
            router.observe(RouteEvent("started", r.id, now, req))

    def release(now: float) -> None:
        timeout = cfg.activator_timeout_s
        while queue and fleet.views:
            i = queue.popleft()
            if now - times[i] > timeout:
                res.dropped += 1
            else:
                place(i, now)

    def control(now: float) -> None:
        """One control step: sample, decide, start or let go the difference."""
        while queue and now - times[queue[0]] > cfg.activator_timeout_s:
            queue.popleft()
            res.dropped += 1
        samples.append((now, float(fleet.in_flight + len(queue))))
        while samples[0][0] < now - window_s - cfg.tick_s:
            samples.popleft()
        p95 = latency.roll()
        if now < cfg.warmup_s and (fleet.ready or fleet.starting):
            return  # warming up: the initial fleet serves while the window fills
        m = DeploymentMetrics(tuple(samples), ready=len(fleet.ready), starting=len(fleet.starting),
                              queued=len(queue), startup_s=sum(startups) / len(startups) if startups else None,
                              latency_p95_s=p95)
        desired = autoscaler.decide(m, now).desired
        total = len(fleet.ready) + len(fleet.starting)
        if desired > total:
            res.scale_ups += 1
            for _ in range(desired - total):
                start_replica(now)
        elif desired < total:
            res.scale_downs += 1
            fleet.remove(total - desired, now)
        held = len(fleet.ready) + len(fleet.starting) + len(fleet.draining)
        res.peak_replicas = max(res.peak_replicas, held)
        if keep_timeline:
            res.timeline.append((now, held, desired, samples[-1][1]))

    for _ in range(cfg.initial_replicas):
        r = fleet.start(0.0, 0.0)
        fleet.mark_ready(r, 0.0)
    res.peak_replicas = cfg.initial_replicas

    i_arr, next_tick, now = 0, cfg.tick_s, 0.0
    end_by = trace.duration_s + cfg.tail_s
    inf = math.inf
    while True:
        t_arr = times[i_arr] if i_arr < n_req else inf
        t_ev = heap[0][0] if heap else inf
        if t_arr <= t_ev and t_arr < next_tick:
            now = t_arr
            if queue or not fleet.views:
                if len(queue) < cfg.activator_size:
                    queue.append(i_arr)
                else:
                    res.dropped += 1
                if not fleet.ready and not fleet.starting:
                    control(now)  # from zero: decided at once, not at the next tick (as the live loop does)
            else:
                place(i_arr, now)
            i_arr += 1
        elif t_ev < next_tick:
            now, _, kind, r, version = heapq.heappop(heap)
            if kind == _READY:
                if fleet.mark_ready(r, now):
                    startups.append(now - r.scheduled_at)
                    release(now)
            elif version == r.version:
                for i in fleet.complete(r, now):
                    e2e = res.e2e_s[i] = now - times[i]
                    res.tpot_s[i] = (e2e - res.ttft_s[i]) / max(1, outputs[i] - 1)
                    if listens:
                        router.observe(RouteEvent("finished", r.id, now, RouteRequest("sim", i), now - admitted[i]))
                if queue and fleet.views:
                    release(now)
        else:
            now = next_tick
            next_tick += cfg.tick_s
            control(now)
            if i_arr >= n_req and not queue and fleet.in_flight == 0 and now >= trace.duration_s:
                break
            if now >= end_by:
                break
    res.unfinished = fleet.in_flight + len(queue)
    res.end_s = now
    res.replica_seconds = sum((now if r.gone_at is None else r.gone_at) - r.scheduled_at for r in fleet.all)
    res.wall_s = time.perf_counter() - wall0
    return res
