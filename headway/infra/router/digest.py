"""The prefix digest both sides agree on: a chain hash per block of cached prefix tokens.

Replicas publish `prefix_digest: {"block_tokens": 64, "hashes": [...]}` in /headway/state; the
router recomputes the same chain from a request's token ids to see how much of it a replica holds.
Hash of block i = sha256(hash of block i-1 as ASCII hex + the block's token ids as little-endian
int32 bytes), first 16 hex chars; block 0 chains to the empty string. Only full blocks are hashed.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Collection, Sequence


def chain_hashes(token_ids: Sequence[int], block_tokens: int = 64) -> list[str]:
    """One hex hash per full block of `token_ids`, each chained to the one before it."""
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
    out: list[str] = []
    prev = ""
    for start in range(0, len(token_ids) - block_tokens + 1, block_tokens):
        block = token_ids[start:start + block_tokens]
        try:
            payload = struct.pack(f"<{len(block)}i", *block)
        except struct.error as exc:
            raise ValueError(f"token ids must be int32 values; got a block starting at {start}: {exc}") from exc
        prev = hashlib.sha256(prev.encode("ascii") + payload).hexdigest()[:16]
        out.append(prev)
    return out


def cached_prefix_tokens(token_ids: Sequence[int], published: Collection[str], block_tokens: int = 64) -> int:
    """How many leading tokens of `token_ids` a replica publishing `published` holds (whole blocks)."""
    matched = 0
    for h in chain_hashes(token_ids, block_tokens):
        if h not in published:
            break
        matched += block_tokens
    return matched
