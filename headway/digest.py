"""The prefix-digest recipe of the replica-state contract, shared by replicas and routers.

A replica publishes `prefix_digest: {"block_tokens": 64, "hashes": [...]}` in /headway/state: one
hash per full block of every cached prefix, each chained to the hash of the block before it, so a
router that computes the same chain over a request's token ids can tell how much of the request a
replica already holds. Hash of block i = sha256(hash of block i-1 as ASCII hex + the block's token
ids as little-endian int32), first 16 hex chars. Block 0 chains to "" for the default cache
(no adapter, no salt), or to the hash of the isolation key's repr otherwise.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Hashable, Sequence


def root_hash(key: Hashable = None) -> str:
    return "" if key is None else hashlib.sha256(repr(key).encode()).hexdigest()[:16]


def chain_step(prev: str, block: Sequence[int]) -> str:
    try:
        payload = struct.pack(f"<{len(block)}i", *block)
    except struct.error as exc:
        raise ValueError(f"token ids must be int32 values: {exc}") from exc
    return hashlib.sha256(prev.encode("ascii") + payload).hexdigest()[:16]


def chain_hashes(token_ids: Sequence[int], block_tokens: int = 64, key: Hashable = None,
                 *, root: str | None = None) -> list[str]:
    """One hash per full block of `token_ids` (a partial last block is ignored), chained from
    `root` when given (a root a replica published), else from the root hash of `key`."""
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
    out: list[str] = []
    prev = root_hash(key) if root is None else root
    for start in range(0, len(token_ids) - block_tokens + 1, block_tokens):
        prev = chain_step(prev, token_ids[start:start + block_tokens])
        out.append(prev)
    return out
