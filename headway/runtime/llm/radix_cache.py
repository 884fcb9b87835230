"""Radix prefix cache: owns the mapping from token-id prefixes to KV slot indices.

A radix tree over token ids, token-granular (block size 1: one slot per token), with one
root per *isolation key* (adapter id, cache salt, ...): identical tokens under different keys
never share slots. Each node holds an edge (a run of token ids) and the slots of those
tokens. Sequences ``lock`` the node ending their cached prefix while they use it (the lock
count is raised on the whole path to the root), so it cannot be evicted. ``evict(n)``
removes least-recently-used *unlocked leaves* first and gives their slots back to the pool.

Slot accounting (kept incrementally, checked by ``check()``):
    evictable  = slots in nodes with lock count == 0
    locked     = slots in nodes with lock count  > 0
    evictable + locked == slots held by the tree
Engine-wide invariant (kept and asserted by ``kv_manager.KVManager``, the only caller):
    pool.free + cache.evictable + cache.locked + private == pool.total
where ``private`` counts slots held by running sequences and not (yet) in the tree.

``digest(block_tokens)`` gives the router a compact summary: for every cached prefix whose
length is a multiple of ``block_tokens``, a short hex hash chained block by block
(``prefix_block_hashes`` computes the same chain over a prompt).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any

from headway.digest import chain_hashes, chain_step, root_hash
from headway.runtime.llm.kv_pool import KVPool

prefix_block_hashes = chain_hashes  # the chain RadixCache.digest publishes (headway.digest)


def common_prefix_len(edge: list[int], tokens: Sequence[int], i: int) -> int:
    """Length of the common prefix of ``edge`` and ``tokens[i:]`` (edge[0] already matches);
    a whole-edge match is checked with one slice comparison (C speed)."""
    lim = min(len(edge), len(tokens) - i)
    if lim == len(edge) and edge == list(tokens[i : i + lim]):
        return lim
    m = 1
    while m < lim and edge[m] == tokens[i + m]:
        m += 1
    return m


def _path(node: RadixNode) -> list[int]:
    """Token ids from the root to the end of ``node``'s edge."""
    parts: list[list[int]] = []
    while node.parent is not None:
        parts.append(node.tokens)
        node = node.parent
    return [t for p in reversed(parts) for t in p]


class RadixNode:
    __slots__ = ("children", "key", "last_access", "lock_ref", "parent", "slots", "tokens")

    def __init__(
        self,
        key: Hashable,
        tokens: list[int],
        slots: list[int],
        parent: RadixNode | None,
        last_access: int,
    ) -> None:
        self.key = key
        self.tokens = tokens  # edge label
        self.slots = slots  # one slot per token of the edge
        self.children: dict[int, RadixNode] = {}
        self.parent = parent
        self.lock_ref = 0
        self.last_access = last_access

    @property
    def is_root(self) -> bool:
        return self.parent is None

    def __lt__(self, other: RadixNode) -> bool:  # heap tie-break
        return self.last_access < other.last_access

    def __repr__(self) -> str:
        return f"RadixNode(len={len(self.tokens)}, lock={self.lock_ref}, kids={len(self.children)})"


# (key, the token path from the root to the leaf's end, the leaf's slots = the path's tail)
OnEvict = Callable[[Hashable, list[int], list[int]], object]


def iter_leaves(roots: Iterable[Any]) -> Iterator[Any]:
    """Every leaf below `roots` (tree nodes with a `children` dict), depth first; the radix cache
    and the host offload tier share it."""
    for r in roots:
        stack = list(r.children.values())
        while stack:
            nd = stack.pop()
            if nd.children:
                stack.extend(nd.children.values())
            else:
                yield nd


class RadixCache:
    """Token-granular radix prefix cache over a ``KVPool``."""

    def __init__(self, pool: KVPool, on_evict: OnEvict | None = None) -> None:
        self.pool = pool
        self.on_evict = on_evict  # sees each evicted leaf before its slots are freed (kv_offload)
        self._roots: dict[Hashable, RadixNode] = {}
        self._clock = 0
        self._evictable = 0
        self._locked = 0

    # ---- counters -------------------------------------------------------------------
    @property
    def evictable(self) -> int:
        """Slots in the tree that no sequence uses (lock count 0)."""
        return self._evictable

    @property
    def locked(self) -> int:
        """Slots in the tree on some locked path."""
        return self._locked

    @property
    def size(self) -> int:
        return self._evictable + self._locked

    @property
    def num_keys(self) -> int:
        """Isolation keys (adapter, salt, private) with something cached under them."""
        return len(self._roots)

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def root(self, key: Hashable = None) -> RadixNode:
        r = self._roots.get(key)
        if r is None:
            r = RadixNode(key, [], [], None, 0)
            r.lock_ref = 1  # the root is never evicted
            self._roots[key] = r
        return r

    def nodes(self) -> Iterator[RadixNode]:
        """Every node below the roots (the roots hold nothing), depth first."""
        for r in self._roots.values():
            stack = list(r.children.values())
            while stack:
                nd = stack.pop()
                yield nd
                stack.extend(nd.children.values())

    def device_segments(self) -> Iterator[tuple[Hashable, list[int], list[int], int]]:
        """``(key, token path to the end of a node, the node's slots, the path position they
        start at)`` for every node (the tests check each slot's K/V against its path)."""
        for key, r in self._roots.items():
            stack: list[tuple[RadixNode, list[int]]] = [(c, []) for c in r.children.values()]
            while stack:
                nd, head = stack.pop()
                path = head + nd.tokens
                yield key, path, nd.slots, len(head)
                stack.extend((c, path) for c in nd.children.values())

    # ---- lookup ---------------------------------------------------------------------
    def _split(self, node: RadixNode, at: int) -> RadixNode:
        """Split ``node``'s edge after ``at`` tokens; returns the new upper node."""
        assert node.parent is not None and 0 < at < len(node.tokens)
        upper = RadixNode(node.key, node.tokens[:at], node.slots[:at], node.parent, node.last_access)
        upper.lock_ref = node.lock_ref  # same path, same locks: totals unchanged
        node.parent.children[upper.tokens[0]] = upper
        node.tokens = node.tokens[at:]
        node.slots = node.slots[at:]
        node.parent = upper
        upper.children[node.tokens[0]] = node
        return upper

    def match(self, key: Hashable, tokens: Sequence[int]) -> tuple[int, list[int], RadixNode]:
        """Longest cached prefix of ``tokens`` under ``key``.

        Returns ``(num_matched, slots, node)``: ``slots`` are the cached prefix's slots in
        position order and ``node`` ends exactly at that prefix (an edge is split if the match
        ends inside it) -- pass it to ``lock``. (Hit counters: ``KVManager``, once per request.)"""
        now = self._tick()
        # a key never inserted gets a detached empty root: a lookup alone (a request aborted
        # before any KV was written, a cache-off request's private key) leaves nothing behind
        node = self._roots.get(key) or RadixNode(key, [], [], None, 0)
        node.last_access = now
        slots: list[int] = []
        i, n = 0, len(tokens)
        while i < n:
            child = node.children.get(tokens[i])
            if child is None:
                break
            edge = child.tokens
            m = common_prefix_len(edge, tokens, i)
            if m < len(edge):
                child = self._split(child, m)
            child.last_access = now
            slots.extend(child.slots)
            node = child
            i += m
            if m < len(edge):
                break
        return i, slots, node

    def peek(self, key: Hashable, tokens: Sequence[int]) -> int:
        """Length of the longest cached prefix, without touching LRU order, counters or
        the tree shape (used to order the waiting queue)."""
        node = self._roots.get(key)
        if node is None:
            return 0
        i, n = 0, len(tokens)
        while i < n:
            child = node.children.get(tokens[i])
            if child is None:
                break
            edge = child.tokens
            m = common_prefix_len(edge, tokens, i)
            i += m
            if m < len(edge):
                break
            node = child
        return i

    # ---- insert ---------------------------------------------------------------------
    def insert(self, key: Hashable, tokens: Sequence[int], slots: Sequence[int]) -> int:
        """Cache ``tokens`` -> ``slots`` under ``key``; the tree takes ownership of the slots.

        Where a prefix is already cached, the tree keeps its own slots and any given slot
        that differs from the cached one goes back to the pool (dedupe). Returns the number
        of leading tokens that were already cached. Call ``match`` afterwards to get the
        canonical slots for the whole prefix."""
        if len(tokens) != len(slots):
            raise ValueError(f"insert: {len(tokens)} tokens but {len(slots)} slots")
        now = self._tick()
        node = self.root(key)
        node.last_access = now
        i, n = 0, len(tokens)
        dup: list[int] = []
        cached = n
        while i < n:
            child = node.children.get(tokens[i])
            if child is None:
                new = RadixNode(key, list(tokens[i:]), list(slots[i:]), node, now)
                node.children[tokens[i]] = new  # a new node is unlocked
                self._evictable += n - i
                cached = i
                break
            edge = child.tokens
            m = common_prefix_len(edge, tokens, i)
            if m < len(edge):
                child = self._split(child, m)
            child.last_access = now
            for a, b in zip(child.slots, slots[i : i + m]):
                if a != b:
                    dup.append(b)
            node = child
            i += m
        if dup:
            self.pool.free(dup)
        return cached

    # ---- locking --------------------------------------------------------------------
    def lock(self, node: RadixNode) -> None:
        """Raise the lock count of ``node`` and its ancestors (protects them from eviction)."""
        while node.parent is not None:
            if node.lock_ref == 0:
                self._evictable -= len(node.slots)
                self._locked += len(node.slots)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: RadixNode) -> None:
        while node.parent is not None:
            if node.lock_ref <= 0:
                raise ValueError("unlock of a node that is not locked")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._evictable += len(node.slots)
                self._locked -= len(node.slots)
            node = node.parent

    # ---- eviction -------------------------------------------------------------------
    def _leaves(self) -> list[RadixNode]:
        return [nd for nd in iter_leaves(self._roots.values()) if nd.lock_ref == 0]

    def evict(self, n: int) -> int:
        """Free at least ``n`` slots (if that many are evictable) by removing LRU unlocked
        leaves; returns the number of slots given back to the pool."""
        if n <= 0 or self._evictable == 0:
            return 0
        heap = [(nd.last_access, id(nd), nd) for nd in self._leaves()]
        heapq.heapify(heap)
        freed = 0
        while freed < n and heap:
            _, _, nd = heapq.heappop(heap)
            parent = nd.parent
            assert parent is not None and nd.lock_ref == 0 and not nd.children
            if self.on_evict is not None:
                self.on_evict(nd.key, _path(nd), nd.slots)
            del parent.children[nd.tokens[0]]
            self.pool.free(nd.slots)
            freed += len(nd.slots)
            self._evictable -= len(nd.slots)
            if parent.is_root:
                if not parent.children:
                    del self._roots[parent.key]
            elif not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return freed

    def clear(self) -> int:
        """Evict everything evictable."""
        return self.evict(self._evictable)

    # ---- router digest --------------------------------------------------------------
    def digest(self, block_tokens: int = 64) -> list[str]:
        """Hashes of every cached prefix whose length is a multiple of ``block_tokens``
        (see ``prefix_block_hashes``), deepest-first order not guaranteed; no duplicates."""
        if block_tokens <= 0:
            raise ValueError(f"block_tokens must be > 0, got {block_tokens}")
        out: list[str] = []
        for key, r in self._roots.items():
            stack: list[tuple[RadixNode, str, list[int]]] = [
                (c, root_hash(key), []) for c in r.children.values()
            ]
            while stack:
                nd, h, pending = stack.pop()
                buf = pending + nd.tokens
                j = 0
                while len(buf) - j >= block_tokens:
                    h = chain_step(h, buf[j : j + block_tokens])
                    out.append(h)
                    j += block_tokens
                rest = buf[j:]
                for c in nd.children.values():
                    stack.append((c, h, rest))
        return out

    # ---- checks ---------------------------------------------------------------------
    def check(self) -> None:
        """Recount everything from the tree and assert the incremental counters agree."""
        ev = lk = 0
        for r in self._roots.values():
            stack = list(r.children.values())
            while stack:
                nd = stack.pop()
                assert len(nd.tokens) == len(nd.slots) > 0, nd
                assert nd.lock_ref >= 0
                kid_locks = sum(c.lock_ref for c in nd.children.values())
                assert nd.lock_ref >= kid_locks, "a child holds more locks than its parent"
                for t, c in nd.children.items():
                    assert c.tokens[0] == t and c.parent is nd
                if nd.lock_ref:
                    lk += len(nd.slots)
                else:
                    ev += len(nd.slots)
                for s in nd.slots:
                    assert self.pool.is_allocated(s), f"tree slot {s} is free in the pool"
                stack.extend(nd.children.values())
        assert ev == self._evictable, (ev, self._evictable)
        assert lk == self._locked, (lk, self._locked)
