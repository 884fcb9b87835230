"""One batch of chunks through Whisper: features, encoder, language, greedy/beam decoding,
segments with chunk-local timestamps, optional word timestamps.

Owns nothing between calls (pure over a loaded faster-whisper `WhisperModel`). Chunks in a
batch share `DecodeOptions` (the batch key: task, prompt, temperature, word timestamps,
beam size); each may have its own language, given or detected from its own encoder output.
Runs on the engine's worker thread only.

Whisper decodes without timestamp tokens (in timestamp mode greedy decoding of a packed 30-s
chunk often stops early and drops its last sentence); when times are wanted they come from the
cross-attention word alignment, and segments are cut from the words at sentence ends and pauses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import ceil
from typing import Any

import numpy as np


@dataclass(frozen=True)
class DecodeOptions:
    task: str = "transcribe"
    prompt: str | None = None
    temperature: float = 0.0
    word_timestamps: bool = False     # times wanted (segments and words, from the word alignment)
    beam_size: int = 1


@dataclass
class ChunkResult:
    language: str
    segments: list[dict[str, Any]] = field(default_factory=list)  # text, start, end (chunk-local s), words, ...


def decode_batch(model: Any, samples: list[np.ndarray], languages: list[str | None],
                 opts: DecodeOptions) -> list[ChunkResult]:
    """Transcribe chunks (each <= 30 s of 16 kHz audio) in one batch; results in input order."""
    from faster_whisper.audio import pad_or_trim
    from faster_whisper.tokenizer import Tokenizer
    from faster_whisper.transcribe import get_compression_ratio, get_suppressed_tokens

    features = np.stack([pad_or_trim(model.feature_extractor(s)[..., :-1]) for s in samples])
    encoder_output = model.encode(features)
    multilingual = model.model.is_multilingual
    langs: list[str] = []
    detected = (model.model.detect_language(encoder_output)
                if multilingual and any(lang is None for lang in languages) else None)
    for i, lang in enumerate(languages):
        if not multilingual:
            langs.append("en")
        elif lang is not None:
            langs.append(lang)
        else:
            assert detected is not None
            langs.append(detected[i][0][0][2:-2])   # '<|en|>' -> 'en'
    base = Tokenizer(model.hf_tokenizer, multilingual, task=opts.task, language=langs[0])
    previous = base.encode(" " + opts.prompt.strip()) if opts.prompt else []
    prompt = model.get_prompt(base, previous_tokens=previous, without_timestamps=True)
    prompts = [list(prompt) for _ in samples]
    if multilingual:
        at = prompt.index(base.language)
        for p, lang in zip(prompts, langs):
            p[at] = base.tokenizer.token_to_id(f"<|{lang}|>")
    results = model.model.generate(
        encoder_output, prompts, beam_size=1 if opts.temperature else opts.beam_size, max_length=model.max_length,
        suppress_blank=True, suppress_tokens=get_suppressed_tokens(base, [-1]), return_scores=True,
        return_no_speech_prob=True, sampling_temperature=max(opts.temperature, 1e-5) if opts.temperature else 1.0,
        sampling_topk=0 if opts.temperature else 1)
    out: list[ChunkResult] = []
    segment_lists: list[list[dict[str, Any]]] = []
    sizes: list[int] = []
    for chunk, result, lang in zip(samples, results, langs):
        duration = chunk.size / 16000
        size = int(ceil(duration) * model.frames_per_second)
        tokens = result.sequences_ids[0]
        avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
        subsegments, _, _ = model._split_segments_by_timestamps(
            tokenizer=base, tokens=tokens, time_offset=0.0, segment_size=size, segment_duration=duration, seek=0)
        segs = []
        for sub in subsegments:
            text = base.decode(sub["tokens"])
            segs.append(dict(text=text, start=sub["start"], end=min(sub["end"], duration), tokens=sub["tokens"],
                             avg_logprob=avg_logprob, no_speech_prob=result.no_speech_prob,
                             compression_ratio=get_compression_ratio(text), temperature=opts.temperature, seek=0))
        segment_lists.append(segs)
        sizes.append(size)
        out.append(ChunkResult(lang, segs))
    if opts.word_timestamps:
        model.add_word_timestamps(segment_lists, base, encoder_output, sizes, "\"'“¿([{-", "\"'.。,，!！?？:：”)]}、",
                                  0.0)
        for res in out:
            res.segments = [cut for seg in res.segments for cut in _cut(seg)]
    return out


def _cut(segment: dict[str, Any], pause_s: float = 0.6) -> list[dict[str, Any]]:
    """One chunk-long segment with word times -> segments ending at sentence ends or pauses."""
    words = [dict(w, start=float(w["start"]), end=float(w["end"])) for w in segment.get("words") or []]
    if not words:
        return [segment]
    groups: list[list[dict[str, Any]]] = [[]]
    for i, w in enumerate(words):
        groups[-1].append(w)
        nxt = words[i + 1] if i + 1 < len(words) else None
        if nxt is not None and (w["word"].rstrip().endswith((".", "?", "!", "。")) or nxt["start"] - w["end"] > pause_s):
            groups.append([])
    return [dict(segment, text="".join(w["word"] for w in g), start=g[0]["start"], end=g[-1]["end"], words=g,
                 tokens=list(segment["tokens"]) if k == 0 else []) for k, g in enumerate(groups) if g]
