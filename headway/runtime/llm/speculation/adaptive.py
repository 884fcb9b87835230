"""Proposal length that follows the live acceptance rate. Pure: observations in, length out.

Each sequence keeps an EWMA ``rate`` of per-token acceptance (accepted / judged; proposals
after the first rejected one are never judged).
With per-token acceptance ``r``, a run of proposals is accepted for ``r / (1 - r)`` tokens on
average; the next proposal is that expected run (rounded) plus one (to find out whether it got longer),
within ``[1, max_tokens]``. High acceptance grows the proposal to the cap; repeated rejection
shrinks it to one token, where a miss costs one extra logits row."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class AdaptiveLength:
    max_tokens: int
    rate: float = 0.75  # optimistic start: the first proposal is long enough to learn from
    alpha: float = 0.3  # EWMA weight of the latest step

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 < self.alpha <= 1.0 or not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"need 0 < alpha <= 1 and 0 <= rate <= 1, got alpha={self.alpha}, rate={self.rate}")

    def next_length(self) -> int:
        r = min(self.rate, 0.999)
        return max(1, min(self.max_tokens, math.floor(r / (1.0 - r) + 0.5) + 1))

    def observe(self, proposed: int, accepted: int) -> None:
        if proposed <= 0:
            return
        if not 0 <= accepted <= proposed:
            raise ValueError(f"accepted must be in [0, proposed={proposed}], got {accepted}")
        tested = accepted + (1 if accepted < proposed else 0)  # tokens after a rejection were never judged
        self.rate += self.alpha * (accepted / tested - self.rate)
