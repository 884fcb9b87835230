"""The ASR engine in process with the real whisper-base: a batch that fails is retried chunk by
chunk, results come back in order, a cancelled job's chunks never run, a dead worker fails the
waiting jobs and reports the failure."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Iterator

import pytest

from headway.bench.speech import have_espeak, recording, wer

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("faster_whisper") is None, reason="needs faster-whisper"),
              pytest.mark.skipif(not have_espeak(), reason="needs espeak-ng (scripts/setup installs it)")]


@pytest.fixture(scope="module")
def engine() -> Iterator[object]:
    from headway.library import resolve
    from headway.runtime.asr.engine import AsrEngine

    e = AsrEngine(resolve("whisper-base").path, num_threads=2, max_batch_size=4, beam_size=1)
    e.start()
    yield e
    e.stop()


@pytest.fixture(scope="module")
def long_audio() -> tuple[object, str]:
    return recording(100, pause_s=0.7)


def run(engine: object, audio: object, **kw: object) -> str:
    from headway.runtime.asr.chunks import split
    from headway.runtime.asr.decode import DecodeOptions
    from headway.runtime.asr.formats import Transcript

    async def go() -> str:
        chunks = split(audio)  # type: ignore[arg-type]
        assert len(chunks) >= 3
        job = engine.submit(chunks, DecodeOptions(beam_size=1, **kw), "en", 100.0)  # type: ignore[attr-defined]
        t = Transcript(duration=100.0)
        order = []
        async for chunk, result in job.results():
            order.append(chunk.index)
            t.add(chunk, result)
        assert order == list(range(len(chunks)))
        return t.text

    return asyncio.run(go())


def test_a_failed_batch_is_retried_chunk_by_chunk(engine: object, long_audio: tuple[object, str]) -> None:
    audio, text = long_audio
    retries = engine.metrics.chunk_retries._value.get()  # type: ignore[attr-defined]
    engine.fail_next_batch = True  # type: ignore[attr-defined]
    got = run(engine, audio)
    assert not engine.fail_next_batch  # type: ignore[attr-defined]
    assert engine.metrics.chunk_retries._value.get() - retries >= 2  # type: ignore[attr-defined]
    assert wer(text, got) < 0.2 and engine.failure is None  # type: ignore[attr-defined]


def test_a_cancelled_job_leaves_the_queue(engine: object, long_audio: tuple[object, str]) -> None:
    from headway.runtime.asr.chunks import split
    from headway.runtime.asr.decode import DecodeOptions

    audio, _ = long_audio

    async def go() -> None:
        chunks = split(audio)  # type: ignore[arg-type]
        jobs = [engine.submit(chunks, DecodeOptions(beam_size=1), "en", 100.0) for _ in range(3)]  # type: ignore[attr-defined]
        engine.cancel(jobs[1])  # type: ignore[attr-defined]
        engine.cancel(jobs[2])  # type: ignore[attr-defined]
        async for _ in jobs[0].results():
            pass
        assert engine.pending_chunks() == 0  # type: ignore[attr-defined]
        assert jobs[1].done.empty() and jobs[2].done.empty()

    asyncio.run(go())


def test_word_times_are_sorted_and_within_the_recording(engine: object, long_audio: tuple[object, str]) -> None:
    from headway.runtime.asr.chunks import split
    from headway.runtime.asr.decode import DecodeOptions
    from headway.runtime.asr.formats import Transcript

    audio, _ = long_audio

    async def go() -> Transcript:
        chunks = split(audio)  # type: ignore[arg-type]
        job = engine.submit(chunks, DecodeOptions(beam_size=1, word_timestamps=True), None, 100.0)  # type: ignore[attr-defined]
        t = Transcript(duration=audio.size / 16000)  # type: ignore[attr-defined]
        async for chunk, result in job.results():
            t.add(chunk, result)
        return t

    t = asyncio.run(go())
    starts = [w["start"] for w in t.words]
    assert starts == sorted(starts) and t.words[-1]["end"] <= t.duration + 0.01 and t.language == "en"
    assert len(t.segments) >= 10      # cut at sentence ends
