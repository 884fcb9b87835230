from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from headway.runtime.llm.kv_pool import KVPool
from headway.runtime.llm.radix_cache import RadixCache, RadixNode, prefix_block_hashes


def _insert_fresh(cache: RadixCache, key, tokens: list[int]) -> list[int]:
    slots = cache.pool.alloc(len(tokens))
    assert slots is not None
    cache.insert(key, tokens, slots)
    return slots


def _inv(cache: RadixCache, private: int = 0) -> None:
    cache.check()
    # pool.free + cache.evictable + locked == pool.total
    assert cache.pool.num_free + cache.evictable + cache.locked + private == cache.pool.total


def test_match_insert_split_and_dedupe() -> None:
    pool = KVPool(64)
    cache = RadixCache(pool)
    s1 = _insert_fresh(cache, None, [1, 2, 3, 4, 5])
    n, slots, node = cache.match(None, [1, 2, 3, 9])
    assert n == 3 and slots == s1[:3] and node.tokens == [1, 2, 3]  # split inside the edge
    n, slots, _ = cache.match(None, [1, 2, 3, 4, 5, 6])
    assert n == 5 and slots == s1
    # duplicate prefix: the new slots for [1,2,3] go back to the pool, [7,8] are kept
    free_before = pool.num_free
    dup = pool.alloc(5)
    assert cache.insert(None, [1, 2, 3, 7, 8], dup) == 3
    assert pool.num_free == free_before - 2
    n, slots, _ = cache.match(None, [1, 2, 3, 7, 8])
    assert n == 5 and slots == s1[:3] + dup[3:]
    assert [cache.peek(None, t) for t in ([1, 2, 3, 9], [1, 2, 3, 4, 5, 6], [1, 2, 3, 7, 8])] == [3, 5, 5]
    _inv(cache)


def test_isolation_keys_never_share() -> None:
    pool = KVPool(32)
    cache = RadixCache(pool)
    _insert_fresh(cache, "adapter-a", [1, 2, 3])
    assert cache.match("adapter-b", [1, 2, 3])[0] == 0
    assert cache.match(None, [1, 2, 3])[0] == 0
    assert cache.match("adapter-a", [1, 2, 3])[0] == 3
    assert cache.num_keys == 1  # looking up keys never inserted leaves nothing behind
    n, slots, node = cache.match(("nocache", "r1"), [1, 2])
    cache.lock(node)
    cache.unlock(node)
    assert (n, slots, cache.num_keys) == (0, [], 1)
    sb = _insert_fresh(cache, "adapter-b", [1, 2, 3])
    assert cache.match("adapter-b", [1, 2])[1] == sb[:2] and cache.num_keys == 2
    _inv(cache)


def test_lock_protects_and_lru_evicts_leaves_first() -> None:
    pool = KVPool(32)
    cache = RadixCache(pool)
    _insert_fresh(cache, None, [1, 2, 3])
    _insert_fresh(cache, None, [1, 2, 4])  # shared [1,2] becomes an inner node
    _insert_fresh(cache, None, [9, 9])
    _, _, node = cache.match(None, [1, 2, 3])
    cache.lock(node)
    assert cache.locked == 3 and cache.evictable == 3
    _inv(cache)
    cache.match(None, [9, 9])  # touch [9,9]: [1,2,4]'s leaf is now least recently used
    assert cache.evict(1) == 1  # the [4] leaf
    assert cache.match(None, [1, 2, 4])[0] == 2
    assert cache.evict(100) == 2  # only [9,9] is left unlocked; the locked path stays
    assert cache.match(None, [1, 2, 3])[0] == 3
    _inv(cache)
    cache.unlock(node)
    assert cache.evictable == 3 and cache.locked == 0
    assert cache.evict(100) == 3 and pool.num_free == 32
    _inv(cache)


def test_digest_matches_prompt_hash_chain() -> None:
    pool = KVPool(1024)
    cache = RadixCache(pool)
    rng = random.Random(0)
    base = [rng.randrange(1000) for _ in range(130)]
    _insert_fresh(cache, None, base)
    _insert_fresh(cache, None, base[:70] + [5] * 60)  # branches inside block 2
    _insert_fresh(cache, "salt", base[:64])
    d = set(cache.digest(block_tokens=64))
    a = prefix_block_hashes(base, 64)
    b = prefix_block_hashes(base[:70] + [5] * 60, 64)
    assert len(a) == 2 and a[0] == b[0] and a[1] != b[1]
    assert set(a) | set(b) | set(prefix_block_hashes(base[:64], 64, key="salt")) == d
    assert prefix_block_hashes(base[:64], 64, key="salt")[0] != a[0]  # isolation key chains in
    assert len(d) == 4
    # a router counting matched blocks of a new prompt
    prompt = base[:128] + [1, 2, 3]
    hits = 0
    for h in prefix_block_hashes(prompt, 64):
        if h not in d:
            break
        hits += 1
    assert hits == 2


# --- property test: random workloads keep every counter and the invariant exact -------------

ops = st.lists(
    st.tuples(
        st.sampled_from(["insert", "match_lock", "unlock", "evict"]),
        st.sampled_from([None, "a", "b"]),
        st.lists(st.integers(0, 3), min_size=1, max_size=12),
        st.integers(0, 20),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_property_random_workload(workload) -> None:
    pool = KVPool(96)
    cache = RadixCache(pool)
    held: list[RadixNode] = []
    for op, key, toks, n in workload:
        if op == "insert":
            slots = pool.alloc(len(toks))
            if slots is None:
                cache.evict(len(toks) - pool.num_free)
                slots = pool.alloc(len(toks))
            if slots is not None:
                before = pool.num_free
                already = cache.insert(key, toks, slots)
                assert pool.num_free - before == already  # dedupe returned exactly those
                m, got, _ = cache.match(key, toks)
                assert m == len(toks) and len(got) == len(toks)
        elif op == "match_lock":
            m, got, node = cache.match(key, toks)
            assert len(got) == m <= len(toks)
            assert all(pool.is_allocated(s) for s in got)
            cache.lock(node)
            held.append(node)
        elif op == "unlock" and held:
            cache.unlock(held.pop(n % len(held)))
        elif op == "evict":
            ev = cache.evictable
            freed = cache.evict(n)
            assert min(n, ev) <= freed <= ev and cache.evictable == ev - freed
        _inv(cache)
    for node in held:
        cache.unlock(node)
    cache.clear()
    _inv(cache)
    assert pool.num_free == pool.total and cache.size == 0


def test_digest_is_the_routers_chain() -> None:
    """The replica publishes exactly the chain the router computes (one recipe: headway.digest)."""
    from headway.infra.router.digest import cached_prefix_tokens

    pool = KVPool(1024)
    cache = RadixCache(pool)
    prompt = list(range(1000, 1200))
    cache.insert(None, prompt, pool.alloc(len(prompt)))
    published = cache.digest(64)
    assert cached_prefix_tokens(prompt + [7, 8, 9], published, 64) == 192
    assert cached_prefix_tokens([1] + prompt, published, 64) == 0
