"""Per-key rate limits: requests and tokens per minute, as token buckets (time passed in).

A bucket holds at most `capacity` and refills at `capacity` per minute. Requests take 1 from the
request bucket up front. Tokens are known only once the answer is (usage.total_tokens, or for a
stream an estimate from max_tokens), so they are charged afterwards and may drive the token
bucket below zero; a key is refused while its token bucket is below 1 token.
Invariant: `level <= capacity` at all times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    capacity: float
    level: float
    at: float                                      # when `level` was last brought up to date

    @classmethod
    def per_minute(cls, n: float, now: float) -> TokenBucket:
        return cls(capacity=float(n), level=float(n), at=now)

    def _fill(self, now: float) -> None:
        if now > self.at:
            self.level = min(self.capacity, self.level + (now - self.at) * self.capacity / 60.0)
            self.at = now

    def wait_s(self, n: float, now: float) -> float:
        """Seconds until `n` is available (0 when it is now)."""
        self._fill(now)
        missing = n - self.level
        return 0.0 if missing <= 0 else missing * 60.0 / self.capacity

    def take(self, n: float, now: float) -> float:
        """Take `n` if available and return 0; otherwise take nothing and return the seconds to wait."""
        wait = self.wait_s(n, now)
        if wait == 0.0:
            self.level -= n
        return wait

    def charge(self, n: float, now: float) -> None:
        """Take `n` whatever the level (tokens already spent); the level may go below zero."""
        self._fill(now)
        self.level -= n


@dataclass
class KeyLimits:
    """The buckets of every rate-limited key, by key id; made on a key's first request."""

    buckets: dict[str, tuple[TokenBucket | None, TokenBucket | None]] = field(default_factory=dict)

    def admit(self, key_id: str, rpm: int | None, tpm: int | None, now: float) -> int | None:
        """None when the request may go; otherwise Retry-After in whole seconds (>= 1)."""
        if rpm is None and tpm is None:
            return None
        got = self.buckets.get(key_id)
        if got is None or (got[0] and got[0].capacity != rpm) or (got[1] and got[1].capacity != tpm):
            got = (TokenBucket.per_minute(rpm, now) if rpm else None, TokenBucket.per_minute(tpm, now) if tpm else None)
            self.buckets[key_id] = got
        requests, tokens = got
        token_wait = tokens.wait_s(1, now) if tokens else 0.0
        if token_wait > 0:
            return max(1, math.ceil(token_wait))
        wait = requests.take(1, now) if requests else 0.0
        return max(1, math.ceil(wait)) if wait > 0 else None

    def charge(self, key_id: str, n: int, now: float) -> None:
        got = self.buckets.get(key_id)
        if got is not None and got[1] is not None:
            got[1].charge(n, now)
