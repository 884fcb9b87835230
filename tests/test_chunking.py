"""The prefill chunker (pure) and the scheduler honouring its per-step cap."""

from __future__ import annotations

import pytest

from headway.runtime.llm.chunking import PrefillChunker
from headway.runtime.llm.kv_pool import KVPool
from headway.runtime.llm.scheduler import Scheduler, SchedulerConfig
from headway.runtime.llm.sequence import SamplingParams


def test_fit_recovers_a_linear_cost_and_caps_prefill() -> None:
    c = PrefillChunker(budget=512, itl_factor=1.5, min_chunk=4)
    assert c.prefill_cap(0) is None  # nothing decoding: the whole budget
    assert c.prefill_cap(8) == 4  # no data yet: the minimum chunk
    for tokens in (1, 8, 16, 64, 200, 512, 32, 4):
        c.observe(tokens, 0.010 + 0.001 * tokens)  # 10 ms overhead + 1 ms/token
    a, b = c.fit()
    assert a == pytest.approx(0.010) and b == pytest.approx(0.001)
    # decode-only step with 20 decodes: 30 ms; 1.5x is 45 ms -> 35 tokens in all -> 15 prefill
    assert c.prefill_cap(20) == 15
    assert c.prefill_cap(10_000) == 512  # capped by the budget


def test_no_spread_is_conservative_and_bad_factor_rejected() -> None:
    c = PrefillChunker(budget=256, itl_factor=2.0, min_chunk=1)
    for _ in range(5):
        c.observe(10, 0.05)
    assert c.fit() == (0.0, pytest.approx(0.005))
    assert c.prefill_cap(10) == 10  # proportional cost: 2x the time = 2x the tokens
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
