"""KV manager: the one owner of the engine's KV memory.

It holds the slot pool (``KVPool``: which slot indices are free), the radix prefix cache
(``RadixCache``: which token prefixes own which slots), the optional host offload tier
(``KVOffloadTier``: K/V of prefixes evicted from the pool) and, per sequence, a ``SeqKV``
record: the slots of its computed tokens, how many leading ones the cache owns, the cache
node it holds a lock on, and how many were scheduled in the forward now in flight. Nothing
else allocates, frees, locks or moves a KV slot; the scheduler decides *what* runs and calls
the verbs below.

Verbs (each keeps the invariants; ``check()`` recounts and asserts them):
    peek(key, tokens)          cached prefix length, no side effects (orders the waiting queue)
    admit(seq)                 match the cache, restore from the host tier, lock the prefix
    make_room(n) / allocate(seq, n)   evict unlocked LRU prefixes (offloading them) for room;
                               give ``seq`` n fresh slots (None when the pool cannot)
    written(seq)               the forward in flight wrote its K/V
    commit(seq) / fork(p, c)   move the computed prefix into the cache under a lock; a fork
                               shares it (n > 1)
    drop_uncommitted(seq)      free K/V past the last known token (rejected proposals)
    release(seq, keep_in_cache)   give everything back; computed tokens may stay cached
    evict(n) / clear()         free evictable cache slots
    count_prompt(n, cached)    the prefix-cache hit counters (once per request)

Invariants, asserted by ``check()``:
    pool.free + cache.evictable + cache.locked + private == pool.total
    where private == sum over live records of len(slots) - cached_len;
    per record: slots[:cached_len] are owned by the cache under ``lock`` (locked by this
    record), slots[cached_len:] are private to it; len(slots) == tokens whose K/V is written
    or in flight; no slot is owned twice (by two records, or by a record and the tree);
    the tree's own invariants (``RadixCache.check``: device nodes on top, host-only ones below)
    and the host tier's (``KVOffloadTier.check``: every host slot in the tree once, used ==
    host slots in the tree). The host tier keeps no tree of its own: an evicted device leaf
    stays in the cache's tree host-only, and ``admit`` continues a device match through it.

Threading: every verb runs on the engine's step thread, between forwards.
"""

from __future__ import annotations

from collections.abc import Hashable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from headway.runtime.llm.kv_offload import KVOffloadTier
from headway.runtime.llm.kv_pool import KVPool
from headway.runtime.llm.radix_cache import RadixCache, RadixNode

if TYPE_CHECKING:
    from headway.runtime.llm.sequence import Sequence


@dataclass(eq=False, slots=True)
class SeqKV:
    """One sequence's KV holding; only ``KVManager`` writes it (see the module docstring)."""

    slots: list[int] = field(default_factory=list)  # per computed token, position order
    cached_len: int = 0  # leading slots owned by the cache (under ``lock``)
    lock: RadixNode | None = None  # cache node this sequence holds a lock on
    inflight: int = 0  # trailing slots scheduled in the forward in flight (K/V not written yet)

    @property
    def private(self) -> int:
        return len(self.slots) - self.cached_len


class KVManager:
    """The pool, the prefix cache, the host tier and every sequence's slots (module docstring)."""

    def __init__(self, num_slots: int, offload: KVOffloadTier | None = None) -> None:
        self.pool = KVPool(num_slots)
        self.cache = RadixCache(self.pool)
        self.offload = offload
        if offload is not None:
            offload.bind(self.cache)  # evicted prefixes move to the host tier, in the same tree
        self._private = 0
        self._held: dict[int, SeqKV] = {}  # id -> every record holding slots or a lock
        self.hit_tokens = 0  # prompt tokens found cached, once per request (at its admission)
        self.query_tokens = 0  # prompt tokens looked up, once per request

    # ---- figures --------------------------------------------------------------------
    @property
    def total(self) -> int:
        return self.pool.total

    @property
    def num_free(self) -> int:
        return self.pool.num_free

    @property
    def evictable(self) -> int:
        return self.cache.evictable

    @property
    def locked(self) -> int:
        return self.cache.locked

    @property
    def private(self) -> int:
        """Slots held by sequences and not (yet) in the cache."""
        return self._private

    @property
    def available(self) -> int:
        """Slots an allocation could get now: free plus evictable."""
        return self.pool.num_free + self.cache.evictable

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

    def count_prompt(self, num_prompt: int, num_cached: int) -> None:
        """Count one request's prompt lookup (its first admission; n > 1 counts once)."""
        self.query_tokens += num_prompt
        self.hit_tokens += num_cached

    def digest(self, block_tokens: int = 64) -> list[str]:
        return self.cache.digest(block_tokens)

    def peek(self, key: Hashable, tokens: Seq[int]) -> int:
        return self.cache.peek(key, tokens)

    # ---- admission ------------------------------------------------------------------
    def admit(self, seq: Sequence, *, record: bool = True) -> int:
        """Give a waiting ``seq`` the longest cached prefix of its known tokens but the last
        (continued from the host tier, restored into fresh slots), locked; returns its length.
        ``record``: count the host-tier lookup (a request's first admission)."""
        rec = seq.kv
        assert not rec.slots and rec.lock is None, "admit: the sequence already holds KV"
        tokens = seq.token_slice(0, seq.num_tokens - 1)
        m, slots, node = self.cache.match(seq.cache_key, tokens)
        self.cache.lock(node)
        if self.offload is not None:
            m, slots, node = self._restore(seq.cache_key, tokens, m, slots, node, record)
        rec.slots, rec.cached_len, rec.lock = slots, m, node
        self._held[id(rec)] = rec
        return m

    def _restore(self, key: Hashable, tokens: list[int], m: int, slots: list[int], node: RadixNode,
                 record: bool) -> tuple[int, list[int], RadixNode]:
        """After the cache matched ``m`` tokens on device (``node`` locked): bring back the
        host-only run that continues them into fresh slots and return the longer match (its
        node locked instead of ``node``)."""
        tier = self.offload
        assert tier is not None
        want = self.cache.host_match(key, tokens, m)
        if record:
            tier.lookup_tokens += len(tokens) - m
        if want == 0 or not self.make_room(want):
            return m, slots, node
        n = self.cache.host_match(key, tokens, m)  # making room dropped host copies: maybe fewer now
        if n == 0:
            return m, slots, node
        fresh = self.pool.alloc(n)
        assert fresh is not None  # make_room(want) left >= want >= n free
        self.cache.restore(key, tokens, m, fresh, tier.load)
        m2, slots2, node2 = self.cache.match(key, tokens[: m + n])
        assert m2 == m + n
        self.cache.lock(node2)
        self.cache.unlock(node)
        return m2, slots2, node2

    # ---- allocation -----------------------------------------------------------------
    def make_room(self, n: int) -> bool:
        """Evict unlocked cached prefixes (LRU; into the host tier when there is one) until
        ``n`` slots are free; False if even that cannot free enough."""
        short = n - self.pool.num_free
        if short > 0:
            self.cache.evict(short)
        return self.pool.num_free >= n

    def allocate(self, seq: Sequence, n: int) -> list[int] | None:
        """``n`` fresh slots appended to ``seq``'s, to be written by the next forward (in
        flight until ``written``); None, and nothing changed but evictions, when short."""
        if not self.make_room(n):
            return None
        out = self.pool.alloc(n)
        assert out is not None
        rec = seq.kv
        rec.slots.extend(out)
        rec.inflight = n
        self._private += n
        self._held[id(rec)] = rec
        return out

    def written(self, seq: Sequence) -> None:
        """The forward in flight has written ``seq``'s K/V."""
        seq.kv.inflight = 0

    # ---- the cache ------------------------------------------------------------------
    def commit(self, seq: Sequence) -> None:
        """Move ``seq``'s computed tokens into the cache and hold them by a lock (before a fork)."""
        rec = seq.kv
        k = len(rec.slots)
        toks = seq.token_slice(0, k)
        self.cache.insert(seq.cache_key, toks, rec.slots)
        m, slots, node = self.cache.match(seq.cache_key, toks)
        assert m == k
        self.cache.lock(node)
        if rec.lock is not None:
            self.cache.unlock(rec.lock)
        self._private -= rec.private
        rec.slots, rec.cached_len, rec.lock = slots, k, node

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """``child`` shares ``parent``'s committed prefix (one more lock on it)."""
        p, c = parent.kv, child.kv
        assert p.private == 0 and p.lock is not None, "fork: commit the parent first"
        assert not c.slots and c.lock is None
        c.slots, c.cached_len, c.lock = list(p.slots), p.cached_len, p.lock
        self.cache.lock(p.lock)
        self._held[id(c)] = c

    def drop_uncommitted(self, seq: Sequence) -> None:
        """Free the slots past ``seq``'s last known token (K/V of rejected or cut proposals):
        a decoding sequence holds exactly ``num_tokens - 1`` computed tokens."""
        rec = seq.kv
        keep = max(seq.num_tokens - 1, rec.cached_len)
        if len(rec.slots) > keep:
            self.pool.free(rec.slots[keep:])
            self._private -= len(rec.slots) - keep
            del rec.slots[keep:]

    def release(self, seq: Sequence, keep_in_cache: bool) -> None:
        """Give back everything ``seq`` holds. ``keep_in_cache``: its tokens whose K/V is
        written go into the cache (evictable), the rest back to the pool."""
        rec = seq.kv
        valid = len(rec.slots) - rec.inflight  # tokens whose K/V is really written
        assert valid >= rec.cached_len
        if keep_in_cache and valid:
            self.cache.insert(seq.cache_key, seq.token_slice(0, valid), rec.slots[:valid])
            self.pool.free(rec.slots[valid:])
        else:
            self.pool.free(rec.slots[rec.cached_len :])
        self._private -= rec.private
        if rec.lock is not None:
            self.cache.unlock(rec.lock)
        rec.slots, rec.cached_len, rec.lock, rec.inflight = [], 0, None, 0
        self._held.pop(id(rec), None)

    def evict(self, n: int) -> int:
        return self.cache.evict(n)

    def clear(self) -> int:
        return self.cache.clear()

    # ---- checks ---------------------------------------------------------------------
    def check(self) -> None:
        """Recount from the tree and the records; assert every invariant in the module docstring."""
        self.cache.check()
        if self.offload is not None:
            self.offload.check()
        private = sum(r.private for r in self._held.values())
        assert private == self._private, (private, self._private)
        total = self.pool.num_free + self.cache.evictable + self.cache.locked + self._private
        assert total == self.pool.total, (
            f"slot leak: free={self.pool.num_free} evictable={self.cache.evictable} "
            f"locked={self.cache.locked} private={self._private} total={self.pool.total}"
        )
        owned: set[int] = set()
        for nd in self.cache.nodes():
            owned.update(nd.slots)
        tree = len(owned)
        for r in self._held.values():
            assert 0 <= r.inflight <= r.private and 0 <= r.cached_len <= len(r.slots)
            if r.cached_len:
                assert r.lock is not None and r.lock.lock_ref > 0
                assert set(r.slots[: r.cached_len]) <= owned, "a cached slot outside the tree"
            mine = r.slots[r.cached_len :]
            for s in mine:
                assert self.pool.is_allocated(s), f"private slot {s} is free in the pool"
            assert owned.isdisjoint(mine), "a private slot is also in the tree or another sequence"
            owned.update(mine)
            tree += len(mine)
        assert len(owned) == tree == self.pool.num_used, (len(owned), tree, self.pool.num_used)
