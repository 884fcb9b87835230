"""KV slot pool: owns the *indices* of the engine's KV-cache slots (one slot = one token).

The pool knows nothing about tensors (the model runner owns those, shaped
``[num_slots, num_kv_heads, head_dim]`` per layer). It only hands out slot indices in
``[0, num_slots)`` and takes them back.

Invariant kept here: ``num_free + num_used == total`` and every index is either in the free
list or handed out, never both (a double free or a foreign index raises ``ValueError``).
The engine-wide invariant ``pool.free + cache.evictable + locked == pool.total`` is kept and
asserted by the KV manager (``kv_manager.KVManager.check``), the pool's only user in the engine.
"""

from __future__ import annotations

from collections.abc import Iterable


class KVPool:
    """Free-list allocator of KV slot indices."""

    def __init__(self, num_slots: int) -> None:
        if not isinstance(num_slots, int) or isinstance(num_slots, bool) or num_slots <= 0:
            raise ValueError(f"num_slots must be a positive int, got {num_slots!r}")
        self._total = num_slots
        # Pop from the end: low indices are handed out first.
        self._free: list[int] = list(range(num_slots - 1, -1, -1))
        self._in_use = bytearray(num_slots)  # 1 = handed out

    @property
    def total(self) -> int:
        return self._total

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self._total - len(self._free)

    def alloc(self, n: int) -> list[int] | None:
        """Hand out ``n`` slot indices, or return ``None`` (allocating nothing) when short."""
        if n < 0:
            raise ValueError(f"alloc(n) needs n >= 0, got {n}")
        if n > len(self._free):
            return None
        if n == 0:
            return []
        out = self._free[-n:]
        del self._free[-n:]
        out.reverse()
        for s in out:
            self._in_use[s] = 1
        return out

    def free(self, slots: Iterable[int]) -> None:
        """Take slots back. Raises ``ValueError`` on an out-of-range index or a double free
        (the pool is left unchanged in that case)."""
        slots = list(slots)
        seen: set[int] = set()
        for s in slots:
            if not (0 <= s < self._total):
                raise ValueError(f"slot {s} is out of range [0, {self._total})")
            if not self._in_use[s] or s in seen:
                raise ValueError(f"slot {s} is not allocated (double free?)")
            seen.add(s)
        for s in slots:
            self._in_use[s] = 0
        self._free.extend(slots)

    def is_allocated(self, slot: int) -> bool:
        return 0 <= slot < self._total and bool(self._in_use[slot])

    def __repr__(self) -> str:
        return f"KVPool(total={self._total}, free={self.num_free})"
