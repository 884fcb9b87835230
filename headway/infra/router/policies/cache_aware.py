"""Cache-aware: send a prompt where its prefix was sent before, unless load is imbalanced.

SGLang's rule: if the busiest and idlest candidates differ by more than `balance_abs` requests
and by a factor over `balance_rel`, route by load; else take the replica holding the longest
prefix when it covers at least `cache_threshold` of the prompt; else spread to the least loaded.
"""

from __future__ import annotations

from collections.abc import Sequence

from headway.infra.router.policies.affinity import PrefixAffinity
from headway.infra.router.policies.base import PolicyBase
from headway.infra.router.types import ReplicaId, ReplicaView, RouteEvent, RouteRequest, require


class CacheAware(PolicyBase):
    name = "cache-aware"

    def __init__(self, seed: int = 0, cache_threshold: float = 0.5, balance_abs: int = 8,
                 balance_rel: float = 1.5, chars_per_token: float = 4.0):
        super().__init__(seed)
        if not 0.0 <= cache_threshold <= 1.0:
            raise ValueError(f"cache_threshold must be within [0, 1], got {cache_threshold}")
        self.cache_threshold = cache_threshold
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self.affinity = PrefixAffinity(chars_per_token)

    def choose(self, req: RouteRequest, replicas: Sequence[ReplicaView], now: float) -> ReplicaId:
        require(replicas)
        loads = [r.load for r in replicas]
        if max(loads) - min(loads) > self.balance_abs and max(loads) > self.balance_rel * min(loads):
            self.stats.note("balance")
            return self.pick_min(replicas, lambda r: r.load).id
        matched = self.affinity.matched_tokens(req, replicas)
        total = max(1, self.affinity.prompt_tokens(req))
        best = max(matched.values())
        if best > 0 and best / total >= self.cache_threshold:
            holders = [r for r in replicas if matched[r.id] == best]
            self.stats.note("affinity")
            return self.pick_min(holders, lambda r: r.load).id
        self.stats.note("spread")
        return self.pick_min(replicas, lambda r: r.load).id

    def observe(self, event: RouteEvent) -> None:
        if event.kind == "started":
            self.affinity.record(event.request, event.replica, event.at)

    def forget(self, replica: ReplicaId) -> None:
        self.affinity.forget(replica)
