"""Prefix affinity shared by the cache-aware and predicted-latency policies.

Owns the approximate prefix tree. How many prompt tokens a replica holds is, per replica,
estimated from the tree of what the router sent it: prompt text by characters (at
`chars_per_token`), prompts sent as token ids one character per token. When the request carries
token ids and the replica publishes a prefix digest computed with `digest.chain_hashes`, the
exact count from the digest is used where it is larger. Published digests also correct the tree: a replica that reports a smaller cache
than the tree credits it with loses its least recently used entries down to what it reports.

An adapter's prefix cache is isolated from the base model's on a replica, so an adapter request
only matches what was sent under that adapter: the tree key starts with the adapter's name, and
its digest chain starts from the root the replica publishes for that adapter (a replica that
publishes none is credited with nothing from its digest).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from headway.infra.router.digest import cached_prefix_tokens, chain_hashes
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
        skip = len(self._key_head(req))   # the marker characters before the prompt
        out: dict[str, int] = {}
        chains: dict[tuple[str, int], list[str]] = {}   # one hash chain per (root, block size)
        for r in replicas:
            approx = int(max(0, chars.get(r.id, 0) - skip) / per_token)
            root = "" if req.adapter is None else dict(r.digest_roots).get(req.adapter)
            if req.token_ids is not None and r.digest is not None and root is not None:
                # exact when both sides hash alike; the tree still counts if they do not
                ck = (root, r.digest_block_tokens)
                if ck not in chains:
                    chains[ck] = chain_hashes(req.token_ids, r.digest_block_tokens, root=root)
                approx = max(approx, cached_prefix_tokens(req.token_ids, r.digest, r.digest_block_tokens,
                                                          chain=chains[ck]))
            out[r.id] = approx
        return out

    def record(self, req: RouteRequest, replica: str, now: float) -> None:
        key, _ = self._key(req)
        if key:
            self.tree.insert(key, replica, now)

    @staticmethod
    def _key_head(req: RouteRequest) -> str:
        """What the tree key starts with: the adapter's name (isolated caches), then a marker for token ids."""
        head = "" if req.adapter is None else f"\x01{req.adapter}\x01"
        return head + ("\x00" if req.token_ids is not None else "")

    def _key(self, req: RouteRequest) -> tuple[str, float]:
        """The tree key of a prompt and its characters per token: text as is, token ids one char each."""
        if req.token_ids is not None:
            ids = "".join(chr(t) if 0 <= t < 0x110000 else "\ufffd" for t in req.token_ids)
            return self._key_head(req) + ids, 1.0
        return self._key_head(req) + req.prompt, self.chars_per_token

    def forget(self, replica: str) -> None:
        """Drop what was sent to `replica` (it left the router): a replica coming back under the
        same URL starts with an empty cache, and the tree no longer holds its prefixes."""
        self.tree.remove_tenant(replica)
        self._digest_sizes.pop(replica, None)

    def _correct(self, replicas: Sequence[ReplicaView]) -> None:
        for r in replicas:
            if r.digest is None or self._digest_sizes.get(r.id) == len(r.digest):
                continue
            self._digest_sizes[r.id] = len(r.digest)
            # one block of slack for a request routed but not yet cached, doubled for the char estimate
            allowed_tokens = (len(r.digest) + 1) * r.digest_block_tokens
            self.tree.evict(r.id, int(2 * allowed_tokens * self.chars_per_token))
