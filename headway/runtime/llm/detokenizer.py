"""Incremental detokenizer: owns turning a stream of token ids into text deltas, and stop strings.

Works on a ``tokenizers.Tokenizer`` (a ``tokenizer.json``), for byte-level BPE (GPT-2 style,
e.g. SmolLM2) and sentencepiece-style (Llama 2 style, ``▁`` + byte fallback) tokenizers.

Text deltas (the vLLM / TGI offset method): keep ``prefix_offset`` and ``read_offset`` into
the token list; decode ``ids[prefix_offset:read_offset]`` and ``ids[prefix_offset:]``; the new
text is the difference. While the decoded text ends in U+FFFD (a multi-byte UTF-8 character
split across tokens) nothing is emitted. Decoding with a few tokens of left context keeps
leading spaces right for sentencepiece decoders, which strip the first one; the detokenizer
starts with the tail of the prompt as that context.

Stop strings: the text before a stop string is emitted, the stop string never is; a suffix of
the pending text that could be the start of a stop string is held back until resolved.
``push`` reports which stop string matched (then the stream is over). ``flush()`` releases
held-back text at the end of a stream that did not stop on a stop string.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

_CONTEXT_TOKENS = 5


@dataclass
class DetokDelta:
    text: str  # new text to stream (may be "")
    stop: str | None = None  # the stop string that matched, if any (stream is then over)


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        stop: Iterable[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_ids)[-_CONTEXT_TOKENS:]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stops = tuple(s for s in stop)
        if any(not isinstance(s, str) or not s for s in self._stops):
            raise ValueError(f"stop strings must be non-empty str, got {self._stops!r}")
        self._max_hold = max((len(s) for s in self._stops), default=1) - 1
        self._pending = ""  # decoded but not yet emitted (possible stop-string start)
        self.text = ""  # everything emitted so far
        self.stopped: str | None = None

    @classmethod
    def from_file(cls, path: str | Path, **kw: object) -> IncrementalDetokenizer:
        return cls(Tokenizer.from_file(str(path)), **kw)  # type: ignore[arg-type]

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def _next_text(self) -> str:
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return new
        return ""

    def push(self, token_ids: int | Iterable[int]) -> DetokDelta:
        if self.stopped is not None:
            raise RuntimeError("push after a stop string matched: the stream is over")
        if isinstance(token_ids, int):
            self._ids.append(token_ids)
        else:
            self._ids.extend(token_ids)
        self._pending += self._next_text()
        return self._release()

    def _release(self) -> DetokDelta:
        if not self._stops:
            out, self._pending = self._pending, ""
            self.text += out
            return DetokDelta(out)
        best: tuple[int, str] | None = None
        for s in self._stops:
            i = self._pending.find(s)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is not None:
            out = self._pending[: best[0]]
            self._pending = ""
            self.text += out
            self.stopped = best[1]
            return DetokDelta(out, best[1])
        hold = 0
        p = self._pending
        for k in range(min(self._max_hold, len(p)), 0, -1):
            tail = p[-k:]
            if any(s.startswith(tail) for s in self._stops):
                hold = k
                break
        out = p[: len(p) - hold]
        self._pending = p[len(p) - hold :]
        self.text += out
        return DetokDelta(out)

    def flush(self) -> str:
        """End of stream (EOS / length / abort): release held-back text, including a
        trailing incomplete character as U+FFFD."""
        if self.stopped is not None:
            return ""
        tail = self._decode(self._ids[self._prefix_offset :])
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        rest = tail[len(prefix) :] if len(tail) > len(prefix) else ""
        self._prefix_offset = self._read_offset = len(self._ids)
        out = self._pending + rest
        self._pending = ""
        self.text += out
        return out
