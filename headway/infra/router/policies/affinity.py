"""Prefix affinity shared by the cache-aware and predicted-latency policies.

Owns the approximate prefix tree. How many prompt tokens a replica holds is, per replica:
exact when the request carries token ids and the replica publishes a prefix digest (the same
chain hash, `digest.chain_hashes`); otherwise estimated from the character tree at
`chars_per_token`. Published digests also correct the tree: a replica that reports a smaller cache
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
        chars = self.tree.match(req.prompt) if req.prompt else {}
        out: dict[str, int] = {}
        for r in replicas:
            if req.token_ids is not None and r.digest is not None:
                out[r.id] = cached_prefix_tokens(req.token_ids, r.digest, r.digest_block_tokens)
            else:
                out[r.id] = int(chars.get(r.id, 0) / self.chars_per_token)
        return out

    def record(self, req: RouteRequest, replica: str, now: float) -> None:
        if req.prompt:
            self.tree.insert(req.prompt, replica, now)

    def _correct(self, replicas: Sequence[ReplicaView]) -> None:
        for r in replicas:
            if r.digest is None or self._digest_sizes.get(r.id) == len(r.digest):
                continue
            self._digest_sizes[r.id] = len(r.digest)
            # one block of slack for a request routed but not yet cached, doubled for the char estimate
            allowed_tokens = (len(r.digest) + 1) * r.digest_block_tokens
            self.tree.evict(r.id, int(2 * allowed_tokens * self.chars_per_token))
