"""Least-load by the power of two choices: sample two replicas, take the one with less in flight."""

from __future__ import annotations

from collections.abc import Sequence

from headway.infra.router.policies.base import PolicyBase
from headway.infra.router.types import ReplicaId, ReplicaView, RouteRequest, require


class LeastLoad(PolicyBase):
    name = "least-load"

    def choose(self, req: RouteRequest, replicas: Sequence[ReplicaView], now: float) -> ReplicaId:
        require(replicas)
        if len(replicas) == 1:
            self.stats.note("only")
            return replicas[0].id
        a, b = self.rng.sample(list(replicas), 2)
        self.stats.note("p2c")
        if a.load == b.load:
            return self.rng.choice((a, b)).id
        return a.id if a.load < b.load else b.id
