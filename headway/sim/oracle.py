"""The oracle: an autoscaler that knows every future arrival (a yardstick, not a policy to run).

It computes, per second s of the trace, the concurrency the trace will bring if every request
starts at its arrival and runs for its service time at a batch of `target_concurrency`
(`load_per_second(s)`: the most requests in service at once during [s, s+1)), and the replicas that carry it at
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
    """The most requests in service at once during each second [s, s+1) if each started on arrival."""
    seconds = int(math.ceil(trace.duration_s)) + 1
    if not len(trace):
        return np.zeros(seconds)
    t = np.asarray(trace.times)
    dur = (model.prefill_base_s + np.asarray(trace.prompt_tokens) / model.prefill_tokens_per_s
           + np.asarray(trace.output_tokens) * model.itl(batch))
    at = np.concatenate([t, t + dur])
    delta = np.concatenate([np.ones(len(t)), -np.ones(len(t))])
    order = np.lexsort((delta, at))             # by time; at a tie an end before a start
    at, level = at[order], np.cumsum(delta[order])
    seconds = max(seconds, int(at[-1]) + 2)
    peak = np.zeros(seconds)
    np.maximum.at(peak, at.astype(np.int64), level)
    before = np.searchsorted(at, np.arange(seconds), side="left") - 1   # the level each second starts at
    carried = np.where(before >= 0, level[np.maximum(before, 0)], 0.0)
    return np.maximum(peak, carried)


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
