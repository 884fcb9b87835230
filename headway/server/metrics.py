"""Prometheus metrics of one replica server, in a registry of its own (no globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    def __init__(self, model: str):
        self.registry = CollectorRegistry()
        labels = {"model": model}
        self.requests = Counter("headway_requests", "Requests by endpoint and HTTP status.",
                                ["model", "endpoint", "status"], registry=self.registry)
        self.latency = Histogram("headway_request_duration_seconds", "Request latency (to the last byte).",
                                 ["model", "endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("headway_in_flight", "Requests running now.", ["model"],
                               registry=self.registry).labels(**labels)
        self.queued = Gauge("headway_queued", "Requests waiting for a slot.", ["model"],
                            registry=self.registry).labels(**labels)
        self.ready = Gauge("headway_ready", "1 when the model is loaded and serving.", ["model"],
                           registry=self.registry).labels(**labels)
        self.model = model

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(self.model, endpoint, str(status)).inc()
        self.latency.labels(self.model, endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
