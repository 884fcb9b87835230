"""What the engine streams back to the API layer for one request, step by step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


@dataclass(frozen=True)
class ChoiceDelta:
    """New output of one choice (of n) since the last delta."""

    index: int
    text: str                       # new text, stop strings already removed
    token_ids: list[int]            # new token ids (a held-back stop-string prefix may lag the text)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" once finished
    cached_tokens: int | None = None  # on a request's first delta: prompt tokens served from the prefix cache
