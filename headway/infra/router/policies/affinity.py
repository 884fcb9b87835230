"""Prefix affinity shared by the cache-aware and predicted-latency policies.

Owns the approximate prefix tree. How many prompt tokens a replica holds is, per replica,
estimated from the tree of what the router sent it: prompt text by characters (at
`chars_per_token`), prompts sent as token ids one character per token. When the request carries
token ids and the replica publishes a prefix digest computed with `digest.chain_hashes`, the
exact count from the digest is used where it is larger. Published digests also correct the tree: a replica that reports a smaller cache
than the tree credits it with loses its least recently used entries down to what it reports.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from headway.infra.router.digest import cached_prefix_tokens
from headway.infra.router.prefix_tree import PrefixTree
from headway.infra.router.types import ReplicaView, RouteRequest


class PrefixAffinity:
    def __init__(self, chars_per_token: float = 4.0, max_chars_per_replica: int = 1_000_000):
        if chars_per_token <= 0:
            raise ValueError(f"chars_per_token must be > 0, got {chars_per_token}")
        self.chars_per_token = chars_per_token
        self.tree = PrefixTree(max_chars_per_tenant=max_chars_per_replica)
        self._digest_sizes: dict[str, int] = {}

    def prompt_tokens(self, req: RouteRequest) -> int:
        if req.token_ids is not None:
            return len(req.token_ids)
        return math.ceil(len(req.prompt) / self.chars_per_token)

    def matched_tokens(self, req: RouteRequest, replicas: Sequence[ReplicaView]) -> dict[str, int]:
        """Per replica, how many leading prompt tokens it likely holds in its cache."""
        self._correct(replicas)
        key, per_token = self._key(req)
        chars = self.tree.match(key) if key else {}
        skip = 1 if req.token_ids is not None else 0   # the marker character of token keys
        out: dict[str, int] = {}
        for r in replicas:
            approx = int(max(0, chars.get(r.id, 0) - skip) / per_token)
            if req.token_ids is not None and r.digest is not None:
                # exact when both sides hash alike; the tree still counts if they do not
                approx = max(approx, cached_prefix_tokens(req.token_ids, r.digest, r.digest_block_tokens))
            out[r.id] = approx
        return out

    def record(self, req: RouteRequest, replica: str, now: float) -> None:
        key, _ = self._key(req)
        if key:
            self.tree.insert(key, replica, now)

    def _key(self, req: RouteRequest) -> tuple[str, float]:
        """The tree key of a prompt and its characters per token: text as is, token ids one char each."""
        if req.token_ids is not None:
            return "\x00" + "".join(chr(t) if 0 <= t < 0x110000 else "\ufffd" for t in req.token_ids), 1.0
        return req.prompt, self.chars_per_token

    def _correct(self, replicas: Sequence[ReplicaView]) -> None:
        for r in replicas:
            if r.digest is None or self._digest_sizes.get(r.id) == len(r.digest):
                continue
            self._digest_sizes[r.id] = len(r.digest)
            # one block of slack for a request routed but not yet cached, doubled for the char estimate
            allowed_tokens = (len(r.digest) + 1) * r.digest_block_tokens
            self.tree.evict(r.id, int(2 * allowed_tokens * self.chars_per_token))
