"""Speech with a known transcript, for ASR tests and benchmarks: sentences synthesized with
espeak-ng (deterministic for a given espeak-ng version), joined with pauses into recordings of
any length, and word error rate.

Owns nothing between calls. Invariant: `recording(seconds)` is the same samples every call on
one machine (fixed sentence order, fixed pauses, no randomness).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, cast

import numpy as np

SAMPLE_RATE = 16000

SENTENCES: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Every morning the baker opens the shop and sells fresh bread to the neighbours.",
    "Rain is expected in the northern hills later this week.",
    "Please remember to close the windows before you leave the office.",
    "The train to the city leaves from platform four at nine o'clock.",
    "She planted tomatoes and beans in the garden behind the house.",
    "Our team finished the project two days ahead of schedule.",
    "The museum is open every day except on public holidays.",
    "He poured a cup of hot coffee and read the morning paper.",
    "The children played football in the park until it got dark.",
    "A strong wind blew the leaves across the empty street.",
    "The doctor told him to drink more water and sleep longer.",
    "We watched the sun set slowly behind the mountains.",
    "The library has thousands of books about history and science.",
    "My sister bought a new bicycle for her trip to the coast.",
    "The meeting was moved to the large room on the second floor.",
    "Fresh fruit and vegetables are sold at the market on Saturday.",
    "The pilot announced that the plane would land in twenty minutes.",
    "Turn left at the bridge and follow the river to the old mill.",
    "The students asked the teacher many questions about the experiment.",
)


def have_espeak() -> bool:
    return shutil.which("espeak-ng") is not None


def synthesize(text: str, *, voice: str = "en-us", speed: int = 160) -> np.ndarray:
    """One utterance from espeak-ng as 16 kHz mono float32."""
    from faster_whisper.audio import decode_audio

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "s.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(out), text], check=True,
                       capture_output=True, timeout=60)
        return decode_audio(str(out), sampling_rate=SAMPLE_RATE)


def have_piper() -> bool:
    import importlib.util

    return importlib.util.find_spec("piper") is not None


def synthesize_piper(text: str) -> np.ndarray:
    """One utterance in the library's Piper voice (piper-joe, 22.05 kHz) as 16 kHz mono float32.
    Piper's VITS samples noise, so repeated runs differ slightly."""
    import io

    from faster_whisper.audio import decode_audio

    voice = _piper_voice()
    audio = np.concatenate([c.audio_float_array for c in voice.synthesize(text)])
    return decode_audio(io.BytesIO(wav_bytes(audio, voice.config.sample_rate)), sampling_rate=SAMPLE_RATE)


_PIPER: list[object] = []


def _piper_voice() -> Any:
    if not _PIPER:
        from piper import PiperVoice

        from headway.library import resolve

        path = resolve("piper-joe", progress=False).path
        _PIPER.append(PiperVoice.load(next(path.glob("*.onnx"))))
    return _PIPER[0]


def recording(seconds: float, pause_s: float = 0.8, voice: str = "espeak") -> tuple[np.ndarray, str]:
    """About `seconds` of speech (whole sentences, cycled in order, pauses between) and its text.
    voice: espeak (espeak-ng) or piper (the library's piper-joe)."""
    synth = synthesize_piper if voice == "piper" else synthesize
    cache = {s: synth(s) for s in SENTENCES}
    pause = np.zeros(int(pause_s * SAMPLE_RATE), dtype=np.float32)
    parts: list[np.ndarray] = [pause]
    words: list[str] = []
    total = pause.size
    i = 0
    while total < seconds * SAMPLE_RATE:
        s = SENTENCES[i % len(SENTENCES)]
        parts += [cache[s], pause]
        words.append(s)
        total += cache[s].size + pause.size
        i += 1
    return np.concatenate(parts), " ".join(words)


def wav_bytes(samples: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    """16-bit PCM WAV."""
    import io
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def encode(samples: np.ndarray, fmt: str, rate: int = SAMPLE_RATE) -> bytes:
    """Compressed audio through PyAV: fmt is flac, mp3, ogg (opus) or webm (opus)."""
    import io

    import av

    codec = {"flac": "flac", "mp3": "mp3", "ogg": "libopus", "webm": "libopus"}[fmt]
    out_rate = 48000 if codec == "libopus" else rate
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        # an audio codec gives an audio stream (av's overloads know that only for literal codec names)
        stream = cast("av.AudioStream", container.add_stream(codec, rate=out_rate, layout="mono"))
        pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = rate
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout="mono", rate=out_rate)
        for f in resampler.resample(frame) + resampler.resample(None):
            for packet in stream.encode(f):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue()


_NUMBERS = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five", "6": "six",
            "7": "seven", "8": "eight", "9": "nine", "10": "ten", "20": "twenty"}
_SPELLING = {"neighbors": "neighbours", "oclock": "o'clock"}


def normalize(text: str) -> list[str]:
    """Lower case, punctuation dropped, a few spellings and small numbers folded."""
    words = re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("-", " ")).split()
    out = []
    for w in words:
        w = w.strip("'")
        w = _NUMBERS.get(w, w)
        out.append(_SPELLING.get(w.replace("'", ""), w).replace("'", ""))
    return [w for w in out if w]


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate: (substitutions + deletions + insertions) / reference words."""
    ref, hyp = normalize(reference), normalize(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1] / len(ref)
