"""The prefix digest both sides agree on (the recipe lives in `headway.digest`).

Replicas publish `prefix_digest: {"block_tokens": 64, "hashes": [...]}` in /headway/state; the
router recomputes the same chain from a request's token ids to see how much of it a replica holds.
Hash of block i = sha256(hash of block i-1 as ASCII hex + the block's token ids as little-endian
int32 bytes), first 16 hex chars; block 0 chains to the root hash of the cache key (the empty string
when there is none: no adapter, no salt). Only full blocks are hashed.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from headway.digest import chain_hashes

__all__ = ["cached_prefix_tokens", "chain_hashes"]


def cached_prefix_tokens(token_ids: Sequence[int], published: Collection[str], block_tokens: int = 64,
                         *, root: str = "", chain: Sequence[str] | None = None) -> int:
    """How many leading tokens of `token_ids` a replica publishing `published` holds (whole blocks).

    `root` is where the chain starts: "" for the default cache, or the root the replica published
    for an adapter. `chain` is that chain when the caller has computed it already."""
    matched = 0
    for h in chain if chain is not None else chain_hashes(token_ids, block_tokens, root=root):
        if h not in published:
            break
        matched += block_tokens
    return matched
