"""Audio encoders for streamed speech: 16-bit mono samples in, bytes out, as the audio comes.

wav: a RIFF header whose sizes say "unknown" (0xFFFFFFFF, the streaming convention), then the
samples. pcm: the samples alone (signed 16-bit little-endian). flac and mp3: only when PyAV
(`av`) is importable, encoded frame by frame (flac as a native stream: `fLaC`, STREAMINFO with
an unknown total, frames; mp3 as raw MPEG audio frames). `available_formats()` is what a
request may ask for on this install.

Invariant: an encoder's output is `start() + encode(a) + encode(b) + ... + finish()`, a valid
file of its format for the samples a, b, ... in order; start() returns bytes once, at the first
call of encode() (so a response's first byte is audio, never a lone header).
"""

from __future__ import annotations

import importlib.util
import struct
from typing import Any

import numpy as np

FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")   # what the OpenAI API names
CONTENT_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac", "mp3": "audio/mpeg"}


def available_formats() -> tuple[str, ...]:
    """The response formats this install can encode, in the order the OpenAI API lists them."""
    have_av = importlib.util.find_spec("av") is not None
    return tuple(f for f in ("mp3", "flac", "wav", "pcm") if f in ("wav", "pcm") or have_av)


def wav_header(sample_rate: int, channels: int = 1, sample_width: int = 2) -> bytes:
    """A 44-byte WAV header for a stream of unknown length (RIFF and data sizes 0xFFFFFFFF)."""
    byte_rate = sample_rate * channels * sample_width
    return (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, byte_rate, channels * sample_width,
                                    8 * sample_width)
            + b"data" + struct.pack("<I", 0xFFFFFFFF))


class Encoder:
    """pcm: the samples as they are. Subclasses add a header and/or a codec."""

    content_type = "audio/pcm"

    def __init__(self, sample_rate: int):
        self.sample_rate = sample_rate
        self._started = False

    def _header(self) -> bytes:
        return b""

    def _body(self, samples: np.ndarray) -> bytes:
        return samples.astype("<i2", copy=False).tobytes()

    def encode(self, samples: np.ndarray) -> bytes:
        head = b""
        if not self._started:
            self._started = True
            head = self._header()
        return head + self._body(samples)

    def finish(self) -> bytes:
        return b"" if self._started else self._header()


class WavEncoder(Encoder):
    content_type = "audio/wav"

    def _header(self) -> bytes:
        return wav_header(self.sample_rate)


class _AVEncoder(Encoder):
    """A PyAV codec fed frames of exactly its frame size (the last one padded where needed)."""

    codec = ""
    sample_format = "s16"
    pad_last = False

    def __init__(self, sample_rate: int):
        super().__init__(sample_rate)
        import av

        self._av: Any = av
        ctx: Any = av.CodecContext.create(self.codec, "w")
        ctx.sample_rate = sample_rate
        ctx.format = self.sample_format
        ctx.layout = "mono"
        self._configure(ctx)
        ctx.open()
        self.ctx = ctx
        self.frame_size = int(ctx.frame_size) or 1152
        self._held = np.zeros(0, dtype=np.int16)
        self._pts = 0

    def _configure(self, ctx: Any) -> None:
        pass

    def _frames(self, samples: np.ndarray) -> bytes:
        out: list[bytes] = []
        for start in range(0, len(samples), self.frame_size):
            part = samples[start:start + self.frame_size]
            frame = self._av.AudioFrame.from_ndarray(part.reshape(1, -1), format=self.sample_format, layout="mono")
            frame.sample_rate = self.sample_rate
            frame.pts = self._pts
            self._pts += len(part)
            out.extend(bytes(p) for p in self.ctx.encode(frame))
        return b"".join(out)

    def _body(self, samples: np.ndarray) -> bytes:
        data = np.concatenate([self._held, samples.astype(np.int16, copy=False)])
        whole = len(data) - len(data) % self.frame_size
        self._held = data[whole:]
        return self._frames(data[:whole])

    def finish(self) -> bytes:
        head = b"" if self._started else self._header()
        self._started = True
        tail = self._held
        if len(tail) and self.pad_last:
            tail = np.concatenate([tail, np.zeros(self.frame_size - len(tail), dtype=np.int16)])
        body = self._frames(tail) if len(tail) else b""
        return head + body + b"".join(bytes(p) for p in self.ctx.encode(None))


class FlacEncoder(_AVEncoder):
    content_type = "audio/flac"
    codec = "flac"

    def _header(self) -> bytes:
        info = bytes(self.ctx.extradata or b"")[:34].ljust(34, b"\0")
        # STREAMINFO: total samples unknown (0) and no MD5, as a stream cannot know them up front
        packed = int.from_bytes(info[10:18], "big") & ~((1 << 36) - 1)
        info = info[:10] + packed.to_bytes(8, "big") + bytes(16)
        return b"fLaC" + bytes([0x80, 0, 0, 34]) + info   # last metadata block, STREAMINFO, 34 bytes


class Mp3Encoder(_AVEncoder):
    content_type = "audio/mpeg"
    codec = "libmp3lame"
    sample_format = "s16p"
    pad_last = True

    def _configure(self, ctx: Any) -> None:
        ctx.bit_rate = 64000


def encoder_for(fmt: str, sample_rate: int) -> Encoder:
    """An encoder for one of available_formats()."""
    kinds: dict[str, type[Encoder]] = {"pcm": Encoder, "wav": WavEncoder, "flac": FlacEncoder, "mp3": Mp3Encoder}
    return kinds[fmt](sample_rate)


def resample(samples: np.ndarray, rate: int, to: int) -> np.ndarray:
    """Linear-interpolation resampling of one sentence's samples (speech; each sentence on its own)."""
    if rate == to or len(samples) == 0:
        return samples
    n = max(1, round(len(samples) * to / rate))
    x = np.linspace(0, len(samples) - 1, n)
    return np.interp(x, np.arange(len(samples)), samples.astype(np.float32)).round().astype(np.int16)
