"""KV offload tier: owns a bounded host-memory pool of K/V that prefixes evicted from the
main KV pool move to, and come back from on a hit instead of being recomputed.

Its own preallocated tensor ``host[layer, slot, 2, kv_heads, head_dim]`` (pinned when the main
pool is on CUDA, plain CPU memory otherwise: there the tier is a second, larger, bounded pool
that outlives eviction from the main one), its own slot allocator (a ``KVPool``) and its own
LRU eviction, over a token-granular radix tree per isolation key (adapter, cache salt) like the
main ``RadixCache``.

How segments stay restorable. The main cache evicts *leaves*: the segment it drops is the tail
``[start, end)`` of a path whose head ``[0, start)`` is still in the main tree. The tier keeps
the whole path's token ids but K/V only for the tail; a head token's host slot is ``HOLLOW``
(its K/V is upstream, in the main pool). Evicting the head later fills those hollow slots. On
admission the prompt is matched against the main tree first (``m`` tokens), then against the
tier from position ``m`` on: only a run of non-hollow tokens starting at ``m`` is restored, so a
restored run always continues a prefix the main pool holds, and is inserted into the main tree
under the same key, as if computed. Keys never mix: each has its own root.

Invariants (``check()``; asserted in tests):
    pool.num_used == stored == sum of non-hollow slots in the tree     (used + free == capacity)
    every leaf holds at least one stored token (hollow-only leaves are pruned at once)
    every stored slot is allocated in the tier's pool and appears once

Threading: every method runs on the engine's step thread (offload from ``RadixCache.evict``
inside ``schedule()``, restore inside admission), between forwards, never racing one.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Sequence

import torch

from headway.runtime.llm.attention import KVCacheTensors
from headway.runtime.llm.kv_pool import KVPool
from headway.runtime.llm.radix_cache import common_prefix_len, iter_leaves

HOLLOW = -1  # a token whose K/V the tier does not hold (it is upstream, in the main pool)


class _Node:
    __slots__ = ("children", "key", "last_access", "parent", "slots", "stored", "tokens")

    def __init__(self, key: Hashable, tokens: list[int], slots: list[int], parent: _Node | None, now: int):
        self.key = key
        self.tokens = tokens
        self.slots = slots  # host slot per token, or HOLLOW
        self.children: dict[int, _Node] = {}
        self.parent = parent
        self.last_access = now
        self.stored = sum(1 for s in slots if s != HOLLOW)


class KVOffloadTier:
    """Bounded host-memory K/V for prefixes evicted from the main pool (see module docstring)."""

    def __init__(self, capacity_tokens: int, main: KVCacheTensors) -> None:
        if isinstance(capacity_tokens, bool) or not isinstance(capacity_tokens, int) or capacity_tokens <= 0:
            raise ValueError(f"kv_offload_tokens must be a positive int, got {capacity_tokens!r}")
        self.main = main
        ref = main.kv[0]
        self.capacity = capacity_tokens
        self.pool = KVPool(capacity_tokens)
        pin = ref.device.type == "cuda"
        # not zero-filled: a host slot is read only after an offload wrote it
        self.host = torch.empty((len(main.kv), capacity_tokens, *ref.shape[1:]), dtype=ref.dtype,
                                device="cpu", pin_memory=pin)
        self._roots: dict[Hashable, _Node] = {}
        self._clock = 0
        self.offloaded_tokens = 0  # tokens copied main -> host
        self.restored_tokens = 0  # tokens copied host -> main on admission (restore hits)
        self.lookup_tokens = 0  # prompt tokens past the main-cache match, looked up here
        self.dropped_tokens = 0  # stored tokens the tier's own LRU eviction dropped

    # ---- counters -------------------------------------------------------------------
    @property
    def used(self) -> int:
        return self.pool.num_used

    @property
    def missed_tokens(self) -> int:
        return self.lookup_tokens - self.restored_tokens

    @property
    def hit_rate(self) -> float:
        return self.restored_tokens / self.lookup_tokens if self.lookup_tokens else 0.0

    @property
    def nbytes(self) -> int:
        return self.host.numel() * self.host.element_size()

    def stats(self) -> dict[str, float | int]:
        return {"capacity_tokens": self.capacity, "used_tokens": self.used,
                "offloaded_tokens": self.offloaded_tokens, "restored_tokens": self.restored_tokens,
                "missed_tokens": self.missed_tokens, "dropped_tokens": self.dropped_tokens,
                "hit_rate": round(self.hit_rate, 4)}

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    # ---- the tree -------------------------------------------------------------------
    def _split(self, node: _Node, at: int) -> _Node:
        assert node.parent is not None and 0 < at < len(node.tokens)
        upper = _Node(node.key, node.tokens[:at], node.slots[:at], node.parent, node.last_access)
        node.parent.children[upper.tokens[0]] = upper
        node.tokens, node.slots = node.tokens[at:], node.slots[at:]
        node.stored -= upper.stored
        node.parent = upper
        upper.children[node.tokens[0]] = node
        return upper

    def _walk(self, key: Hashable, tokens: Sequence[int], start: int, limit: int, now: int | None) -> list[int]:
        """Host slots of the run of stored tokens ``tokens[start:start+limit]`` along the
        tier's path (empty if the path or a stored run does not reach ``start``). ``now``
        given: touches the LRU clock of the nodes walked."""
        node = self._roots.get(key)
        out: list[int] = []
        i, end = 0, min(len(tokens), start + limit)
        while node is not None and i < end:
            child = node.children.get(tokens[i])
            if child is None:
                break
            m = common_prefix_len(child.tokens, tokens, i)
            if now is not None:
                child.last_access = now
            for j in range(max(0, start - i), min(m, end - i)):
                s = child.slots[j]
                if s == HOLLOW:
                    return out
                out.append(s)
            if m < len(child.tokens):
                break
            node, i = child, i + m
        return out

    def match(self, key: Hashable, tokens: Sequence[int], start: int) -> int:
        """How many tokens from position ``start`` on the tier can restore (no side effects)."""
        return len(self._walk(key, tokens, start, len(tokens), None))

    def _missing(self, key: Hashable, path: Sequence[int], start: int, now: int) -> int:
        """Tokens of ``path[start:]`` the tier does not store yet; touches the path's LRU clock."""
        have = self._walk(key, path, start, len(path), now)
        return len(path) - start - len(have) if len(have) < len(path) - start else 0

    # ---- offload (called by RadixCache.evict with a leaf segment about to be freed) ---
    def offload(self, key: Hashable, path: Sequence[int], main_slots: Sequence[int]) -> int:
        """Copy the K/V of ``path[-len(main_slots):]`` (main pool slots ``main_slots``) into the
        tier, keyed by the whole token ``path`` under ``key``; returns the tokens copied. A
        segment longer than the tier keeps its head (a prefix stays restorable). Evicts the
        tier's least recently used leaves for room."""
        start = len(path) - len(main_slots)
        if start < 0:
            raise ValueError(f"offload: {len(main_slots)} slots for a path of {len(path)} tokens")
        end = min(len(path), start + self.capacity)
        path = list(path[:end])
        now = self._tick()
        for _ in range(8):  # eviction may drop part of the path itself: recount (bounded)
            need = self._missing(key, path, start, now)
            if need <= self.pool.num_free or not self._evict(need - self.pool.num_free):
                break
        need = self._missing(key, path, start, now)
        if need == 0 or need > self.pool.num_free:
            return 0
        src: list[int] = []
        dst: list[int] = []
        node = self._roots.get(key)
        if node is None:
            node = self._roots[key] = _Node(key, [], [], None, 0)
        i = 0
        while i < end:
            child = node.children.get(path[i])
            if child is None:
                slots = [HOLLOW] * max(0, start - i)
                fresh = self.pool.alloc(end - max(i, start))
                assert fresh is not None
                slots += fresh
                src += main_slots[max(i, start) - start : end - start]
                dst += fresh
                node.children[path[i]] = _Node(key, path[i:], slots, node, now)
                break
            m = common_prefix_len(child.tokens, path, i)
            if m < len(child.tokens):
                child = self._split(child, m)
            child.last_access = now
            for j in range(max(0, start - i), m):
                if child.slots[j] == HOLLOW:
                    got = self.pool.alloc(1)
                    assert got is not None  # need <= free: counted above
                    h = got[0]
                    child.slots[j] = h
                    child.stored += 1
                    src.append(main_slots[i + j - start])
                    dst.append(h)
            node, i = child, i + m
        self._copy_out(src, dst)
        self.offloaded_tokens += len(dst)
        return len(dst)

    def _evict(self, n: int) -> int:
        """Drop at least ``n`` stored tokens (LRU leaves first); returns the number dropped."""
        heap = [(nd.last_access, id(nd), nd) for nd in iter_leaves(self._roots.values())]
        heapq.heapify(heap)
        freed = 0
        while freed < n and heap:
            _, _, nd = heapq.heappop(heap)
            got, leaf = self._remove_leaf(nd)
            freed += got
            if leaf is not None:
                heapq.heappush(heap, (leaf.last_access, id(leaf), leaf))
        self.dropped_tokens += freed
        return freed

    def _remove_leaf(self, nd: _Node) -> tuple[int, _Node | None]:
        """Remove leaf ``nd`` and every ancestor it leaves childless with nothing stored;
        returns the tokens freed and the ancestor that became a leaf holding K/V, if any."""
        freed = 0
        while True:
            assert nd.parent is not None and not nd.children
            stored = [s for s in nd.slots if s != HOLLOW]
            self.pool.free(stored)
            freed += len(stored)
            parent = nd.parent
            del parent.children[nd.tokens[0]]
            if parent.parent is None:  # a root
                if not parent.children:
                    del self._roots[parent.key]
                return freed, None
            if parent.children:
                return freed, None
            if parent.stored:
                return freed, parent
            nd = parent

    # ---- restore --------------------------------------------------------------------
    def restore(self, key: Hashable, tokens: Sequence[int], start: int, main_slots: Sequence[int]) -> None:
        """Copy the stored K/V of ``tokens[start:start+len(main_slots)]`` into ``main_slots``
        (all of them must be stored: ``match`` said so, nothing ran in between)."""
        now = self._tick()
        host = self._walk(key, tokens, start, len(main_slots), now)
        if len(host) != len(main_slots):
            raise ValueError(f"restore: the tier stores {len(host)} of {len(main_slots)} tokens from {start}")
        self._copy_in(host, list(main_slots))
        self.restored_tokens += len(host)

    # ---- copies (one batched index op per layer) ------------------------------------
    def _copy_out(self, main_slots: list[int], host_slots: list[int]) -> None:
        if not host_slots:
            return
        kv = self.main.kv
        idx = torch.tensor(main_slots, dtype=torch.int64, device=kv[0].device)
        with torch.inference_mode():
            staged = torch.stack([t.index_select(0, idx) for t in kv]).to("cpu")
            self.host.index_copy_(1, torch.tensor(host_slots, dtype=torch.int64), staged)

    def _copy_in(self, host_slots: list[int], main_slots: list[int]) -> None:
        if not host_slots:
            return
        kv = self.main.kv
        dev = kv[0].device
        with torch.inference_mode():
            staged = self.host.index_select(1, torch.tensor(host_slots, dtype=torch.int64))
            staged = staged.to(dev, non_blocking=staged.is_pinned())
            idx = torch.tensor(main_slots, dtype=torch.int64, device=dev)
            for layer, t in enumerate(kv):
                t.index_copy_(0, idx, staged[layer])

    # ---- checks ---------------------------------------------------------------------
    def check(self) -> None:
        """Recount from the tree and assert the invariants in the module docstring."""
        seen: set[int] = set()
        for r in self._roots.values():
            assert r.children, "an empty root was kept"
            stack = list(r.children.values())
            while stack:
                nd = stack.pop()
                assert len(nd.tokens) == len(nd.slots) > 0
                stored = [s for s in nd.slots if s != HOLLOW]
                assert nd.stored == len(stored), (nd.stored, len(stored))
                assert nd.children or stored, "a leaf with nothing stored was kept"
                for s in stored:
                    assert self.pool.is_allocated(s) and s not in seen, f"host slot {s}"
                    seen.add(s)
                for t, c in nd.children.items():
                    assert c.tokens[0] == t and c.parent is nd
                stack.extend(nd.children.values())
        assert len(seen) == self.pool.num_used, (len(seen), self.pool.num_used)
        assert self.pool.num_used + self.pool.num_free == self.capacity

