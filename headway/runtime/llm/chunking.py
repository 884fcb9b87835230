"""How much prefill a step may carry while sequences are decoding (stall-free chunked prefill).

A step's time is modelled as ``a + b_d * decode_tokens + b_p * prefill_tokens`` (decode tokens
cost more: each reads its whole context's KV) and fitted by least squares over recent steps.

Policy: when the sequences waiting for prefill are at least as many as those decoding (a burst
of arrivals), prefill has priority and takes the whole token budget: many requests' first
tokens matter more than a few streams' next ones. Otherwise the running streams are protected:
a step may carry only as much prefill as keeps it within ``itl_factor`` times a decode-only step
of the same batch, so a long prompt arriving does not stall them (their inter-token latency
stays within that factor while it is prefilled in chunks). Pure: observations in, decisions out.
"""

from __future__ import annotations

from collections import deque

import numpy as np


class PrefillChunker:
    def __init__(self, *, budget: int, itl_factor: float = 1.8, min_chunk: int = 8, window: int = 256):
        if itl_factor <= 1.0:
            raise ValueError(f"itl_factor must be > 1 (a step may take that many decode steps), got {itl_factor}")
        self.budget = budget
        self.itl_factor = itl_factor
        self.min_chunk = min(min_chunk, budget)
        self._obs: deque[tuple[int, int, float]] = deque(maxlen=window)

    def observe(self, decode_tokens: int, prefill_tokens: int, seconds: float) -> None:
        if decode_tokens + prefill_tokens > 0 and seconds > 0:
            self._obs.append((decode_tokens, prefill_tokens, seconds))

    def fit(self) -> tuple[float, float, float] | None:
        """(a, b_decode, b_prefill) in seconds; None until steps of both kinds were seen."""
        if len(self._obs) < 6:
            return None
        x = np.array([(1.0, d, p) for d, p, _ in self._obs])
        y = np.array([s for _, _, s in self._obs])
        if np.linalg.matrix_rank(x) < 3:
            return None
        a, b_d, b_p = np.linalg.lstsq(x, y, rcond=None)[0]
        if b_d <= 0 or b_p <= 0:
            return None
        return max(float(a), 0.0), float(b_d), float(b_p)

    def prefill_cap(self, decodes: int, prefilling: int) -> int | None:
        """Prefill tokens allowed in a step with `decodes` decoding and `prefilling` waiting
        or mid-prefill sequences; None means the whole budget."""
        if decodes == 0 or prefilling >= decodes:
            return None
        model = self.fit()
        if model is None:
            return self.min_chunk
        a, b_d, b_p = model
        allowed = (self.itl_factor - 1.0) * (a + b_d * decodes) / b_p
        return int(min(max(allowed + 1e-6, self.min_chunk), self.budget))
