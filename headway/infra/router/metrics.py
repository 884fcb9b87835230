"""The router's Prometheus metrics: decisions, cache affinity, retries, in flight, added latency."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from headway.infra.router.replicas import ReplicaSet
from headway.infra.router.types import RoutingPolicy

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.decisions = Counter("headway_router_decisions", "Routing decisions, by policy and reason",
                                 ["deployment", "policy", "reason"], registry=r)
        self.requests = Counter("headway_router_requests", "Requests answered, by deployment and status",
                                ["deployment", "code"], registry=r)
        self.retries = Counter("headway_router_retries", "Attempts retried on another replica before "
                               "the first byte", ["deployment", "reason"], registry=r)
        self.rejected = Counter("headway_router_rejected", "Requests answered 503: no replica could take them",
                                ["deployment"], registry=r)
        self.stream_errors = Counter("headway_router_stream_errors", "Streams that broke after their first "
                                     "byte (ended with an error event)", ["deployment"], registry=r)
        self.added = Histogram("headway_router_added_latency_seconds", "Time the router adds before the "
                               "first byte (total minus the replica's own time)", buckets=_LATENCY_BUCKETS,
                               registry=r)
        self.in_flight = Gauge("headway_router_replica_in_flight", "Requests in flight per replica",
                               ["replica"], registry=r)
        self.healthy = Gauge("headway_router_replica_healthy", "1 if the replica is in rotation", ["replica"],
                             registry=r)
        self.affinity_rate = Gauge("headway_router_cache_affinity_rate", "Share of cache-aware decisions "
                                   "sent to a replica holding the prompt's prefix", ["deployment", "policy"],
                                   registry=r)
        self.queued = Gauge("headway_router_activator_queued", "Requests waiting in the activator for a "
                            "replica (scale from zero, or every replica at its limit)", ["deployment"], registry=r)
        self.activated = Counter("headway_router_activator_released", "Requests that waited in the activator, "
                                 "by how the wait ended (released, timeout, full, client_gone)", ["deployment", "outcome"], registry=r)

        self._children: dict[tuple[str, ...], Any] = {}
        self._shown: set[str] = set()

    def count_decision(self, deployment: str, policy: str, reason: str) -> None:
        """decisions{...}.inc() with the labelled child cached (the hot path calls this per request)."""
        key = ("d", deployment, policy, reason)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.decisions.labels(deployment, policy, reason)
        child.inc()

    def count_request(self, deployment: str, code: str) -> None:
        key = ("r", deployment, code)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.requests.labels(deployment, code)
        child.inc()

    def render(self, replicas: ReplicaSet, policies: dict[str, RoutingPolicy]) -> bytes:
        urls = {rep.url for rep in replicas.replicas}
        for gone in self._shown - urls:       # a replica the control plane removed leaves no stale series
            self.in_flight.remove(gone)
            self.healthy.remove(gone)
        self._shown = urls
        for rep in replicas.replicas:
            self.in_flight.labels(rep.url).set(rep.in_flight)
            self.healthy.labels(rep.url).set(1 if rep.usable() else 0)
        for dep, policy in policies.items():
            reasons = policy.stats.reasons
            scored = reasons.get("affinity", 0) + reasons.get("spread", 0) + reasons.get("load", 0) \
                + reasons.get("balance", 0)
            if policy.name in ("cache-aware", "predicted-latency"):
                self.affinity_rate.labels(dep, policy.name).set(reasons.get("affinity", 0) / scored if scored else 0)
        return generate_latest(self.registry)
