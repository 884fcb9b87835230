"""Round-robin: each eligible replica in turn, in id order."""

from __future__ import annotations

from collections.abc import Sequence

from headway.infra.router.policies.base import PolicyBase
from headway.infra.router.types import ReplicaId, ReplicaView, RouteRequest, require


class RoundRobin(PolicyBase):
    name = "round-robin"

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        self._next: dict[str, int] = {}   # per deployment: the turn counter

    def choose(self, req: RouteRequest, replicas: Sequence[ReplicaView], now: float) -> ReplicaId:
        require(replicas)
        ordered = sorted(replicas, key=lambda r: r.id)
        turn = self._next.get(req.deployment, 0)
        self._next[req.deployment] = turn + 1
        self.stats.note("turn")
        return ordered[turn % len(ordered)].id
