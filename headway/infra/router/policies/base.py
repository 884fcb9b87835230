"""Helpers every policy shares: seeded random tie-breaking among the best candidates."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from headway.infra.router.types import DecisionStats, ReplicaId, ReplicaView, RouteEvent


class PolicyBase:
    """Seeded randomness and decision statistics; observe() ignores events unless overridden."""

    name = "base"

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)
        self.stats = DecisionStats()

    def observe(self, event: RouteEvent) -> None:
        return None

    def forget(self, replica: ReplicaId) -> None:
        """`replica` left the router's replica set; drop what this policy keeps about it."""
        return None

    def pick_min(self, replicas: Sequence[ReplicaView], key: Callable[[ReplicaView], float],
                 tolerance: float = 1e-9) -> ReplicaView:
        """The replica with the smallest key; ties (within `tolerance`) broken at random."""
        best = min(key(r) for r in replicas)
        tied = [r for r in replicas if key(r) <= best + tolerance]
        return tied[0] if len(tied) == 1 else self.rng.choice(tied)
