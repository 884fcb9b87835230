"""The prefill chunker (pure) and the scheduler honouring its per-step cap."""

from __future__ import annotations

import pytest

from headway.runtime.llm.chunking import PrefillChunker
from headway.runtime.llm.kv_pool import KVPool
from headway.runtime.llm.scheduler import Scheduler, SchedulerConfig
from headway.runtime.llm.sequence import SamplingParams


def test_fit_recovers_the_cost_model_and_caps_prefill() -> None:
    c = PrefillChunker(budget=512, itl_factor=1.5, min_chunk=4)
    assert c.prefill_cap(0, 1) is None  # nothing decoding: the whole budget
    assert c.prefill_cap(8, 1) == 4  # no data yet: the minimum chunk
    for d, p in ((1, 0), (8, 0), (16, 64), (32, 0), (4, 200), (30, 2), (2, 512), (12, 12)):
        c.observe(d, p, 0.010 + 0.004 * d + 0.001 * p)  # 10 ms + 4 ms/decode + 1 ms/prefill token
    a, b_d, b_p = c.fit()
    assert (a, b_d, b_p) == (pytest.approx(0.010), pytest.approx(0.004), pytest.approx(0.001))
    # 20 decodes: a 90 ms decode-only step; 1.5x allows 45 ms more: 45 prefill tokens
    assert c.prefill_cap(20, 1) == 45
    assert c.prefill_cap(10_000, 1) == 512  # capped by the budget


def test_bursts_get_prefill_priority_and_bad_factor_rejected() -> None:
    c = PrefillChunker(budget=256, itl_factor=2.0, min_chunk=1)
    for d, p in ((1, 0), (8, 0), (16, 64), (32, 0), (4, 200), (30, 2)):
        c.observe(d, p, 0.01 + 0.004 * d + 0.001 * p)
    assert c.prefill_cap(4, 10) is None  # more waiting than decoding: prefill first
    assert c.prefill_cap(10, 4) is not None
    with pytest.raises(ValueError, match="itl_factor"):
        PrefillChunker(budget=8, itl_factor=1.0)


def test_scheduler_honours_the_prefill_cap() -> None:
    sched = Scheduler(KVPool(4096), config=SchedulerConfig(max_num_batched_tokens=512))
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
