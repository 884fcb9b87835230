"""Long audio -> chunks of at most 30 s of speech, split at silences (Silero VAD, shipped in the
faster-whisper wheel), and chunk-local times -> times in the original recording.

Owns the cut. Invariants: chunks come out in recording order; each holds <= CHUNK_SECONDS of
samples (the speech pieces of one stretch, silences between them removed); `to_original` is
monotonic within a chunk, so reassembling chunk results in index order keeps timestamps sorted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from headway.runtime.asr.audio import SAMPLE_RATE

CHUNK_SECONDS = 30.0


@dataclass(frozen=True)
class Chunk:
    index: int                  # position in the request, 0-based
    samples: np.ndarray         # speech only, <= CHUNK_SECONDS
    pieces: tuple[tuple[int, int], ...]   # the speech ranges (original sample offsets) it was cut from

    @property
    def seconds(self) -> float:
        return self.samples.size / SAMPLE_RATE

    def to_original(self, t: float) -> float:
        """A time inside this chunk (seconds from its start) -> seconds in the original recording.
        A time on the seam between two pieces maps to the end of the earlier one."""
        at = max(0, round(t * SAMPLE_RATE))
        for start, end in self.pieces:
            if at <= end - start:
                return round((start + at) / SAMPLE_RATE, 3)
            at -= end - start
        return round(self.pieces[-1][1] / SAMPLE_RATE, 3)


def split(audio: np.ndarray, *, min_silence_ms: int = 160) -> list[Chunk]:
    """Cut `audio` at silences into chunks of <= 30 s of speech; [] when there is no speech."""
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    opts = VadOptions(max_speech_duration_s=CHUNK_SECONDS, min_silence_duration_ms=min_silence_ms)
    speech = get_speech_timestamps(audio, opts, sampling_rate=SAMPLE_RATE)
    limit = int(CHUNK_SECONDS * SAMPLE_RATE)
    groups: list[list[tuple[int, int]]] = []
    size = 0
    for piece in speech:
        start, end = int(piece["start"]), min(int(piece["end"]), int(piece["start"]) + limit)
        if not groups or size + end - start > limit:
            groups.append([])
            size = 0
        groups[-1].append((start, end))
        size += end - start
    return [Chunk(i, np.ascontiguousarray(np.concatenate([audio[s:e] for s, e in g]), dtype=np.float32), tuple(g))
            for i, g in enumerate(groups)]
