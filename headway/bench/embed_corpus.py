"""A fixed, deterministic corpus of mixed-length texts for the embeddings benchmark and tests:
English-like sentences of 5-500 tokens (uniform in length), the same for a given seed on every
machine (no downloads, no model needed to generate it)."""

from __future__ import annotations

import random

_WORDS = (
    "the a of and to in is for on with as by at from that this it be are was were has have not but or "
    "model server request replica token batch engine latency throughput memory cache router client query "
    "vector embedding search index document sentence paragraph language translation summary review "
    "river mountain forest ocean city village market garden kitchen window morning evening winter summer "
    "quickly slowly carefully brightly quietly suddenly finally rarely often always never sometimes "
    "run build measure compare deploy scale route answer learn explain describe remember imagine "
    "blue green heavy light ancient modern simple complex reliable efficient uncertain remarkable "
    "photosynthesis infrastructure electromagnetic internationalization characterization "
    "2024 42 3.14 100 km/h e-mail state-of-the-art well-known co-operate , . ; : ! ? ( ) \""
).split()


def _sentence(rng: random.Random, words: int) -> str:
    out = [rng.choice(_WORDS) for _ in range(words)]
    return " ".join(out).capitalize() + "."


def mixed_corpus(n: int, seed: int = 0, min_tokens: int = 5, max_tokens: int = 500) -> list[str]:
    """`n` texts whose lengths are spread uniformly over roughly [min_tokens, max_tokens]
    WordPiece tokens (about 1.3 tokens a word for this vocabulary)."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        target = rng.randint(min_tokens, max_tokens)
        words = max(2, round(target / 1.3))
        parts, left = [], words
        while left > 0:
            k = min(left, rng.randint(6, 24))
            parts.append(_sentence(rng, k))
            left -= k
        texts.append(" ".join(parts))
    return texts


def short_sentences(n: int, seed: int = 1) -> list[str]:
    """Single sentences of 8-20 words (the interactive requests)."""
    rng = random.Random(seed)
    return [_sentence(rng, rng.randint(8, 20)) for _ in range(n)]
