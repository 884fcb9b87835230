"""The prefill chunker (pure) and the scheduler honouring its per-step cap."""

from __future__ import annotations

import pytest

from headway.runtime.llm.chunking import PrefillChunker
from headway.runtime.llm.kv_manager import KVManager
from headway.runtime.llm.scheduler import Scheduler, SchedulerConfig
from headway.runtime.llm.sequence import SamplingParams


def test_cost_model_is_learned_and_caps_prefill() -> None:
    c = PrefillChunker(budget=512, itl_factor=1.5, min_chunk=4, smoothing=1.0)
    assert c.prefill_cap(0, 1) is None  # nothing decoding: the whole budget
    assert c.prefill_cap(8, 1) is None  # no decode-only step seen yet (cold start): nothing to protect
    c.observe(8, 0, 0.042)
    assert c.prefill_cap(8, 1) is None  # one decode-only step: not yet a model
    for d in (1, 16, 32, 4):
        c.observe(d, 0, 0.010 + 0.004 * d)  # decode-only: 10 ms + 4 ms per sequence
    assert c.decode_time(20) == pytest.approx(0.090)
    assert c.prefill_cap(20, 1) == 4  # no mixed step seen yet
    c.observe(20, 30, 0.090 + 0.030)  # 30 prefill tokens added 30 ms: 1 ms each
    assert c.prefill_token_s == pytest.approx(0.001)
    assert c.prefill_cap(20, 1) == 45  # 1.5x of 90 ms leaves 45 ms: 45 tokens
    c.observe(20, 45, 0.090 + 0.090)  # deeper into a long prompt: 2 ms per token now
    assert c.prefill_cap(20, 1) == 22  # the cap follows the real cost
    assert c.prefill_cap(10_000, 1) == 512  # never above the budget
    c.observe(0, 3, 0.050)  # a 3-token warm-up prompt: its step is fixed cost, not 17 ms a token
    assert c.prefill_token_s == pytest.approx(0.002)


def test_bursts_get_prefill_priority_and_bad_factor_rejected() -> None:
    c = PrefillChunker(budget=256, itl_factor=2.0, min_chunk=1)
    for d in (1, 8, 16):
        c.observe(d, 0, 0.010 + 0.004 * d)
    assert c.prefill_cap(4, 10) is None  # more waiting than decoding: prefill first
    assert c.prefill_cap(16, 4) is None  # a quarter as many waiting as decoding is still a burst
    assert c.prefill_cap(17, 4) == 1  # fewer: the streams are protected (nothing learned of prefill yet)
    assert PrefillChunker(budget=256, burst_fraction=1.0, min_chunk=1).prefill_cap(4, 3) is None  # no model yet
    with pytest.raises(ValueError, match="itl_factor"):
        PrefillChunker(budget=8, itl_factor=1.0)


def test_scheduler_honours_the_prefill_cap() -> None:
    sched = Scheduler(KVManager(4096), config=SchedulerConfig(max_num_batched_tokens=512))
    sched.add("short", list(range(1, 10)), SamplingParams(max_tokens=50, temperature=0))
    plan = sched.schedule()
    sched.update(plan, [7] * len(plan.sample_seqs))  # "short" is now decoding
    sched.add("long", list(range(1, 2001)), SamplingParams(max_tokens=4, temperature=0))
    seen = []
    for _ in range(10):
        plan = sched.schedule(prefill_cap=32)
        prefill = sum(len(it.token_ids) for it in plan.items if it.seq.request_id == "long")
        seen.append(prefill)
        assert any(it.seq.request_id == "short" for it in plan.items)  # the decode never stalls
        sched.update(plan, [7] * len(plan.sample_seqs))
        sched.check_invariant()
    assert seen == [32] * 10
