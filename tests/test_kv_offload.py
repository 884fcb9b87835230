"""The KV offload tier (runtime/llm/kv_offload.py): bounded host memory under the radix cache.

Unit level: a tiny ``KVCacheTensors`` whose slots hold values derived from (key, token path), so
every copy out and back can be checked; the tier shares the radix cache's tree (evicted device
leaves stay in it host-only), driven through the ``KVManager``. Scheduler level: random traffic through the real
scheduler with a fake forward that writes those values; every cached slot must hold the value
of its own path after any number of evictions, offloads and restores. Model level (SmolLM2):
greedy output with a prefix restored from the tier equals recomputing it.
"""

from __future__ import annotations

import random
import zlib
from pathlib import Path

import httpx
import pytest
import torch

from headway.runtime.llm.attention import KVCacheTensors
from headway.runtime.llm.kv_manager import KVManager
from headway.runtime.llm.kv_offload import KVOffloadTier
from headway.runtime.llm.radix_cache import RadixCache, RadixNode
from headway.runtime.llm.scheduler import Scheduler, SchedulerConfig
from headway.runtime.llm.sequence import SamplingParams, Sequence
from tests.conftest import running_server

LAYERS = 2


def value(key, path) -> float:
    """The K/V a token at the end of ``path`` under ``key`` gets (exact in float32)."""
    return float(zlib.crc32(repr((key, tuple(path))).encode()) % 1_000_003)


def tensors(num_slots: int) -> KVCacheTensors:
    return KVCacheTensors(LAYERS, num_slots, 1, 2, torch.float32, torch.device("cpu"))


def write(kv: KVCacheTensors, key, path: list[int], slots: list[int], start: int = 0) -> None:
    for p, s in enumerate(slots, start):
        for layer, t in enumerate(kv.kv):
            t[s] = value(key, path[: p + 1]) + layer


def holds(kv: KVCacheTensors, key, path: list[int], slots: list[int], start: int = 0) -> bool:
    return all(float(t[s, 0, 0, 0]) == value(key, path[: p + 1]) + layer
               for p, s in enumerate(slots, start) for layer, t in enumerate(kv.kv))


def manager(num_slots: int, tier_tokens: int) -> tuple[KVCacheTensors, KVOffloadTier, KVManager]:
    kv = tensors(num_slots)
    tier = KVOffloadTier(tier_tokens, kv)
    return kv, tier, KVManager(num_slots, offload=tier)


def cached(mgr: KVManager, kv: KVCacheTensors, key, path: list[int]) -> None:
    """``path`` computed (its K/V written) and put into the cache, unlocked."""
    slots = mgr.pool.alloc(len(path))
    assert slots is not None
    write(kv, key, path, slots)
    mgr.cache.insert(key, path, slots)


def admit(mgr: KVManager, key, prompt: list[int]) -> Sequence:
    seq = Sequence(seq_id="s", request_id="s", prompt_ids=prompt, params=SamplingParams(), cache_key=key)
    mgr.admit(seq)
    return seq


def test_offload_keeps_the_tail_and_restores_only_after_the_main_match() -> None:
    kv, tier, mgr = manager(64, 32)
    cache = mgr.cache
    path = list(range(100, 120))
    cached(mgr, kv, "k", path)
    _, _, head = cache.match("k", path[:12])
    cache.lock(head)  # the head stays on device: the leaf [12, 20) is what the cache evicts
    assert cache.evict(8) == 8
    mgr.check()
    assert tier.used == 8 and tier.offloaded_tokens == 8
    assert cache.match("k", path)[0] == 12  # on device: the head only
    assert cache.host_match("k", path, 12) == 8  # the host continues the device match
    assert cache.host_match("k", path, 0) == 0 and cache.host_match("k", path, 14) == 0  # nor elsewhere
    assert cache.host_match("k", path[:15], 12) == 3
    assert cache.host_match("other", path, 12) == 0  # isolation keys never mix
    assert cache.host_match("k", path[:12] + [7, 7, 7], 12) == 0
    kv.kv[0][:] = -1.0
    write(kv, "k", path, cache.match("k", path)[1])  # the head's device K/V is intact, the rest is not
    seq = admit(mgr, "k", path + [1])
    assert seq.cached_len == 20 and tier.restored_tokens == 8
    assert holds(kv, "k", path, seq.slots)  # restored bit-exact
    mgr.release(seq, keep_in_cache=True)
    cache.unlock(head)
    # later the head is evicted too: the restored tail still has its host copy, only the head
    # is copied, and the whole path is restorable
    assert cache.evict(20) == 20
    mgr.check()
    assert tier.offloaded_tokens == 8 + 12 and tier.used == 20
    assert cache.host_match("k", path, 0) == 20 and cache.peek("k", path) == 0
    seq = admit(mgr, "k", path + [1])
    assert seq.cached_len == 20 and holds(kv, "k", path, seq.slots)
    mgr.release(seq, keep_in_cache=True)
    assert cache.evict(20) == 20 and tier.offloaded_tokens == 20 and tier.used == 20  # nothing copied again
    with pytest.raises(ValueError, match="holds 0 of 4"):
        cache.restore("k", [1, 2, 3, 4], 0, [0, 1, 2, 3], tier.load)
    with pytest.raises(ValueError, match="positive int"):
        KVOffloadTier(0, kv)


def test_capacity_is_respected_least_recently_used_first() -> None:
    kv, tier, mgr = manager(64, 24)
    cache = mgr.cache
    paths = [[i * 100 + j for j in range(10)] for i in range(4)]
    cached(mgr, kv, "k", paths[0])
    cached(mgr, kv, "k", paths[1])
    assert cache.evict(20) == 20 and tier.used == 20
    assert cache.host_match("k", paths[0], 0) == 10  # a lookup alone does not touch the LRU order
    again = admit(mgr, "k", paths[0] + [1])  # a restore does: 1 is now the oldest
    assert again.cached_len == 10
    cached(mgr, kv, "k", paths[2])
    assert cache.evict(10) == 10  # paths[2] (paths[0] is locked): room for it drops paths[1]
    mgr.check()
    assert tier.used == 20 and tier.dropped_tokens == 10
    assert cache.host_match("k", paths[1], 0) == 0
    assert cache.host_match("k", paths[2], 0) == 10
    mgr.release(again, keep_in_cache=True)
    assert cache.evict(10) == 10 and tier.offloaded_tokens == 30  # paths[0] kept its host copy
    assert cache.host_match("k", paths[0], 0) == 10
    # a segment longer than the whole tier keeps its head (still a restorable prefix)
    long = list(range(500, 540))
    cached(mgr, kv, "k", long)
    assert cache.evict(40) == 40
    mgr.check()
    assert tier.used == 24 and cache.host_match("k", long, 0) == 24
    kv.kv[1][:] = 0.0
    seq = admit(mgr, "k", long + [1])
    assert seq.cached_len == 24 and holds(kv, "k", long, seq.slots)


def test_dropping_host_leaves_prunes_the_tree() -> None:
    kv, tier, mgr = manager(64, 8)
    cache = mgr.cache
    a = [1, 2, 3, 4, 5, 6]
    b = [1, 2, 3, 9, 9]
    cached(mgr, kv, "k", a)
    cached(mgr, kv, "k", b)  # shares [1, 2, 3]
    assert cache.evict(8) == 8 and tier.used == 8
    mgr.check()
    cached(mgr, kv, "x", [7] * 8)
    assert cache.evict(8) == 8  # needs the whole tier: every host copy under "k" goes
    mgr.check()
    assert tier.used == 8 and cache.host_match("k", a, 0) == 0 and cache.host_match("k", b, 0) == 0
    assert list(cache._roots) == ["x"]


# ---- the scheduler with a fake forward ---------------------------------------------------------

def fake_forward(kv: KVCacheTensors, plan) -> None:
    for it in plan.items:
        seq = it.seq
        write(kv, seq.cache_key, seq.all_ids[: it.positions[-1] + 1], it.out_slots, start=it.positions[0])


def check_tree(kv: KVCacheTensors, cache: RadixCache) -> None:
    """Every slot in the main tree holds the value of its own (key, path)."""
    for key, root in cache._roots.items():
        stack: list[tuple[RadixNode, list[int]]] = [(c, []) for c in root.children.values()]
        while stack:
            nd, head = stack.pop()
            path = head + nd.tokens
            assert holds(kv, key, path, nd.slots, start=len(head)), (key, path)
            stack.extend((c, path) for c in nd.children.values())


@pytest.mark.parametrize("seed,capacity", [(0, 60), (1, 150), (2, 400)])
def test_random_traffic_restores_exact_kv_and_keeps_invariants(seed: int, capacity: int) -> None:
    rng = random.Random(seed)
    slots = 160
    kv = tensors(slots)
    tier = KVOffloadTier(capacity, kv)
    sched = Scheduler(KVManager(slots, offload=tier), config=SchedulerConfig(max_num_batched_tokens=48, max_running=4))
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(20, 70))] for _ in range(5)]
    keys = [None, "salt-a", "salt-b"]
    for i in range(40):
        prompt = rng.choice(prefixes)[: rng.randrange(10, 70)] + [rng.randrange(50) for _ in range(rng.randrange(1, 8))]
        sched.add(f"r{i}", prompt, SamplingParams(max_tokens=rng.randrange(1, 6), ignore_eos=True),
                  cache_key=rng.choice(keys))
        for _ in range(rng.randrange(0, 6)):
            plan = sched.schedule(now=0.0)
            fake_forward(kv, plan)
            sched.update(plan, [rng.randrange(50) for _ in plan.sample_seqs], now=0.0)
            sched.check_invariant()
            check_tree(kv, sched.kv.cache)
    for _ in range(2000):
        if not sched.has_work():
            break
        plan = sched.schedule(now=0.0)
        fake_forward(kv, plan)
        sched.update(plan, [rng.randrange(50) for _ in plan.sample_seqs], now=0.0)
        sched.check_invariant()
        tier.check()
    assert not sched.has_work()
    check_tree(kv, sched.kv.cache)
    assert tier.offloaded_tokens > 0 and tier.restored_tokens > 0, tier.stats()
    assert tier.used <= tier.capacity


def test_a_prompt_evicted_then_asked_again_is_restored_not_recomputed() -> None:
    kv = tensors(128)
    tier = KVOffloadTier(512, kv)
    sched = Scheduler(KVManager(128, offload=tier), config=SchedulerConfig(max_num_batched_tokens=256))

    def run(rid: str, prompt: list[int], key=None):
        seq = sched.add(rid, prompt, SamplingParams(max_tokens=1, ignore_eos=True), cache_key=key)
        computed = 0
        while sched.has_work():
            plan = sched.schedule(now=0.0)
            computed += plan.num_tokens
            fake_forward(kv, plan)
            sched.update(plan, [3] * len(plan.sample_seqs), now=0.0)
            sched.check_invariant()
        return seq, computed

    a = list(range(1, 101))
    run("a1", a)
    run("b", list(range(200, 300)))  # evicts a (its 101 tokens do not fit beside b's)
    assert tier.used >= 100
    seq, computed = run("a2", a)
    assert seq.num_cached_prompt_tokens == 99 and computed == 1  # only the last prompt token runs
    check_tree(kv, sched.kv.cache)
    before = tier.restored_tokens
    seq, computed = run("a3", a, key="salt")  # another isolation key: nothing restored
    assert tier.restored_tokens == before and seq.num_cached_prompt_tokens == 0 and computed == 100


# ---- the real engine (SmolLM2) -----------------------------------------------------------------

def generate(engine, rid: str, prompt: list[int], key=None, max_tokens: int = 8):
    seq = engine.scheduler.add(rid, prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                               cache_key=key)
    for _ in range(2000):
        if not engine.scheduler.has_work():
            break
        engine._step()
        engine.scheduler.check_invariant()
        engine.kv.check()
    assert not engine.scheduler.has_work()
    return seq


@pytest.mark.slow
def test_smollm2_greedy_output_with_a_restored_prefix_equals_recomputing_it() -> None:
    from headway.bench.text import TextGenerator
    from headway.library import resolve
    from headway.runtime.llm.engine import LLMEngine

    engine = LLMEngine(resolve("smollm2-135m-instruct").path, dtype="float32", kv_cache_tokens=400,
                       kv_offload_tokens=4096, max_num_batched_tokens=512)
    rng = random.Random(0)
    gen = TextGenerator(engine.tokenizer.tokenizer)
    a, b = (engine.tokenizer.encode(gen.text(220, rng)) for _ in range(2))
    first = generate(engine, "a1", a)  # computed
    assert first.num_cached_prompt_tokens == 0
    generate(engine, "b", b)  # a and b do not fit together: a is evicted, into the tier
    assert engine.kv.offload.offloaded_tokens >= len(a) and engine.kv.peek(None, a) == 0
    again = generate(engine, "a2", a)
    assert again.num_cached_prompt_tokens == len(a) - 1  # all but the last prompt token restored
    assert engine.kv.offload.restored_tokens == len(a) - 1
    assert again.output_ids == first.output_ids
    # under another isolation key nothing is restored: computed again, same output
    salted = generate(engine, "a3", a, key="salt")
    assert salted.num_cached_prompt_tokens == 0 and engine.kv.offload.restored_tokens == len(a) - 1
    assert salted.output_ids == first.output_ids
    state = engine._take_snapshot()["kv_offload"]
    assert state["restored_tokens"] == len(a) - 1 and 0 < state["used_tokens"] <= 4096
    assert 0 < state["hit_rate"] < 1


# ---- the served replica: flag, /headway/state, /metrics -----------------------------------------

@pytest.mark.slow
def test_served_replica_restores_and_reports_the_tier(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "headway.yaml").write_text("name: tiny-offload\nruntime: llm\nmodel:\n  source: tinycoder-test\n"
                                      "engine:\n  kv_cache_tokens: 256\n  num_threads: 1\n")
    with running_server(["serve", str(pkg), "--kv-offload-tokens", "2048"], tmp_path) as srv:
        state = httpx.get(f"{srv.url}/headway/state").json()
        assert state["kv_offload"]["capacity_tokens"] == 2048

        def complete(prompt: list[int]) -> str:
            r = httpx.post(f"{srv.url}/v1/completions", timeout=60, json={
                "model": "tiny-offload", "prompt": prompt, "max_tokens": 4, "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        a, b = list(range(100, 250)), list(range(300, 450))
        first = complete(a)
        complete(b)  # 150 + 150 tokens do not fit in 256 slots: a moves to the tier
        assert complete(a) == first
        state = httpx.get(f"{srv.url}/headway/state").json()["kv_offload"]
        assert state["restored_tokens"] >= len(a) - 1 and state["offloaded_tokens"] >= len(a)
        assert 0 < state["used_tokens"] <= 2048 and 0 < state["hit_rate"] <= 1
        metrics = httpx.get(f"{srv.url}/metrics").text
        line = next(ln for ln in metrics.splitlines()
                    if ln.startswith('headway_llm_kv_offload_restored_tokens_total{model="tiny-offload"}'))
        assert float(line.split()[-1]) == state["restored_tokens"]
        for name in ("offloaded_tokens_total", "missed_tokens_total", "dropped_tokens_total", "capacity_tokens",
                     "used_tokens", "hit_rate"):
            assert f"headway_llm_kv_offload_{name}" in metrics, name


def test_tier_is_off_by_default_and_rejects_bad_sizes() -> None:
    from headway.package.schema import LLMEngineOptions

    assert LLMEngineOptions().kv_offload_tokens == 0
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        LLMEngineOptions(kv_offload_tokens=-1)
