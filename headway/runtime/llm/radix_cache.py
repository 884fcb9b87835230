"""Radix prefix cache: owns the mapping from token-id prefixes to KV slot indices.

A radix tree over token ids, token-granular (block size 1: one slot per token), with one
root per *isolation key* (adapter id, cache salt, ...): identical tokens under different keys
never share slots. Each node holds an edge (a run of token ids), the device slots of those
tokens (``slots``) and, with a host offload tier (kv_offload.py), possibly a host copy of their
K/V (``host``). A node is *on device* when it has slots, *host-only* when it has only a host
copy: evicting a device leaf with a tier moves it to the host and keeps it in the tree, so the
one tree says what is cached where. Sequences ``lock`` the node ending their cached prefix
while they use it (the lock count is raised on the whole path to the root), so it cannot be
evicted. ``evict(n)`` takes least-recently-used unlocked *device leaves* first and gives their
slots back to the pool.

Tree invariants (``check()``):
    every node is on device or in host memory (or both); ``slots``/``host`` are empty or one
    per token; a device node's parent is a root or on device (device nodes form the top of the
    tree, host-only ones hang below them); host-only nodes are never locked
Slot accounting (kept incrementally, checked by ``check()``):
    evictable  = device slots in nodes with lock count == 0
    locked     = device slots in nodes with lock count  > 0
    evictable + locked == device slots held by the tree
Engine-wide invariant (kept and asserted by ``kv_manager.KVManager``, the only caller):
    pool.free + cache.evictable + cache.locked + private == pool.total
where ``private`` counts slots held by running sequences and not (yet) in the tree.

``digest(block_tokens)`` gives the router a compact summary of the device-cached prefixes: for
every one whose length is a multiple of ``block_tokens``, a short hex hash chained block by
block (``prefix_block_hashes`` computes the same chain over a prompt).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Protocol

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


class RadixNode:
    __slots__ = ("children", "host", "key", "last_access", "lock_ref", "parent", "slots", "tokens")

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
        self.slots = slots  # device slot per token of the edge, or [] (host-only)
        self.host: list[int] = []  # host-tier slot per token, or [] (no host copy)
        self.children: dict[int, RadixNode] = {}
        self.parent = parent
        self.lock_ref = 0
        self.last_access = last_access

    @property
    def is_root(self) -> bool:
        return self.parent is None

    @property
    def on_device(self) -> bool:
        return bool(self.slots)

    def __lt__(self, other: RadixNode) -> bool:  # heap tie-break
        return self.last_access < other.last_access

    def __repr__(self) -> str:
        where = ("device" if self.slots else "") + ("+host" if self.host else "")
        return f"RadixNode(len={len(self.tokens)}, {where}, lock={self.lock_ref}, kids={len(self.children)})"


class HostTier(Protocol):
    """What the cache needs from a host offload tier (kv_offload.KVOffloadTier)."""

    def store(self, node: RadixNode) -> list[int]:
        """Host slots holding the K/V of ``node``'s first tokens (all of them when it fits),
        copied from its device slots unless ``node.host`` already holds them."""
        ...

    def free(self, host_slots: list[int]) -> None:
        ...


class RadixCache:
    """Token-granular radix prefix cache over a ``KVPool`` (see module docstring)."""

    def __init__(self, pool: KVPool, host: HostTier | None = None) -> None:
        self.pool = pool
        self.host = host  # evicted device leaves move here and stay in the tree as host-only
        self._roots: dict[Hashable, RadixNode] = {}
        self._clock = 0
        self._evictable = 0
        self._locked = 0

    # ---- counters -------------------------------------------------------------------
    @property
    def evictable(self) -> int:
        """Device slots in the tree that no sequence uses (lock count 0)."""
        return self._evictable

    @property
    def locked(self) -> int:
        """Device slots in the tree on some locked path."""
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
        """``(key, token path to the end of a node, the node's device slots, the path position
        they start at)`` for every node on device (the tests check each slot's K/V)."""
        for key, r in self._roots.items():
            stack: list[tuple[RadixNode, list[int]]] = [(c, []) for c in r.children.values()]
            while stack:
                nd, head = stack.pop()
                if nd.slots:
                    path = head + nd.tokens
                    yield key, path, nd.slots, len(head)
                    stack.extend((c, path) for c in nd.children.values())

    # ---- lookup ---------------------------------------------------------------------
    def _split(self, node: RadixNode, at: int) -> RadixNode:
        """Split ``node``'s edge after ``at`` tokens; returns the new upper node."""
        assert node.parent is not None and 0 < at < len(node.tokens)
        upper = RadixNode(node.key, node.tokens[:at], node.slots[:at], node.parent, node.last_access)
        upper.host = node.host[:at]
        upper.lock_ref = node.lock_ref  # same path, same locks: totals unchanged
        node.parent.children[upper.tokens[0]] = upper
        node.tokens = node.tokens[at:]
        node.slots = node.slots[at:]
        node.host = node.host[at:]
        node.parent = upper
        upper.children[node.tokens[0]] = node
        return upper

    def match(self, key: Hashable, tokens: Sequence[int]) -> tuple[int, list[int], RadixNode]:
        """Longest prefix of ``tokens`` cached on device under ``key``.

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
            if child is None or not child.slots:
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
        """Length of the longest prefix cached on device, without touching LRU order or the
        tree shape (used to order the waiting queue)."""
        node = self._roots.get(key)
        if node is None:
            return 0
        i, n = 0, len(tokens)
        while i < n:
            child = node.children.get(tokens[i])
            if child is None or not child.slots:
                break
            edge = child.tokens
            m = common_prefix_len(edge, tokens, i)
            i += m
            if m < len(edge):
                break
            node = child
        return i

    # ---- the host tier: what continues a device match, and bringing it back ---------
    def _host_run(self, key: Hashable, tokens: Sequence[int], start: int) -> tuple[RadixNode | None, int]:
        """The node ending at position ``start`` of ``tokens`` on device (None if the device
        path does not end there on a node boundary), and how many tokens from ``start`` on
        host-only nodes continue it."""
        node = self._roots.get(key)
        i = 0
        while node is not None and i < start:
            child = node.children.get(tokens[i])
            if child is None or not child.slots or i + len(child.tokens) > start:
                return None, 0
            if common_prefix_len(child.tokens, tokens, i) < len(child.tokens):
                return None, 0
            node, i = child, i + len(child.tokens)
        if node is None:
            return None, 0
        top, run, n = node, 0, len(tokens)
        while i + run < n:
            child = node.children.get(tokens[i + run])
            if child is None or child.slots:
                break
            m = common_prefix_len(child.tokens, tokens, i + run)
            run += m
            if m < len(child.tokens):
                break
            node = child
        return top, run

    def host_match(self, key: Hashable, tokens: Sequence[int], start: int) -> int:
        """Tokens from ``start`` on that host-only nodes hold, continuing the device prefix
        ``tokens[:start]`` (no side effects)."""
        return self._host_run(key, tokens, start)[1]

    def restore(self, key: Hashable, tokens: Sequence[int], start: int, slots: list[int],
                load: Callable[[list[int], list[int]], None]) -> None:
        """Bring the host-only run ``tokens[start:start+len(slots)]`` back on device into
        ``slots`` (``load(host_slots, device_slots)`` copies the K/V): its nodes become device
        nodes (keeping their host copy), unlocked. ``host_match`` must cover the run."""
        top, run = self._host_run(key, tokens, start)
        if top is None or run < len(slots):
            raise ValueError(f"restore: the host holds {run} of {len(slots)} tokens from {start}")
        now = self._tick()
        node, i, end = top, start, start + len(slots)
        host: list[int] = []
        while i < end:
            child = node.children[tokens[i]]
            if i + len(child.tokens) > end:
                child = self._split(child, end - i)
            assert child.host and not child.slots
            child.slots = slots[i - start : i - start + len(child.tokens)]
            host += child.host
            child.last_access = now
            self._evictable += len(child.slots)
            node, i = child, i + len(child.tokens)
        load(host, slots)  # one batched copy

    def drop_host(self, node: RadixNode) -> RadixNode | None:
        """Forget ``node``'s host copy (the tier's own eviction; no child may hold one). A
        host-only node leaves the tree. Returns its parent when that now is a host leaf."""
        assert node.host and not any(c.host for c in node.children.values())
        self.host_free(node.host)
        node.host = []
        parent = node.parent
        assert parent is not None
        if not node.slots:  # host-only: it has no children (they would be host-only, with a copy)
            assert not node.children
            del parent.children[node.tokens[0]]
            if parent.is_root and not parent.children:
                del self._roots[parent.key]
        if parent.host and not any(c.host for c in parent.children.values()):
            return parent
        return None

    def host_free(self, host_slots: list[int]) -> None:
        if host_slots:
            assert self.host is not None
            self.host.free(host_slots)

    # ---- insert ---------------------------------------------------------------------
    def insert(self, key: Hashable, tokens: Sequence[int], slots: Sequence[int]) -> int:
        """Cache ``tokens`` -> ``slots`` under ``key``; the tree takes ownership of the slots.

        Where a prefix is already cached on device, the tree keeps its own slots and any given
        slot that differs from the cached one goes back to the pool (dedupe); a host-only node
        on the path takes the given slots (it is on device again). Returns the number of
        leading tokens that were already cached on device. Call ``match`` afterwards to get
        the canonical slots for the whole prefix."""
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
                cached = min(cached, i)
                break
            edge = child.tokens
            m = common_prefix_len(edge, tokens, i)
            if m < len(edge):
                child = self._split(child, m)
            child.last_access = now
            if child.slots:
                for a, b in zip(child.slots, slots[i : i + m]):
                    if a != b:
                        dup.append(b)
            else:  # host-only: on device again with these slots
                child.slots = list(slots[i : i + m])
                self._evictable += m
                cached = min(cached, i)
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
    def _device_leaves(self) -> list[RadixNode]:
        """Unlocked device nodes without a device child (host-only children may hang below)."""
        return [nd for nd in self.nodes()
                if nd.slots and nd.lock_ref == 0 and not any(c.slots for c in nd.children.values())]

    def evict(self, n: int) -> int:
        """Free at least ``n`` device slots (if that many are evictable) from LRU unlocked
        device leaves; returns the number of slots given back to the pool. With a host tier a
        leaf's K/V moves there first (as much of its head as the tier holds) and the node stays
        in the tree, host-only; what the tier cannot hold leaves the tree."""
        if n <= 0 or self._evictable == 0:
            return 0
        heap = [(nd.last_access, id(nd), nd) for nd in self._device_leaves()]
        heapq.heapify(heap)
        freed = 0
        while freed < n and heap:
            _, _, nd = heapq.heappop(heap)
            parent = nd.parent
            assert parent is not None and nd.lock_ref == 0 and nd.slots
            freed += len(nd.slots)
            self._evictable -= len(nd.slots)
            host = self.host.store(nd) if self.host is not None else []
            if len(host) < len(nd.tokens):  # the tail past what the host holds leaves the tree
                upper = self._split(nd, len(host)) if host else None
                self._remove(nd)
                if upper is not None:
                    nd = upper
            if host:
                self.pool.free(nd.slots)
                nd.slots, nd.host = [], host
            if parent.is_root:
                if not parent.children:
                    del self._roots[parent.key]
            elif parent.lock_ref == 0 and not any(c.slots for c in parent.children.values()):
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return freed

    def _remove(self, node: RadixNode) -> None:
        """Take ``node`` and its subtree out of the tree, freeing their device and host slots
        (only ``node`` itself may be on device: it is an unlocked device leaf)."""
        assert node.parent is not None
        del node.parent.children[node.tokens[0]]
        self.pool.free(node.slots)
        stack = [node]
        while stack:
            nd = stack.pop()
            self.host_free(nd.host)
            stack.extend(nd.children.values())

    def clear(self) -> int:
        """Evict everything evictable."""
        return self.evict(self._evictable)

    # ---- router digest --------------------------------------------------------------
    def digest(self, block_tokens: int = 64) -> list[str]:
        """Hashes of every prefix cached on device whose length is a multiple of
        ``block_tokens`` (see ``prefix_block_hashes``), deepest-first order not guaranteed;
        no duplicates."""
        if block_tokens <= 0:
            raise ValueError(f"block_tokens must be > 0, got {block_tokens}")
        out: list[str] = []
        for key, r in self._roots.items():
            stack: list[tuple[RadixNode, str, list[int]]] = [
                (c, root_hash(key), []) for c in r.children.values()
            ]
            while stack:
                nd, h, pending = stack.pop()
                if not nd.slots:
                    continue
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
        """Recount everything from the tree and assert the invariants and counters agree."""
        ev = lk = 0
        for r in self._roots.values():
            assert r.children, "an empty root was kept"
        for nd in self.nodes():
            assert nd.tokens and len(nd.slots) in (0, len(nd.tokens)), nd
            assert len(nd.host) in (0, len(nd.tokens)) and (nd.slots or nd.host), nd
            assert nd.parent is not None
            if nd.slots:
                assert nd.parent.is_root or nd.parent.slots, "a device node below a host-only one"
            else:
                assert nd.lock_ref == 0, "a host-only node is locked"
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
        assert ev == self._evictable, (ev, self._evictable)
        assert lk == self._locked, (lk, self._locked)
