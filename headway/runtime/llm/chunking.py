"""How much prefill a step may carry while sequences are decoding (stall-free chunked prefill).

Cost model, learned online from the engine's own steps:
- a decode-only step with D sequences takes ``a + b_d * D`` (least squares over recent
  decode-only steps);
- a prefill token adds ``c`` on top; ``c`` is an exponential average over recent mixed steps of
  (step time - predicted decode time) / prefill tokens, so it follows what the current prompt
  really costs (a chunk deep into a long prompt attends over more context than the first one).

Policy: when the sequences waiting for prefill are at least ``burst_fraction`` (a quarter) as
many as those decoding (a burst of arrivals), prefill has priority and takes the whole token
budget: many requests' first tokens matter more than a few streams' next ones, and admitting
them early grows the decode batch. Before any decode-only step has been seen there is no cost
model to protect streams with, and prefill takes the whole budget too (a minimum chunk there
once left a cold engine's burst prefilling a few tokens a step). `headway bench-target burst`
compares the burst rule with the earlier one (as many waiting as decoding). Otherwise (a few
long prompts against many streams) the running streams are protected:
a step may carry only as much prefill as keeps it within ``itl_factor`` times a decode-only step
of the same batch, so a long prompt arriving does not stall them. Pure: observations in,
decisions out.
"""

from __future__ import annotations

from collections import deque

import numpy as np


class PrefillChunker:
    # a step with fewer prefill tokens than this measures its fixed cost, not a token's: the
    # replica's warm-up ("Hi", a few tokens) would otherwise set the published prefill rate
    # far too low, and the router would send prefixes away from the replica holding them
    MIN_MEASURED_PREFILL = 16

    def __init__(self, *, budget: int, itl_factor: float = 1.5, min_chunk: int = 8, window: int = 128,
                 smoothing: float = 0.5, burst_fraction: float = 0.25):
        if itl_factor <= 1.0:
            raise ValueError(f"itl_factor must be > 1 (a step may take that many decode steps), got {itl_factor}")
        self.budget = budget
        self.burst_fraction = burst_fraction
        self.itl_factor = itl_factor
        self.min_chunk = min(min_chunk, budget)
        self.smoothing = smoothing
        self._decode_obs: deque[tuple[int, float]] = deque(maxlen=window)
        self.prefill_token_s: float | None = None  # c: seconds one prefill token adds to a step

    def decode_time(self, decodes: int) -> float | None:
        """Predicted seconds of a decode-only step with `decodes` sequences."""
        if len(self._decode_obs) < 3:
            return None
        d = np.array([n for n, _ in self._decode_obs], dtype=float)
        t = np.array([s for _, s in self._decode_obs])
        if np.ptp(d) == 0:
            return float(t.mean() * decodes / d[0])  # one batch size seen: proportional
        b, a = np.polyfit(d, t, 1)
        return float(max(a, 0.0) + max(b, 0.0) * decodes)

    def observe(self, decode_tokens: int, prefill_tokens: int, seconds: float) -> None:
        if seconds <= 0:
            return
        if prefill_tokens == 0:
            if decode_tokens > 0:
                self._decode_obs.append((decode_tokens, seconds))
            return
        if prefill_tokens < self.MIN_MEASURED_PREFILL:
            return
        base = self.decode_time(decode_tokens) if decode_tokens else 0.0
        if base is None:
            return
        per_token = max(seconds - base, 0.0) / prefill_tokens
        if per_token <= 0:
            return
        c = self.prefill_token_s
        self.prefill_token_s = per_token if c is None else (1 - self.smoothing) * c + self.smoothing * per_token

    def prefill_cap(self, decodes: int, prefilling: int) -> int | None:
        """Prefill tokens allowed in a step with `decodes` decoding and `prefilling` waiting
        or mid-prefill sequences; None means the whole budget."""
        if decodes == 0 or prefilling >= self.burst_fraction * decodes:
            return None
        t_dec = self.decode_time(decodes)
        if t_dec is None:  # no decode-only step seen yet (a cold start): nothing to protect against
            return None
        if self.prefill_token_s is None:
            return self.min_chunk
        allowed = (self.itl_factor - 1.0) * t_dec / self.prefill_token_s
        return int(min(max(allowed + 1e-6, self.min_chunk), self.budget))
