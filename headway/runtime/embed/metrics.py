"""Prometheus metrics of the embeddings engine (texts and tokens embedded, batches, queue)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

BATCH_TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)


class EmbedMetrics:
    """Written by the engine thread and the API, read by /metrics (prometheus_client is thread-safe)."""

    def __init__(self, model: str):
        r = self.registry = CollectorRegistry()
        m = ["model"]
        self.texts = Counter("headway_embed_texts", "Texts embedded.", m, registry=r).labels(model)
        self.tokens = Counter("headway_embed_tokens", "Tokens embedded (special tokens included).", m,
                              registry=r).labels(model)
        self.requests = Counter("headway_embed_requests_finished", "Embedding requests by outcome.",
                                ["model", "outcome"], registry=r)
        self.batches = Counter("headway_embed_batches", "Forward passes run.", m, registry=r).labels(model)
        self.urgent_batches = Counter("headway_embed_urgent_batches",
                                      "Forward passes of small requests run between two layers of a larger one.", m,
                                      registry=r).labels(model)
        self.batch_tokens = Histogram("headway_embed_batch_tokens", "Tokens per forward pass.", m,
                                      buckets=BATCH_TOKEN_BUCKETS, registry=r).labels(model)
        self.latency = Histogram("headway_embed_request_latency_seconds", "Arrival at the engine to all texts embedded.",
                                 m, buckets=LATENCY_BUCKETS, registry=r).labels(model)
        self.pending_tokens = Gauge("headway_embed_pending_tokens", "Tokens waiting for a forward pass.", m,
                                    registry=r).labels(model)
        self.tokens_per_s = Gauge("headway_embed_tokens_per_second", "Tokens embedded per second, recent.", m,
                                  registry=r).labels(model)

    def render(self) -> bytes:
        return generate_latest(self.registry)
