"""The KV manager alone (runtime/llm/kv_manager.py), driven by random request sequences.

No scheduler, no model: a test plays the scheduler (admit with shared prefixes, allocate, a fake
forward that writes a value derived from (key, token path) into every slot it computes, commit
and fork for n > 1, speculative proposals, preempt/finish, truncate, evict) over a small pool and
host tier of real ``KVCacheTensors``. After every operation: the manager's invariants
(``free + evictable + locked + private == total``, no slot owned twice) and every slot a
sequence or the cache holds, restored ones included, still holds its own path's value.
"""

from __future__ import annotations

import zlib
from collections.abc import Hashable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headway.runtime.llm.attention import KVCacheTensors
from headway.runtime.llm.kv_manager import KVManager
from headway.runtime.llm.kv_offload import KVOffloadTier
from headway.runtime.llm.sequence import SamplingParams, Sequence

LAYERS = 2


def value(key: Hashable, path: list[int]) -> float:
    """The K/V a token at the end of ``path`` under ``key`` gets (exact in float32)."""
    return float(zlib.crc32(repr((key, tuple(path))).encode()) % 1_000_003)


def write(kv: KVCacheTensors, key: Hashable, path: list[int], slots: list[int], start: int) -> None:
    for p, s in enumerate(slots, start):
        for layer, t in enumerate(kv.kv):
            t[s] = value(key, path[: p + 1]) + layer


def holds(kv: KVCacheTensors, key: Hashable, path: list[int], slots: list[int], start: int = 0) -> bool:
    return all(float(t[s, 0, 0, 0]) == value(key, path[: p + 1]) + layer
               for p, s in enumerate(slots, start) for layer, t in enumerate(kv.kv))


class Harness:
    """Plays the scheduler's part over one manager and checks after every operation."""

    def __init__(self, num_slots: int, tier_tokens: int) -> None:
        self.tensors = KVCacheTensors(LAYERS, num_slots, 1, 2, torch.float32, torch.device("cpu"))
        tier = KVOffloadTier(tier_tokens, self.tensors) if tier_tokens else None
        self.kv = KVManager(num_slots, offload=tier)
        self.running: list[Sequence] = []
        self.n = 0
        self.restored = 0

    def forward(self, seq: Sequence, slots: list[int], tokens: list[int]) -> None:
        """Write the K/V of ``seq``'s newest ``slots`` (path: ``tokens``), then land it."""
        start = seq.num_computed - len(slots)
        write(self.tensors, seq.cache_key, tokens, slots, start)
        self.kv.written(seq)

    def admit(self, prompt: list[int], key: Hashable) -> None:
        self.n += 1
        seq = Sequence(seq_id=f"r{self.n}", request_id=f"r{self.n}", prompt_ids=prompt,
                       params=SamplingParams(n=2), cache_key=key)
        m = self.kv.admit(seq)
        assert seq.cached_len == m == seq.num_computed and m <= len(prompt) - 1
        assert holds(self.tensors, key, prompt, seq.slots), "a cached or restored prefix lost its K/V"
        slots = self.kv.allocate(seq, len(prompt) - m)
        if slots is None:
            self.kv.release(seq, keep_in_cache=False)
            return
        self.forward(seq, slots, prompt)
        self.running.append(seq)

    def decode(self, seq: Sequence, token: int, proposal: list[int], accept: int) -> None:
        """Sample ``token`` after the last computed one, compute it with ``proposal`` after it,
        keep ``accept`` proposals (and a next token), drop the rest."""
        if seq.num_computed == seq.num_tokens:
            seq.output_ids.append(token)
        slots = self.kv.allocate(seq, 1 + len(proposal))
        if slots is None:
            return
        self.forward(seq, slots, seq.all_ids + proposal)
        seq.output_ids.extend(proposal[:accept] + [token])
        self.kv.drop_uncommitted(seq)
        assert seq.num_computed == max(seq.num_tokens - 1, seq.cached_len)

    def fork(self, seq: Sequence, token: int) -> None:
        """n = 2 after the prompt's prefill: commit it, share it with a sibling."""
        self.kv.commit(seq)
        assert seq.num_private_slots == 0
        child = seq.fork(1, 0.0)
        self.kv.fork(seq, child)
        assert child.slots == seq.slots and child.cached_len == seq.cached_len
        seq.output_ids.append(token)
        child.output_ids.append(token + 1)
        self.running.append(child)

    def release(self, seq: Sequence, keep: bool) -> None:
        self.running.remove(seq)
        self.kv.release(seq, keep_in_cache=keep)
        assert not seq.slots and seq.kv.lock is None and seq.num_private_slots == 0

    def check(self) -> None:
        kv = self.kv
        kv.check()
        assert kv.num_free + kv.evictable + kv.locked + kv.private == kv.total
        assert kv.private == sum(s.num_private_slots for s in self.running)
        for s in self.running:
            assert holds(self.tensors, s.cache_key, s.all_ids, s.slots), s.seq_id
        for key, path, slots, start in kv.cache.device_segments():
            assert holds(self.tensors, key, path, slots, start), (key, path)


PREFIXES = [[(7 * i + j) % 23 for j in range(30)] for i in range(3)]

op = st.one_of(
    st.tuples(st.just("admit"), st.integers(0, 2), st.integers(1, 30), st.lists(st.integers(0, 22), max_size=6),
              st.sampled_from([None, "salt"])),
    st.tuples(st.just("decode"), st.integers(0, 99), st.integers(0, 22), st.lists(st.integers(0, 22), max_size=3),
              st.integers(0, 3)),
    st.tuples(st.just("fork"), st.integers(0, 99), st.integers(0, 21)),
    st.tuples(st.just("release"), st.integers(0, 99), st.booleans()),
    st.tuples(st.just("truncate"), st.integers(0, 99), st.integers(1, 4)),
    st.tuples(st.just("evict"), st.integers(1, 40)),
)


@pytest.mark.parametrize("num_slots,tier_tokens", [(64, 0), (64, 40), (96, 200)])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=1, max_size=60))
def test_random_requests_keep_every_invariant(num_slots: int, tier_tokens: int, ops: list[tuple]) -> None:
    h = Harness(num_slots, tier_tokens)
    for o in ops:
        name = o[0]
        seq = h.running[o[1] % len(h.running)] if h.running and name not in ("admit", "evict") else None
        if name == "admit":
            _, which, cut, tail, key = o
            h.admit(PREFIXES[which][:cut] + tail + [22], key)
        elif name == "decode" and seq is not None and seq.num_computed >= seq.num_tokens - 1:
            _, _, token, proposal, accept = o
            room = h.kv.total - seq.num_tokens - 2
            proposal = proposal[: max(0, room)]
            if seq.num_tokens + 1 < h.kv.total:
                h.decode(seq, token, proposal, min(accept, len(proposal)))
        elif name == "fork" and seq is not None and not seq.output_ids and seq.index == 0 \
                and seq.num_computed == seq.num_tokens:
            h.fork(seq, o[2])
        elif name == "release" and seq is not None:
            h.release(seq, o[2])
        elif name == "truncate" and seq is not None and len(seq.output_ids) > 1:
            del seq.output_ids[max(1, len(seq.output_ids) - o[2]):]
            h.kv.drop_uncommitted(seq)
        elif name == "evict":
            ev = h.kv.evictable
            freed = h.kv.evict(o[1])
            assert min(o[1], ev) <= freed <= ev
        h.check()
    for seq in list(h.running):
        h.release(seq, keep=True)
        h.check()
    assert h.kv.locked == 0 and h.kv.private == 0
    h.kv.clear()
    h.check()
    assert h.kv.num_free == h.kv.total


def test_a_prefix_evicted_to_the_host_tier_is_restored_bit_exact() -> None:
    h = Harness(72, 100)
    a = list(range(1, 31))
    h.admit(a, None)
    (first,) = h.running
    h.release(first, keep=True)
    assert h.kv.evict(h.kv.evictable) == 30  # a goes to the host tier
    assert h.kv.offload is not None and h.kv.offload.offloaded_tokens == 30
    h.tensors.kv[0].fill_(-1.0)  # the device copy is gone for good
    h.tensors.kv[1].fill_(-1.0)
    h.admit(a, None)  # all but the last prompt token come back from the host
    (again,) = h.running
    assert again.cached_len == 29 and h.kv.offload.restored_tokens == 29
    assert holds(h.tensors, None, a, again.slots)
    h.admit(a, "salt")  # another isolation key: nothing restored
    assert len(h.running) == 2 and h.running[-1].cached_len == 0 and h.kv.offload.restored_tokens == 29
    h.check()


def test_hit_counters_are_kept_once_per_request() -> None:
    kv = KVManager(64)
    kv.count_prompt(10, 0)
    kv.count_prompt(10, 9)
    assert (kv.query_tokens, kv.hit_tokens, kv.hit_rate) == (20, 9, 0.45)
