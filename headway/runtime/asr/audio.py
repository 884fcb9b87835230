"""Uploaded bytes -> 16 kHz mono float32 samples, with the checks a client can act on.

Owns decoding (PyAV, which faster-whisper ships with its own ffmpeg libraries: wav, mp3, flac,
ogg, webm, m4a ...) and resampling. Invariant: `decode` either returns a non-empty float32 array
at SAMPLE_RATE no longer than `max_seconds`, or raises AudioError with a message for the client
(never with the payload in it). Audio bytes are never logged or written to disk.
"""

from __future__ import annotations

import io

import numpy as np

SAMPLE_RATE = 16000


class AudioError(ValueError):
    """The upload cannot be transcribed; `code` is the OpenAI-style error code."""

    def __init__(self, message: str, code: str = "invalid_audio"):
        super().__init__(message)
        self.code = code


def decode(data: bytes, max_seconds: float) -> np.ndarray:
    """Decode a whole audio file (any container PyAV reads) into mono 16 kHz float32."""
    if not data:
        raise AudioError("the uploaded file is empty; send an audio file (wav, mp3, flac, ogg, webm)",
                         "empty_file")
    import av
    from faster_whisper.audio import decode_audio

    try:
        samples = decode_audio(io.BytesIO(data), sampling_rate=SAMPLE_RATE)
    except (av.FFmpegError, ValueError, IndexError, StopIteration, EOFError, RuntimeError) as exc:
        raise AudioError(f"the uploaded file is not audio this server can decode ({type(exc).__name__}); "
                         "send wav, mp3, flac, ogg or webm") from None
    if samples.size == 0:
        raise AudioError("the uploaded file holds no audio samples", "empty_audio")
    seconds = samples.size / SAMPLE_RATE
    if seconds > max_seconds:
        raise AudioError(f"the audio is {seconds:.0f} s long; this server transcribes at most {max_seconds:.0f} s "
                         "per request (engine.max_audio_seconds in headway.yaml); split the file", "audio_too_long")
    return np.ascontiguousarray(samples, dtype=np.float32)
