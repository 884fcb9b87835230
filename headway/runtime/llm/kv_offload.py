"""KV offload tier: owns a bounded host-memory pool of K/V that prefixes evicted from the
main KV pool move to, and come back from on a hit instead of being recomputed.

Its own preallocated tensor ``host[layer, slot, 2, kv_heads, head_dim]`` (pinned when the main
pool is on CUDA, plain CPU memory otherwise: there the tier is a second, larger, bounded pool
that outlives eviction from the main one) and its own slot allocator (a ``KVPool``). It keeps
no tree of its own: it shares the ``RadixCache``'s. When the cache evicts a device leaf it
asks ``store(node)`` for a host copy (the node then stays in the tree, host-only); on
admission the ``KVManager`` continues a device match through host-only nodes and
``RadixCache.restore`` brings them back with ``load``. Its LRU eviction (``_drop``) forgets the
host copies of the least recently used *host leaves* (nodes whose children hold no host copy),
so every host-only node always continues a prefix that is on device or in host memory.
Keys never mix: the tree has one root per isolation key.

Invariants (``check()``; asserted in tests):
    pool.num_used == host slots in the tree (used + free == capacity)
    every host slot in the tree is allocated in the tier's pool and appears once

Threading: every method runs on the engine's step thread (store from ``RadixCache.evict``
inside ``schedule()``, load inside admission), between forwards, never racing one.
"""

from __future__ import annotations

import heapq

import torch

from headway.runtime.llm.attention import KVCacheTensors
from headway.runtime.llm.kv_pool import KVPool
from headway.runtime.llm.radix_cache import RadixCache, RadixNode


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
        self.cache: RadixCache | None = None  # the tree it shares (``bind``)
        self.offloaded_tokens = 0  # tokens copied main -> host
        self.restored_tokens = 0  # tokens copied host -> main on admission (restore hits)
        self.lookup_tokens = 0  # prompt tokens past the main-cache match, looked up here
        self.dropped_tokens = 0  # stored tokens the tier's own LRU eviction dropped

    def bind(self, cache: RadixCache) -> None:
        """Share ``cache``'s tree: its evicted device leaves come here."""
        self.cache = cache
        cache.host = self

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

    # ---- the cache's HostTier protocol ----------------------------------------------
    def store(self, node: RadixNode) -> list[int]:
        """Host slots holding the K/V of ``node``'s first tokens, all of them unless the node is
        longer than the whole tier (then its head: still a restorable prefix). Copies from the
        node's device slots unless it already has a host copy; drops LRU host copies for room."""
        if node.host:
            return node.host
        k = min(len(node.tokens), self.capacity)
        if k > self.pool.num_free:
            self._drop(k - self.pool.num_free)
        k = min(k, self.pool.num_free)
        out = self.pool.alloc(k)
        assert out is not None
        self._copy_out(node.slots[:k], out)
        self.offloaded_tokens += k
        return out

    def free(self, host_slots: list[int]) -> None:
        self.pool.free(host_slots)

    def load(self, host_slots: list[int], main_slots: list[int]) -> None:
        """Copy host K/V back into main pool slots (a restore)."""
        self._copy_in(host_slots, main_slots)
        self.restored_tokens += len(host_slots)

    def _drop(self, n: int) -> int:
        """Forget at least ``n`` host tokens, least recently used host leaves first."""
        assert self.cache is not None
        heap = [(nd.last_access, id(nd), nd) for nd in self.cache.nodes()
                if nd.host and not any(c.host for c in nd.children.values())]
        heapq.heapify(heap)
        freed = 0
        while freed < n and heap:
            _, _, nd = heapq.heappop(heap)
            freed += len(nd.host)
            up = self.cache.drop_host(nd)
            if up is not None:
                heapq.heappush(heap, (up.last_access, id(up), up))
        self.dropped_tokens += freed
        return freed

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
        """Recount the host slots in the shared tree and assert the invariants above."""
        seen: set[int] = set()
        if self.cache is not None:
            for nd in self.cache.nodes():
                for s in nd.host:
                    assert self.pool.is_allocated(s) and s not in seen, f"host slot {s}"
                    seen.add(s)
        assert len(seen) == self.pool.num_used, (len(seen), self.pool.num_used)
        assert self.pool.num_used + self.pool.num_free == self.capacity
