"""Deterministic English-like prompt text for benchmarks.

Owns turning a seeded ``random.Random`` into readable sentences built from the word list shipped
in ``headway/bench/words.json``, and hitting an exact token count when a ``tokenizers.Tokenizer``
(the object a ``tokenizer.json`` loads into) is supplied.

Invariant: for a given word list, tokenizer and ``random.Random`` state, ``text(n, rng)`` returns
the same string; with a tokenizer, ``count_tokens(text(n, rng)) == n`` (counted without special
tokens, i.e. the text itself, not the chat template around it).
"""

from __future__ import annotations

import json
import random
import re
from functools import lru_cache
from importlib import resources
from typing import Protocol

_WORD_KEYS = (
    "nouns", "verbs", "intransitive_verbs", "adjectives", "adverbs",
    "prepositions", "determiners", "names", "conjunctions",
)
# Pieces used to top up a text to an exact token count: short words that are one token in
# every BPE / SentencePiece vocabulary we have met, tried in this order.
_FILLERS = (" the", " and", " a", " of", " to", " in", " it", ",", ".")
_STARTS = ("The", "A", "It", "This", "One")
_MAX_FIX_STEPS = 256


class Encoded(Protocol):
    @property
    def ids(self) -> list[int]: ...


class TokenCounter(Protocol):
    """The part of ``tokenizers.Tokenizer`` this module uses."""

    def encode(self, sequence: str, *, add_special_tokens: bool = ...) -> Encoded: ...


@lru_cache(maxsize=1)
def word_list() -> dict[str, tuple[str, ...]]:
    """The shipped word list, by part of speech."""
    raw = json.loads(resources.files("headway.bench").joinpath("words.json").read_text("utf-8"))
    words: dict[str, tuple[str, ...]] = {}
    for key in _WORD_KEYS:
        values = raw.get(key)
        if not values:
            raise ValueError(f"headway/bench/words.json: missing or empty list {key!r}")
        words[key] = tuple(values)
    return words


class TextGenerator:
    """Seeded English-like text; exact token counts when given a tokenizer."""

    def __init__(self, tokenizer: TokenCounter | None = None) -> None:
        self.tokenizer = tokenizer
        self._w = word_list()
        self._piece_cost: dict[str, int] = {}

    @property
    def exact(self) -> bool:
        """True when token counts are exact (a tokenizer was given)."""
        return self.tokenizer is not None

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text``: exact with a tokenizer, else words + punctuation marks."""
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(text, add_special_tokens=False).ids)
        return len(re.findall(r"[A-Za-z']+|[^\sA-Za-z']", text))

    def sentence(self, rng: random.Random) -> str:
        """One sentence, e.g. 'The quiet teacher carried a letter across the bridge.'"""
        w = self._w
        pick = rng.choice
        subject = (pick(w["names"]) if rng.random() < 0.25
                   else f"{pick(w['determiners'])} {pick(w['adjectives'])} {pick(w['nouns'])}")
        shape = rng.randrange(4)
        if shape == 0:
            clause = f"{subject} {pick(w['verbs'])} {pick(w['determiners'])} {pick(w['nouns'])}"
        elif shape == 1:
            clause = (f"{subject} {pick(w['adverbs'])} {pick(w['verbs'])} the {pick(w['nouns'])} "
                      f"{pick(w['prepositions'])} the {pick(w['adjectives'])} {pick(w['nouns'])}")
        elif shape == 2:
            clause = f"{subject} {pick(w['intransitive_verbs'])} {pick(w['prepositions'])} the {pick(w['nouns'])}"
        else:
            clause = (f"{subject} {pick(w['intransitive_verbs'])} {pick(w['conjunctions'])} "
                      f"{pick(w['determiners'])} {pick(w['nouns'])} {pick(w['verbs'])} the {pick(w['nouns'])}")
        return clause[0].upper() + clause[1:] + "."

    def text(self, n_tokens: int, rng: random.Random) -> str:
        """Text of ``n_tokens`` tokens (exact with a tokenizer, approximate without)."""
        if n_tokens < 1:
            raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
        pieces: list[str] = []
        estimate = 0
        while estimate < n_tokens:
            words = self.sentence(rng)[:-1].split(" ") + ["."]
            for i, word in enumerate(words):
                piece = word if word == "." or (not pieces and i == 0) else " " + word
                pieces.append(piece)
                estimate += self._cost(piece)
                if estimate >= n_tokens:
                    break
        return self._fix(pieces, n_tokens)

    def _cost(self, piece: str) -> int:
        cost = self._piece_cost.get(piece)
        if cost is None:
            cost = max(self.count_tokens(piece), 1) if self.tokenizer is not None else 1
            self._piece_cost[piece] = cost
        return cost

    def _fix(self, pieces: list[str], n_tokens: int) -> str:
        """Trim or top up ``pieces`` until the whole text has exactly ``n_tokens`` tokens."""
        text = "".join(pieces)
        if self.tokenizer is None:
            return text
        actual = self.count_tokens(text)
        for _ in range(_MAX_FIX_STEPS):
            if actual == n_tokens:
                return text
            if actual > n_tokens and len(pieces) > 1:
                pieces.pop()
            elif actual > n_tokens:  # a single multi-token word: restart from a one-token word
                starts = [w for w in _STARTS if self.count_tokens(w) <= n_tokens]
                if not starts or pieces == starts[:1]:
                    break
                pieces = starts[:1]
            else:
                for filler in _FILLERS:
                    candidate = "".join(pieces) + filler
                    if self.count_tokens(candidate) <= n_tokens:
                        pieces.append(filler)
                        break
                else:
                    break
            text = "".join(pieces)
            actual = self.count_tokens(text)
        if actual != n_tokens:
            raise ValueError(f"could not build a text of exactly {n_tokens} tokens with this "
                             f"tokenizer (closest: {actual}); use a larger token count")
        return text
