"""Routing policies by name; each is a pure object (see types.RoutingPolicy)."""

from __future__ import annotations

from typing import Any

from headway.infra.router.policies.adapter_aware import AdapterAware
from headway.infra.router.policies.cache_aware import CacheAware
from headway.infra.router.policies.geo import GeoAware
from headway.infra.router.policies.least_load import LeastLoad
from headway.infra.router.policies.predicted_latency import PredictedLatency
from headway.infra.router.policies.round_robin import RoundRobin
from headway.infra.router.types import RoutingPolicy

POLICIES: dict[str, type] = {
    "round-robin": RoundRobin,
    "least-load": LeastLoad,
    "cache-aware": CacheAware,
    "adapter-aware": AdapterAware,
    "geo": GeoAware,
    "predicted-latency": PredictedLatency,
}

LLM_DEFAULT = "predicted-latency"
OTHER_DEFAULT = "least-load"


def make_policy(name: str, seed: int = 0, **options: Any) -> RoutingPolicy:
    """A new policy object by its command-line name."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown routing policy '{name}'; choose one of: {', '.join(POLICIES)}") from None
    policy: RoutingPolicy = cls(seed=seed, **options)
    return policy


__all__ = ["POLICIES", "LLM_DEFAULT", "OTHER_DEFAULT", "make_policy", "AdapterAware", "CacheAware",
           "GeoAware", "LeastLoad", "PredictedLatency", "RoundRobin"]
