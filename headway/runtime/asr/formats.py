"""Chunk results -> one transcript on the original timeline -> OpenAI's response formats
(json, text, srt, vtt, verbose_json).

Owns reassembly and rendering. Invariant: segments and words come out in chunk order with times
mapped back to the original recording (chunks.Chunk.to_original), so they are sorted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from headway.runtime.asr.chunks import Chunk
from headway.runtime.asr.decode import ChunkResult

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")


@dataclass
class Transcript:
    duration: float
    language: str = "en"
    segments: list[dict[str, Any]] = field(default_factory=list)
    words: list[dict[str, Any]] = field(default_factory=list)
    languages: dict[str, float] = field(default_factory=dict)   # seconds of speech per detected language

    @property
    def text(self) -> str:
        return "".join(s["text"] for s in self.segments).strip()

    def add(self, chunk: Chunk, result: ChunkResult) -> str:
        """Append one chunk's result (chunks must come in order); returns the text it added."""
        self.languages[result.language] = self.languages.get(result.language, 0.0) + chunk.seconds
        self.language = max(self.languages, key=lambda k: self.languages[k])
        added = []
        for seg in result.segments:
            text = seg["text"]
            if not text.strip():
                continue
            self.segments.append({
                "id": len(self.segments), "seek": 0, "start": chunk.to_original(seg["start"]),
                "end": chunk.to_original(seg["end"]), "text": text, "tokens": list(seg["tokens"]),
                "temperature": float(seg["temperature"]), "avg_logprob": float(seg["avg_logprob"]),
                "compression_ratio": float(seg["compression_ratio"]), "no_speech_prob": float(seg["no_speech_prob"])})
            for w in seg.get("words") or []:
                self.words.append({"word": w["word"].strip(), "start": chunk.to_original(float(w["start"])),
                                   "end": chunk.to_original(float(w["end"]))})
            added.append(text)
        return "".join(added)


def _stamp(t: float, sep: str) -> str:
    ms = int(round(t * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def render(t: Transcript, fmt: str, granularities: set[str]) -> tuple[Any, str]:
    """(body, media type): a dict for the JSON formats, a string for the others."""
    if fmt == "json":
        return {"text": t.text, "usage": {"type": "duration", "seconds": round(t.duration, 3)}}, "application/json"
    if fmt == "text":
        return t.text + "\n", "text/plain; charset=utf-8"
    if fmt == "verbose_json":
        body: dict[str, Any] = {"task": "transcribe", "language": t.language, "duration": round(t.duration, 3),
                                "text": t.text, "usage": {"type": "duration", "seconds": round(t.duration, 3)}}
        if "segment" in granularities or not granularities:
            body["segments"] = t.segments
        if "word" in granularities:
            body["words"] = t.words
        return body, "application/json"
    lines = ["WEBVTT", ""] if fmt == "vtt" else []
    for i, s in enumerate(t.segments, 1):
        if fmt == "srt":
            lines += [str(i), f"{_stamp(s['start'], ',')} --> {_stamp(s['end'], ',')}", s["text"].strip(), ""]
        else:
            lines += [f"{_stamp(s['start'], '.')} --> {_stamp(s['end'], '.')}", s["text"].strip(), ""]
    return "\n".join(lines) + ("\n" if lines else ""), "text/plain; charset=utf-8"
