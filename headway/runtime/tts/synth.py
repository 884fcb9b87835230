"""The voice and its worker thread: sentences in, 16-bit samples out, off the event loop.

`Synthesizer` owns the Piper voice (one ONNX session, threads sized from the replica's CPU
share) and one worker thread. Each request is a `Job`: sentences are appended to it as they are
known (all at once for HTTP, one by one for the WebSocket), and its audio comes back on an
asyncio queue, one item per sentence. The worker synthesizes one sentence at a time, always for
the job whose listener runs out of audio first (`next_job`): a job with no audio yet is due
since it arrived; a playing job is due when the audio it has received ends, counted from its
first audio. So a short request is not stuck behind a long paragraph, and a long one keeps
ahead of playback.

Invariants (under `_lock`): every job in `_jobs` is open (not cancelled, not finished);
`pending_sentences` equals the sentences queued over the jobs in `_jobs`; a cancelled job gets
no more audio and its sentences leave the queue at once.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from headway.runtime.host import cpu_share

log = logging.getLogger("headway.tts")

_END = None   # the item that ends a job's audio queue
_CONTROL = {c: " " for c in [*range(0, 32), 127]}


def default_threads() -> int:
    """Threads for the ONNX session: OMP_NUM_THREADS (what the fleet sets from a replica's CPU
    share), else the CPUs this process may use, at most 4 (Piper gains little past that)."""
    return max(1, min(4, cpu_share()))


@dataclass(eq=False)
class Job:
    """One request's sentences and audio. Created by Synthesizer.open(); the event loop side
    calls add/end/cancel and iterates audio(); the worker fills `_queue`."""

    id: int
    speed: float
    arrived: float
    loop: asyncio.AbstractEventLoop
    _owner: Synthesizer
    sentences: deque[str] = field(default_factory=deque)
    ended: bool = False
    cancelled: bool = False
    first_audio: float | None = None      # worker clock, when its first sentence was done
    audio_s: float = 0.0                  # audio delivered so far
    characters: int = 0
    _queue: asyncio.Queue[np.ndarray | BaseException | None] = field(default_factory=asyncio.Queue)

    def due(self) -> float:
        """When its listener runs out of audio (the worker serves the earliest first)."""
        return self.arrived if self.first_audio is None else self.first_audio + self.audio_s

    def add(self, sentences: Iterable[str]) -> None:
        self._owner._add(self, list(sentences))

    def end(self) -> None:
        """No more sentences: the audio ends after the ones queued."""
        self._owner._end(self)

    def cancel(self) -> None:
        """Drop what is queued; the worker stops for this job after at most the sentence in hand."""
        self._owner._cancel(self)

    async def audio(self) -> AsyncIterator[np.ndarray]:
        """The samples of each sentence, in order, until end() and the last sentence are done."""
        while True:
            item = await self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


def _post(job: Job, item: np.ndarray | BaseException | None) -> None:
    """Hand `item` to the job's event loop (a loop already closed has no listener left)."""
    try:
        job.loop.call_soon_threadsafe(job._queue.put_nowait, item)
    except RuntimeError:
        pass


def next_job(jobs: Iterable[Job]) -> Job | None:
    """The job to synthesize a sentence for next: the earliest due among those with sentences."""
    ready = [j for j in jobs if j.sentences]
    return min(ready, key=lambda j: (j.due(), j.id)) if ready else None


class Synthesizer:
    def __init__(self, model_dir: Path, threads: int | None = None, clock: Callable[[], float] = time.monotonic):
        import onnxruntime as ort
        from piper.config import PiperConfig
        from piper.voice import PiperVoice

        # piper logs the text it speaks at debug level: text is payload, never logged
        logging.getLogger("piper").setLevel(logging.WARNING)
        onnx = next(iter(sorted(model_dir.glob("*.onnx"))), None)
        if onnx is None:
            raise FileNotFoundError(f"no Piper voice (*.onnx) in {model_dir}")
        config = json.loads(Path(f"{onnx}.json").read_text())
        self.threads = threads or default_threads()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        # no busy-waiting between runs: the event loop needs the CPU to send the audio just made
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(onnx), sess_options=opts, providers=["CPUExecutionProvider"])
        self.voice = PiperVoice(config=PiperConfig.from_dict(config), session=session)
        self.voice_name = onnx.stem                       # en_US-joe-medium
        self.sample_rate = int(self.voice.config.sample_rate)
        self.clock = clock
        self._lock = threading.Condition()
        self._jobs: list[Job] = []
        self._ids = itertools.count(1)
        self._stopping = False
        self.failure: str | None = None
        # figures (written by the worker under _lock, read by state/metrics)
        self.characters = 0
        self.sentences = 0
        self.audio_s = 0.0
        self.busy_s = 0.0
        self.cancelled = 0     # requests whose client left (or that ended) with sentences still queued
        self.failed = 0        # requests ended by a sentence that could not be synthesized
        self.on_sentence: Callable[[int, float, float], None] = lambda chars, audio_s, busy_s: None
        self._thread = threading.Thread(target=self._run, name="headway-tts", daemon=True)
        self._thread.start()

    # -- the event loop side
    def open(self, speed: float = 1.0) -> Job:
        job = Job(next(self._ids), speed, self.clock(), asyncio.get_running_loop(), self)
        with self._lock:
            self._jobs.append(job)
        return job

    def _add(self, job: Job, sentences: list[str]) -> None:
        with self._lock:
            if job.cancelled or job.ended:
                return
            job.sentences.extend(s for s in sentences if s.strip())
            self._lock.notify()

    def _end(self, job: Job) -> None:
        with self._lock:
            job.ended = True
            if not job.sentences and job in self._jobs:   # nothing left: the audio ends now
                self._jobs.remove(job)
                _post(job, _END)

    def _cancel(self, job: Job) -> None:
        with self._lock:
            if job in self._jobs:
                self._jobs.remove(job)
                self.cancelled += 1
            job.cancelled = True
            job.sentences.clear()

    @property
    def active(self) -> int:
        return len(self._jobs)

    @property
    def pending_sentences(self) -> int:
        with self._lock:
            return sum(len(j.sentences) for j in self._jobs)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        self._thread.join(timeout=10)

    def speak(self, text: str, speed: float = 1.0) -> np.ndarray:
        """The samples of one sentence (int16), on the calling thread."""
        from piper.config import SynthesisConfig

        length = (self.voice.config.length_scale or 1.0) / speed
        text = text.translate(_CONTROL)      # espeak refuses a NUL; no control character is spoken
        chunks = [c.audio_int16_array for c in self.voice.synthesize(text, SynthesisConfig(length_scale=length))]
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)

    # -- the worker
    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    job = next_job(self._jobs)
                    while job is None and not self._stopping:
                        self._lock.wait()
                        job = next_job(self._jobs)
                    if self._stopping:
                        return
                    assert job is not None
                    sentence = job.sentences.popleft()
                started = self.clock()
                try:
                    samples = self.speak(sentence, job.speed)
                except Exception as exc:   # this sentence cannot be spoken: its request fails, not the worker
                    log.warning("a sentence could not be synthesized (%s); its request ends with an error",
                                type(exc).__name__)
                    with self._lock:
                        if job in self._jobs:
                            self._jobs.remove(job)
                        job.cancelled = True
                        job.sentences.clear()
                        self.failed += 1
                    _post(job, RuntimeError(f"speech synthesis failed: {type(exc).__name__}"))
                    continue
                took = self.clock() - started
                self._deliver(job, sentence, samples, took)
        except BaseException as exc:   # the worker died: every open job gets the error
            self.failure = f"{type(exc).__name__}: {exc}"
            log.error("the synthesis worker failed: %s", type(exc).__name__)
            with self._lock:
                for j in self._jobs:
                    _post(j, RuntimeError("speech synthesis failed"))
                self._jobs.clear()

    def _deliver(self, job: Job, sentence: str, samples: np.ndarray, took: float) -> None:
        seconds = len(samples) / self.sample_rate
        with self._lock:
            self.characters += len(sentence)
            self.sentences += 1
            self.audio_s += seconds
            self.busy_s += took
            if job.cancelled:
                return
            if job.first_audio is None:
                job.first_audio = self.clock()
            job.audio_s += seconds
            job.characters += len(sentence)
            _post(job, samples)
            if job.ended and not job.sentences:
                self._jobs.remove(job)
                _post(job, _END)
        self.on_sentence(len(sentence), seconds, took)

    def figures(self) -> dict[str, Any]:
        """Throughput measured so far: characters and audio seconds per second of synthesis."""
        busy = self.busy_s or float("nan")
        return {"chars_per_s": round(self.characters / busy, 1) if self.busy_s else None,
                "audio_s_per_s": round(self.audio_s / busy, 2) if self.busy_s else None,
                "characters": self.characters, "sentences": self.sentences, "audio_s": round(self.audio_s, 2),
                "busy_s": round(self.busy_s, 2), "cancelled": self.cancelled,
                "failed": self.failed}
