"""How much prefill a step may carry while sequences are decoding (stall-free chunked prefill).

A step's time is modelled as ``a + b * tokens`` and fitted by least squares over recent steps.
While decodes run, a step may carry at most as many prefill tokens as keep it within
``itl_factor`` times a decode-only step of the same batch, so a long prompt being prefilled
does not stall the running streams (their inter-token latency stays within that factor). With
no decodes running, prefill takes the whole token budget. Pure: observations in, decisions out.
"""

from __future__ import annotations

from collections import deque


class PrefillChunker:
    def __init__(self, *, budget: int, itl_factor: float = 1.5, min_chunk: int = 8, window: int = 128):
        if itl_factor <= 1.0:
            raise ValueError(f"itl_factor must be > 1 (a step may take that many decode steps), got {itl_factor}")
        self.budget = budget
        self.itl_factor = itl_factor
        self.min_chunk = min(min_chunk, budget)
        self._obs: deque[tuple[int, float]] = deque(maxlen=window)

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            self._obs.append((tokens, seconds))

    def fit(self) -> tuple[float, float] | None:
        """(a, b) of step_seconds = a + b * tokens; None before there is data."""
        n = len(self._obs)
        if n < 4:
            return None
        mx = sum(t for t, _ in self._obs) / n
        my = sum(s for _, s in self._obs) / n
        var = sum((t - mx) ** 2 for t, _ in self._obs)
        if var < 1e-9:
            return 0.0, my / mx  # no spread yet: treat the cost as proportional (conservative)
        b = sum((t - mx) * (s - my) for t, s in self._obs) / var
        if b <= 0:
            return 0.0, my / mx
        return max(my - b * mx, 0.0), b

    def prefill_cap(self, decodes: int) -> int | None:
        """Prefill tokens allowed in a step that also decodes `decodes` sequences."""
        if decodes == 0:
            return None
        model = self.fit()
        if model is None:
            return self.min_chunk
        a, b = model
        allowed_total = (self.itl_factor * (a + b * decodes) - a) / b
        return int(min(max(allowed_total - decodes, self.min_chunk), self.budget))
