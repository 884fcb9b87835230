"""The oracle: an autoscaler that knows every future arrival (a yardstick, not a policy to run).

It computes, per second s of the trace, the concurrency the trace will bring if every request
starts at its arrival and runs for its service time at a batch of `target_concurrency`
(`need_load(s)`: requests whose run overlaps [s, s+1)), and the replicas that carry it at
`target_concurrency` each, with no headroom: need(s) = ceil(load(s) / target_concurrency).
Its decision at time t is max(need) over [t, t + startup_s + tick]: what it asks for now is
ready exactly when the load arrives, and a replica is kept through a dip shorter than a
startup (letting it go and asking again would cost more). It sizes for the same per-replica
load the policies aim at (`target_concurrency`), without their utilization headroom, so its
replica-seconds are the least any of them could use for the service the SLA asks for.
"""

from __future__ import annotations

import math

import numpy as np

from headway.infra.autoscale.types import DeploymentMetrics, ScaleDecision
from headway.sim.arrivals import Trace
from headway.sim.service import ServiceModel


def load_per_second(trace: Trace, model: ServiceModel, batch: int) -> np.ndarray:
    """Requests in service during each second [s, s+1) if each started on arrival."""
    seconds = int(math.ceil(trace.duration_s)) + 1
    if not len(trace):
        return np.zeros(seconds)
    t = np.asarray(trace.times)
    itl = model.itl(batch)
    dur = (model.prefill_base_s + np.asarray(trace.prompt_tokens) / model.prefill_tokens_per_s
           + np.asarray(trace.output_tokens) * itl)
    first = np.floor(t).astype(np.int64)
    last = np.floor(t + dur).astype(np.int64)            # the last second the request overlaps
    span = int(last.max()) + 2
    delta = np.zeros(max(span, seconds) + 1)
    np.add.at(delta, first, 1)
    np.add.at(delta, last + 1, -1)
    return np.cumsum(delta)[: max(span, seconds)]


def oracle_schedule(trace: Trace, model: ServiceModel, target_concurrency: float, startup_s: float,
                    tick_s: float = 1.0) -> list[int]:
    """Replicas the oracle holds at each whole second (see the module docstring)."""
    need = np.ceil(load_per_second(trace, model, max(1, round(target_concurrency))) / target_concurrency)
    ahead = int(math.ceil(startup_s + tick_s))
    padded = np.concatenate([need, np.zeros(ahead)])
    windows = np.lib.stride_tricks.sliding_window_view(padded, ahead + 1)
    return windows.max(axis=1).astype(np.int64).tolist()[: len(need)]


class Oracle:
    """Plays back `oracle_schedule`; pure (the schedule is its state, time picks the entry)."""

    name = "oracle"

    def __init__(self, schedule: list[int]):
        if not schedule:
            raise ValueError("the oracle needs a non-empty schedule")
        self.schedule = schedule

    def decide(self, m: DeploymentMetrics, now: float) -> ScaleDecision:
        s = min(len(self.schedule) - 1, max(0, int(now)))
        return ScaleDecision(self.schedule[s], "oracle")
