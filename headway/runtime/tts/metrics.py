"""Prometheus metrics of the TTS runtime, in a registry of its own (no globals): characters
synthesized, audio produced, synthesis time, time to first audio byte, requests by endpoint."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

TTFA_BUCKETS = (0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 4, 8, 16)


class TTSMetrics:
    """Written by the worker thread and the event loop (prometheus_client is thread-safe)."""

    def __init__(self, model: str):
        r = self.registry = CollectorRegistry()
        m = ["model"]
        self.characters = Counter("headway_tts_characters", "Characters synthesized.", m, registry=r).labels(model)
        self.sentences = Counter("headway_tts_sentences", "Sentences synthesized.", m, registry=r).labels(model)
        self.audio_seconds = Counter("headway_tts_audio_seconds", "Seconds of audio produced.", m,
                                     registry=r).labels(model)
        self.synthesis_seconds = Counter("headway_tts_synthesis_seconds", "Seconds the worker spent synthesizing.",
                                         m, registry=r).labels(model)
        self.first_audio = Histogram("headway_tts_time_to_first_audio_seconds",
                                     "Request arrival (HTTP) or a sentence's completion (WebSocket) to its first "
                                     "audio byte sent.", ["model", "endpoint"], buckets=TTFA_BUCKETS, registry=r)
        self.requests = Counter("headway_tts_requests", "Speech requests by endpoint and outcome.",
                                ["model", "endpoint", "outcome"], registry=r)
        self.active = Gauge("headway_tts_active_jobs", "Requests with audio being synthesized.", m,
                            registry=r).labels(model)
        self.model = model

    def sentence(self, chars: int, audio_s: float, busy_s: float) -> None:
        self.characters.inc(chars)
        self.sentences.inc()
        self.audio_seconds.inc(audio_s)
        self.synthesis_seconds.inc(busy_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
