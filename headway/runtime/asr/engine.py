"""The ASR engine: one worker thread that owns the Whisper model and batches chunks from every
request in flight.

Owns the pending-chunk queue and the model. Invariants: only the worker thread calls the model;
a batch holds chunks with one DecodeOptions key (the oldest pending chunk's), taken in arrival
order, at most `max_batch_size`; a batch that raises is split and each chunk retried alone, and
only a chunk that fails alone fails its request; a cancelled job's chunks leave the queue at once
and are never decoded; every job gets exactly one outcome per chunk (result or error) unless it
was cancelled. Audio and text never reach a log.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from headway.runtime.asr.chunks import Chunk
from headway.runtime.asr.decode import ChunkResult, DecodeOptions, decode_batch
from headway.runtime.asr.metrics import AsrMetrics
from headway.runtime.host import cpu_share

log = logging.getLogger("headway.asr")




class ChunkFailed(RuntimeError):
    """A chunk failed even when decoded alone."""


@dataclass(eq=False)
class Job:
    """One request's chunks on their way through the engine."""

    chunks: list[Chunk]
    opts: DecodeOptions
    language: str | None
    audio_seconds: float
    loop: asyncio.AbstractEventLoop
    done: asyncio.Queue[tuple[int, ChunkResult | BaseException]] = field(default_factory=asyncio.Queue)
    cancelled: bool = False

    def deliver(self, index: int, outcome: ChunkResult | BaseException) -> None:
        """Called from the worker thread."""
        if not self.cancelled:
            self.loop.call_soon_threadsafe(self.done.put_nowait, (index, outcome))

    async def results(self) -> AsyncIterator[tuple[Chunk, ChunkResult]]:
        """Chunk results in chunk order, each as soon as every earlier one is in."""
        got: dict[int, ChunkResult] = {}
        for nxt in range(len(self.chunks)):
            while nxt not in got:
                index, outcome = await self.done.get()
                if isinstance(outcome, BaseException):
                    raise outcome
                got[index] = outcome
            yield self.chunks[nxt], got.pop(nxt)


@dataclass(eq=False)
class _Item:
    job: Job
    chunk: Chunk


class AsrEngine:
    def __init__(self, model_dir: Path, *, compute_type: str = "int8", num_threads: int | None = None,
                 max_batch_size: int = 8, beam_size: int = 1, model_name: str = "whisper"):
        self.model_dir = model_dir
        self.compute_type = compute_type
        self.num_threads = num_threads or cpu_share()
        self.max_batch_size = max_batch_size
        self.beam_size = beam_size
        self.metrics = AsrMetrics(model_name)
        self.model: Any = None
        self.failure: str | None = None
        self.fail_next_batch = False           # tests: the next batch of > 1 chunk raises once
        self._pending: list[_Item] = []
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._fault = False

    def start(self) -> None:
        """Load the model (blocking) and start the worker thread."""
        from faster_whisper import WhisperModel

        self.model = WhisperModel(str(self.model_dir), device="cpu", compute_type=self.compute_type,
                                  cpu_threads=self.num_threads, num_workers=1)
        from faster_whisper.vad import get_vad_model

        get_vad_model()   # load Silero once, before the first request
        self._thread = threading.Thread(target=self._run, name="headway-asr-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def inject_fault(self) -> None:
        with self._cv:
            self._fault = True
            self._cv.notify_all()

    # ---- the request side (event loop) -----------------------------------------------------

    def submit(self, chunks: list[Chunk], opts: DecodeOptions, language: str | None, audio_seconds: float) -> Job:
        job = Job(chunks, opts, language, audio_seconds, asyncio.get_running_loop())
        with self._cv:
            self._pending.extend(_Item(job, c) for c in chunks)
            self._cv.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Drop a job's chunks that are still waiting; a batch already running finishes unseen."""
        with self._cv:
            job.cancelled = True
            self._pending = [it for it in self._pending if it.job is not job]

    def pending_chunks(self) -> int:
        with self._cv:
            return len(self._pending)

    # ---- the worker thread ----------------------------------------------------------------

    def _take(self) -> list[_Item] | None:
        with self._cv:
            while not self._pending and not self._stop and not self._fault:
                self._cv.wait()
            if self._fault:
                raise RuntimeError("injected fault: the ASR worker thread stopped")
            if self._stop:
                return None
            key = self._pending[0].job.opts
            batch = [it for it in self._pending if it.job.opts == key][: self.max_batch_size]
            taken = set(map(id, batch))
            self._pending = [it for it in self._pending if id(it) not in taken]
            return batch

    def _decode(self, batch: list[_Item]) -> list[ChunkResult]:
        if self.fail_next_batch and len(batch) > 1:
            self.fail_next_batch = False
            raise RuntimeError("injected batch failure (tests)")
        started = time.perf_counter()
        out = decode_batch(self.model, [it.chunk.samples for it in batch], [it.job.language for it in batch],
                           batch[0].job.opts)
        self.metrics.batch(len(batch), sum(it.chunk.seconds for it in batch), time.perf_counter() - started)
        return out

    def _run(self) -> None:
        try:
            while (batch := self._take()) is not None:
                try:
                    results = self._decode(batch)
                except Exception as exc:
                    if len(batch) == 1:
                        batch[0].job.deliver(batch[0].chunk.index, ChunkFailed(f"{type(exc).__name__}: {exc}"))
                        continue
                    log.warning("a batch of %d chunks failed (%s); retrying each chunk alone", len(batch),
                                type(exc).__name__)
                    for it in batch:
                        self.metrics.chunk_retries.inc()
                        try:
                            it.job.deliver(it.chunk.index, self._decode([it])[0])
                        except Exception as one:
                            it.job.deliver(it.chunk.index, ChunkFailed(f"{type(one).__name__}: {one}"))
                    continue
                for it, res in zip(batch, results):
                    it.job.deliver(it.chunk.index, res)
        except BaseException as exc:  # the engine is out of service; the server reports it
            self.failure = f"{type(exc).__name__}: {exc}"
            log.error("ASR worker thread died: %s", self.failure)
            with self._cv:
                for it in self._pending:
                    it.job.deliver(it.chunk.index, ChunkFailed(self.failure))
                self._pending.clear()

    def state(self) -> dict[str, Any]:
        """Throughput at the top level (what a router or autoscaler compares across replicas) and
        the details in an `asr` block."""
        figures = self.metrics.figures()
        return {"audio_seconds_per_s": figures["audio_seconds_per_s"], "real_time_factor": figures["real_time_factor"],
                "asr": {**figures, "pending_chunks": self.pending_chunks(), "max_batch_size": self.max_batch_size,
                        "num_threads": self.num_threads, "compute_type": self.compute_type,
                        "beam_size": self.beam_size}}
