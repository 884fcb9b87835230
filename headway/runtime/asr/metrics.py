"""Prometheus metrics and the throughput figures of the ASR engine (what /metrics and
/headway/state report).

Owns the counters. Written by the engine's worker thread, read by the server (prometheus_client is
thread-safe; the window below is guarded by a lock). real_time_factor = compute seconds / audio
seconds (lower is faster; 0.05 means 20x real time); speed_x = its inverse.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

WINDOW_S = 60.0


class AsrMetrics:
    def __init__(self, model: str):
        r = self.registry = CollectorRegistry()
        m = ["model"]
        self.audio_seconds = Counter("headway_asr_audio_seconds", "Seconds of audio transcribed (whole requests).",
                                     m, registry=r).labels(model)
        self.speech_seconds = Counter("headway_asr_speech_seconds", "Seconds of speech decoded (after VAD).",
                                      m, registry=r).labels(model)
        self.compute_seconds = Counter("headway_asr_compute_seconds", "Worker seconds spent in the model.",
                                       m, registry=r).labels(model)
        self.rtf = Gauge("headway_asr_real_time_factor", "Compute seconds per audio second over the last minute "
                         "(lower is faster).", m, registry=r).labels(model)
        self.batch_size = Histogram("headway_asr_batch_size", "Chunks per model batch.", m,
                                    buckets=(1, 2, 4, 8, 16, 32), registry=r).labels(model)
        self.chunk_retries = Counter("headway_asr_chunk_retries", "Chunks retried alone after their batch failed.",
                                     m, registry=r).labels(model)
        self.requests = Counter("headway_asr_requests_finished", "Requests by outcome.", ["model", "outcome"],
                                registry=r)
        self.model = model
        self._lock = threading.Lock()
        self._window: deque[tuple[float, float, float]] = deque()   # (when, audio s, compute s)
        self.total_audio_s = 0.0
        self.total_compute_s = 0.0

    def batch(self, size: int, speech_s: float, compute_s: float) -> None:
        self.batch_size.observe(size)
        self.speech_seconds.inc(speech_s)
        self.compute_seconds.inc(compute_s)
        with self._lock:
            self.total_compute_s += compute_s
            self._window.append((time.monotonic(), 0.0, compute_s))

    def finished(self, audio_s: float, outcome: str) -> None:
        self.requests.labels(self.model, outcome).inc()
        if outcome == "ok":
            self.audio_seconds.inc(audio_s)
            with self._lock:
                self.total_audio_s += audio_s
                self._window.append((time.monotonic(), audio_s, 0.0))

    def figures(self) -> dict[str, float]:
        """Throughput over the last minute plus totals (the state endpoint's `asr` block)."""
        now = time.monotonic()
        with self._lock:
            while self._window and self._window[0][0] < now - WINDOW_S:
                self._window.popleft()
            audio = sum(a for _, a, _ in self._window)
            compute = sum(c for _, _, c in self._window)
            total_audio, total_compute = self.total_audio_s, self.total_compute_s
        rtf = compute / audio if audio > 0 else 0.0
        self.rtf.set(rtf)
        return {"audio_seconds_per_s": round(audio / WINDOW_S, 3), "real_time_factor": round(rtf, 4),
                "speed_x_realtime": round(audio / compute, 2) if compute > 0 else 0.0,
                "audio_seconds_total": round(total_audio, 3),
                "real_time_factor_total": round(total_compute / total_audio, 4) if total_audio else 0.0}

    def render(self) -> bytes:
        self.figures()
        return generate_latest(self.registry)
