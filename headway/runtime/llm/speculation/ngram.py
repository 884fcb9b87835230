"""N-gram (prompt-lookup) proposer: the continuation of the latest earlier occurrence of the
context's last n tokens, n tried from ``max_n`` down to ``min_n``. Pure: tokens in, tokens out.

Input-grounded tasks (editing, summarising or quoting a given file) repeat long spans of the
prompt, so the span that followed the last occurrence is often what comes next."""

from __future__ import annotations

from collections.abc import Sequence


def propose_ngram(tokens: Sequence[int], k: int, min_n: int = 2, max_n: int = 4) -> list[int]:
    """Up to ``k`` tokens that followed the most recent earlier match of the last n tokens
    (longest n first); ``[]`` when nothing matches."""
    if not 1 <= min_n <= max_n:
        raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
    toks = list(tokens)
    L = len(toks)
    if k <= 0:
        return []
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        tail = toks[L - n:]
        first = tail[0]
        for i in range(L - n - 1, -1, -1):  # most recent occurrence first
            if toks[i] == first and toks[i:i + n] == tail:
                return toks[i + n:i + n + k]
    return []
