"""Geo-aware: stay in the request's region; otherwise go where measured latency plus load is lowest.

With a region on the request and replicas in it, the least loaded of those wins. Otherwise each
replica scores `latency_s + load * load_penalty_s` (unknown latency counts as `unknown_latency_s`).
"""

from __future__ import annotations

from collections.abc import Sequence

from headway.infra.router.policies.base import PolicyBase
from headway.infra.router.types import ReplicaId, ReplicaView, RouteRequest, require


class GeoAware(PolicyBase):
    name = "geo"

    def __init__(self, seed: int = 0, load_penalty_s: float = 0.01, unknown_latency_s: float = 0.1):
        super().__init__(seed)
        self.load_penalty_s = load_penalty_s
        self.unknown_latency_s = unknown_latency_s

    def choose(self, req: RouteRequest, replicas: Sequence[ReplicaView], now: float) -> ReplicaId:
        require(replicas)
        local = [r for r in replicas if req.region is not None and r.region == req.region]
        if local:
            self.stats.note("region")
            return self.pick_min(local, lambda r: r.load).id
        self.stats.note("latency")
        return self.pick_min(replicas, self._score, tolerance=1e-4).id

    def _score(self, r: ReplicaView) -> float:
        latency = r.latency_s if r.latency_s is not None else self.unknown_latency_s
        return latency + r.load * self.load_penalty_s
