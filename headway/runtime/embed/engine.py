"""The embeddings engine: a scheduler thread that packs texts from many requests into forward
passes under a token budget, and hands each request its vectors back on the asyncio loop.

Owns the encoder and the batcher; only its thread touches the encoder, and the batcher only under
`self._lock`. Requests arrive tokenized (the API tokenizes in the request's coroutine). Each pass
runs layer by layer; between two layers, small requests that have not started yet (at most
`urgent_tokens` tokens) run as a pass of their own, so a single sentence waits for one layer of a
large batch, not for the whole of it. A cancelled request (client gone) leaves the batcher at once;
its texts already in a pass finish and are dropped.

Invariant: a job's future is resolved exactly once (vectors, or an error), unless it was cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from headway.runtime.embed.batcher import Batcher, Item, Job
from headway.runtime.embed.encoder import BertEncoder
from headway.runtime.embed.metrics import EmbedMetrics
from headway.runtime.embed.spec import EncoderSpec

log = logging.getLogger("headway.embed")


@dataclass(eq=False)
class Request:
    job: Job
    future: asyncio.Future[np.ndarray]
    loop: asyncio.AbstractEventLoop
    out: np.ndarray = field(init=False)
    remaining: int = field(init=False)
    arrived: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.remaining = len(self.job.texts)


def _resolve(fut: asyncio.Future[np.ndarray], value: np.ndarray | None, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)   # type: ignore[arg-type]


class EmbedEngine:
    def __init__(self, spec: EncoderSpec, *, dtype: torch.dtype = torch.float32, max_batch_tokens: int = 2048,
                 urgent_tokens: int = 512, num_threads: int | None = None, model_name: str = "model"):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.spec = spec
        self.encoder = BertEncoder(spec, dtype)
        self.max_batch_tokens = max(max_batch_tokens, spec.max_tokens)
        self.urgent_tokens = urgent_tokens
        self.model_name = model_name
        self.metrics = EmbedMetrics(model_name)
        self._batcher = Batcher(self.max_batch_tokens)
        self._requests: dict[int, Request] = {}    # id(job) -> request
        self._lock = threading.Condition()
        self._stop = False
        self._rate: list[tuple[float, int, int, float]] = []   # (end time, texts, tokens, forward s) per pass
        self._thread = threading.Thread(target=self._loop, name="headway-embed", daemon=True)
        self._thread.start()

    # ---- asyncio side ------------------------------------------------------------------------

    async def embed(self, texts: list[list[int]]) -> np.ndarray:
        """Pooled, unnormalized float32 vectors [len(texts), dim] for tokenized texts; cancelling
        the awaiting task drops the request's remaining work."""
        loop = asyncio.get_running_loop()
        req = Request(Job(texts), loop.create_future(), loop)
        req.out = np.empty((len(texts), self.spec.dimensions), dtype=np.float32)
        with self._lock:
            self._requests[id(req.job)] = req
            self._batcher.add(req.job)
            self._lock.notify()
        try:
            result = await req.future
        except asyncio.CancelledError:
            self._cancel(req)
            raise
        self.metrics.requests.labels(self.model_name, "ok").inc()
        return result

    def _cancel(self, req: Request) -> None:
        with self._lock:
            self._batcher.cancel(req.job)
            self._requests.pop(id(req.job), None)
        self.metrics.requests.labels(self.model_name, "cancelled").inc()

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        self._thread.join(timeout=10)

    def alive(self) -> bool:
        return self._thread.is_alive() or self._stop

    def state(self) -> dict[str, Any]:
        """The engine's block of /headway/state (the server publishes in_flight and queued from
        its admission; `requests` here are those inside the engine, `waiting` none of whose texts
        has started)."""
        with self._lock:
            requests, waiting, pending = len(self._requests), self._batcher.queued_jobs, self._batcher.pending_tokens
        texts_s, tokens_s = self.throughput()
        return {"embed": {"texts_per_s": round(texts_s, 1), "tokens_per_s": round(tokens_s, 1),
                          "requests": requests, "waiting": waiting,
                          "pending_tokens": pending, "max_batch_tokens": self.max_batch_tokens,
                          "max_input_tokens": self.spec.max_tokens, "dimensions": self.spec.dimensions}}

    def throughput(self, window_s: float = 30.0) -> tuple[float, float]:
        """Texts and tokens per second of forward time (the replica's capacity, not its load),
        over the passes of the last `window_s` seconds."""
        now = time.perf_counter()
        recent = [r for r in list(self._rate) if now - r[0] <= window_s]
        busy = sum(r[3] for r in recent)
        if busy <= 0:
            return 0.0, 0.0
        return sum(r[1] for r in recent) / busy, sum(r[2] for r in recent) / busy

    # ---- engine thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not self._stop and not self._batcher.jobs:
                        self._lock.wait()
                    if self._stop:
                        break
                    # small requests first (they wait for no pass), then a round-robin batch
                    urgent = self.urgent_tokens > 0 and self._batcher.has_urgent(self.urgent_tokens)
                    batch = self._batcher.next_batch(urgent_tokens=self.urgent_tokens if urgent else None)
                try:
                    self._run(batch, urgent=urgent)
                except Exception as exc:   # a failed pass fails its requests, never the engine
                    log.exception("forward pass failed")
                    self._fail(batch, exc)
        with self._lock:
            for req in self._requests.values():
                req.loop.call_soon_threadsafe(_resolve, req.future, None, RuntimeError("the engine stopped"))
            self._requests.clear()

    def _run(self, batch: list[Item], urgent: bool) -> float:
        """One pass; returns the seconds spent on urgent passes run inside it."""
        started, nested = time.perf_counter(), 0.0
        run = self.encoder.start([it.ids for it in batch])
        while not self.encoder.step(run):
            if urgent or self.urgent_tokens <= 0:
                continue
            with self._lock:
                small = (self._batcher.next_batch(urgent_tokens=self.urgent_tokens)
                         if self._batcher.has_urgent(self.urgent_tokens) else [])
            if small:
                self.metrics.urgent_batches.inc()
                t = time.perf_counter()
                try:
                    self._run(small, urgent=True)
                except Exception as exc:
                    log.exception("forward pass failed")
                    self._fail(small, exc)
                nested += time.perf_counter() - t
        vectors = self.encoder.finish(run).numpy()
        self._deliver(batch, vectors, time.perf_counter() - started - nested)
        return nested

    def _deliver(self, batch: list[Item], vectors: np.ndarray, seconds: float) -> None:
        tokens = sum(len(it.ids) for it in batch)
        now = time.perf_counter()
        self._rate.append((now, len(batch), tokens, seconds))
        if len(self._rate) > 512:
            del self._rate[:256]
        self.metrics.batches.inc()
        self.metrics.batch_tokens.observe(tokens)
        self.metrics.texts.inc(len(batch))
        self.metrics.tokens.inc(tokens)
        with self._lock:
            for it, vec in zip(batch, vectors):
                req = self._requests.get(id(it.job))
                if req is None:
                    continue             # cancelled while in the pass
                req.out[it.index] = vec
                req.remaining -= 1
                if req.remaining == 0:
                    del self._requests[id(it.job)]
                    self.metrics.latency.observe(now - req.arrived)
                    req.loop.call_soon_threadsafe(_resolve, req.future, req.out, None)
            self.metrics.pending_tokens.set(self._batcher.pending_tokens)
        self.metrics.tokens_per_s.set(round(self.throughput()[1], 1))

    def _fail(self, batch: list[Item], exc: Exception) -> None:
        with self._lock:
            for job in {it.job for it in batch}:
                req = self._requests.pop(id(job), None)
                if req is not None:
                    self._batcher.cancel(job)
                    req.loop.call_soon_threadsafe(_resolve, req.future, None, RuntimeError(f"forward pass failed: {exc}"))
