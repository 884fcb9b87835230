"""Adapter-aware: prefer replicas with the request's adapter loaded; spread a hot adapter.

Holders of an adapter are the replicas that publish it plus those this policy sent it to in the
last `assign_ttl_s` (they are loading it). The least loaded holder wins while its load stays
under `hot_load`; once every holder is at or past `hot_load` and a non-holder is lighter by more
than `spread_margin`, the adapter spreads to that replica, which becomes a holder too.
"""

from __future__ import annotations

from collections.abc import Sequence

from headway.infra.router.policies.base import PolicyBase
from headway.infra.router.types import ReplicaId, ReplicaView, RouteRequest, require


class AdapterAware(PolicyBase):
    name = "adapter-aware"

    def __init__(self, seed: int = 0, hot_load: int = 4, spread_margin: int = 1, assign_ttl_s: float = 60.0):
        super().__init__(seed)
        if hot_load < 1 or spread_margin < 0 or assign_ttl_s <= 0:
            raise ValueError("hot_load must be >= 1, spread_margin >= 0 and assign_ttl_s > 0")
        self.hot_load = hot_load
        self.spread_margin = spread_margin
        self.assign_ttl_s = assign_ttl_s
        self._assigned: dict[str, dict[str, float]] = {}   # adapter -> replica -> when last sent there

    def holders(self, adapter: str, replicas: Sequence[ReplicaView], now: float) -> list[ReplicaView]:
        sent = self._assigned.get(adapter, {})
        return [r for r in replicas if adapter in r.adapters or now - sent.get(r.id, -1e18) < self.assign_ttl_s]

    def choose(self, req: RouteRequest, replicas: Sequence[ReplicaView], now: float) -> ReplicaId:
        require(replicas)
        if req.adapter is None:
            self.stats.note("no-adapter")
            return self.pick_min(replicas, lambda r: r.load).id
        holders = self.holders(req.adapter, replicas, now)
        if not holders:
            chosen = self.pick_min(replicas, lambda r: r.load)
            self.stats.note("load-adapter")
        else:
            chosen = self.pick_min(holders, lambda r: r.load)
            others = [r for r in replicas if r not in holders]
            lightest = min((r.load for r in others), default=None)
            if chosen.load >= self.hot_load and lightest is not None and lightest < chosen.load - self.spread_margin:
                chosen = self.pick_min(others, lambda r: r.load)
                self.stats.note("spread")
            else:
                self.stats.note("affinity")
        self._assigned.setdefault(req.adapter, {})[chosen.id] = now
        return chosen.id
