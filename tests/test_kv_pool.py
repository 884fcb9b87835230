from __future__ import annotations

import pytest

from headway.runtime.llm.kv_pool import KVPool


def test_alloc_free_counts() -> None:
    pool = KVPool(8)
    a = pool.alloc(3)
    assert a is not None and len(set(a)) == 3 and all(0 <= s < 8 for s in a)
    assert (pool.num_free, pool.num_used, pool.total) == (5, 3, 8)
    b = pool.alloc(5)
    assert b is not None and not set(a) & set(b)
    assert pool.alloc(1) is None and pool.num_free == 0  # short: nothing allocated
    pool.free(a)
    assert pool.num_free == 3 and pool.alloc(4) is None
    c = pool.alloc(3)
    assert sorted(c) == sorted(a)
    assert pool.alloc(0) == []


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="num_slots"):
        KVPool(0)
    pool = KVPool(4)
    with pytest.raises(ValueError, match="n >= 0"):
        pool.alloc(-1)
    s = pool.alloc(2)
    pool.free(s[:1])
    with pytest.raises(ValueError, match="double free"):
        pool.free(s[:1])
    with pytest.raises(ValueError, match="double free"):
        pool.free([s[1], s[1]])
    with pytest.raises(ValueError, match="out of range"):
        pool.free([4])
    assert pool.num_free == 3  # failed frees changed nothing
