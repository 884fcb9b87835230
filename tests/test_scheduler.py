from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from headway.runtime.llm.kv_manager import KVManager
from headway.runtime.llm.scheduler import Scheduler, SchedulerConfig
from headway.runtime.llm.sequence import FinishReason, SamplingParams, SeqStatus


def mk(num_slots: int = 256, **cfg) -> Scheduler:
    return Scheduler(KVManager(num_slots), config=SchedulerConfig(**cfg))


def step(s: Scheduler, token: int = 5):
    plan = s.schedule(now=0.0)
    s.check_invariant()
    got = s.update(plan, [token] * len(plan.sample_seqs), now=0.0)
    s.check_invariant()
    return plan, got


def test_add_rejects_bad_input() -> None:
    s = mk(64, max_running=4)
    with pytest.raises(ValueError, match="KV pool holds at most 63"):
        s.add("a", list(range(64)))
    with pytest.raises(ValueError, match="empty"):
        s.add("a", [])
    with pytest.raises(ValueError, match="ints >= 0"):
        s.add("a", [1, -2])
    with pytest.raises(ValueError, match="exceeds max_running"):
        s.add("a", [1], SamplingParams(n=5))
    s.add("a", [1, 2])
    with pytest.raises(ValueError, match="already active"):
        s.add("a", [1, 2])
    with pytest.raises(ValueError, match="min_prefill_tokens"):
        SchedulerConfig(max_num_batched_tokens=16, min_prefill_tokens=16)
    with pytest.raises(ValueError, match="priority"):
        SchedulerConfig(priority="fifo")  # type: ignore[arg-type]


def test_chunked_prefill_then_decode() -> None:
    s = mk(256, max_num_batched_tokens=32)
    seq = s.add("a", list(range(100, 200)), SamplingParams(max_tokens=3, ignore_eos=True))
    chunks = []
    while seq.status is not SeqStatus.FINISHED:
        plan, _ = step(s)
        (it,) = plan.items
        chunks.append((len(it.token_ids), it.num_samples, it.positions[0]))
        assert it.context_slots[-len(it.out_slots):] == it.out_slots
    assert chunks == [(32, 0, 0), (32, 0, 32), (32, 0, 64), (4, 1, 96), (1, 1, 100), (1, 1, 101)]
    assert seq.output_ids == [5, 5, 5] and seq.finish_reason is FinishReason.LENGTH


def test_decodes_never_starved_and_priority_knob() -> None:
    for priority, want_prefill in (("prefill", 4), ("decode", 2)):
        s = mk(512, max_num_batched_tokens=16, min_prefill_tokens=4, priority=priority, max_running=32)
        for i in range(14):
            s.add(f"d{i}", [1, 2, i], SamplingParams(max_tokens=50, ignore_eos=True))
        while any(q.in_prefill or q.status is SeqStatus.WAITING for q in s.running + s.waiting):
            step(s)
        s.add("long", list(range(300, 400)), SamplingParams(max_tokens=2))
        plan, _ = step(s)
        pre = [it for it in plan.items if it.seq.seq_id == "long"]
        dec = [it for it in plan.items if it.seq.seq_id != "long"]
        assert len(pre[0].token_ids) == want_prefill
        assert len(dec) == 16 - want_prefill and plan.num_tokens == 16
        # with room in the budget every running decode runs, next to a prefill chunk
        s2 = mk(512, max_num_batched_tokens=64, priority=priority)
        for i in range(5):
            s2.add(f"d{i}", [1, 2, i], SamplingParams(max_tokens=50))
        step(s2)
        s2.add("long", list(range(300, 400)))
        plan, _ = step(s2)
        assert sum(1 for it in plan.items if len(it.token_ids) == 1) == 5
        assert plan.num_tokens == 64


def test_prefix_cache_hit_for_next_turn() -> None:
    s = mk(256)
    a = s.add("a", [7] * 40, SamplingParams(max_tokens=4, ignore_eos=True))
    while s.has_work():
        step(s, token=9)
    assert a.output_ids == [9] * 4
    # next turn: prompt = previous prompt + answer + new user text
    b = s.add("b", [7] * 40 + [9] * 4 + [3, 3], SamplingParams(max_tokens=1))
    plan, _ = step(s)
    assert b.num_cached_prompt_tokens == 43  # all computed tokens of turn 1 (last one never was)
    assert plan.items[0].token_ids == [9, 3, 3]
    # identical prompt: everything but the last token is reused
    c = s.add("c", [7] * 40, SamplingParams(max_tokens=1))
    plan, _ = step(s)
    assert c.num_cached_prompt_tokens == 39 and plan.items[0].token_ids == [7]
    # a different isolation key never hits
    d = s.add("d", [7] * 40, SamplingParams(max_tokens=1), cache_key="lora-x")
    step(s)
    assert d.num_cached_prompt_tokens == 0
    assert s.kv.hit_tokens == 43 + 39


def test_waits_instead_of_failing_then_runs() -> None:
    s = mk(40, max_num_batched_tokens=64)
    a = s.add("a", list(range(1, 31)), SamplingParams(max_tokens=5, ignore_eos=True))
    b = s.add("b", list(range(100, 130)), SamplingParams(max_tokens=5, ignore_eos=True))
    plan, _ = step(s)
    assert [it.seq for it in plan.items] == [a] and b.status is SeqStatus.WAITING
    while s.has_work():
        step(s)
    assert len(a.output_ids) == len(b.output_ids) == 5


def test_preemption_recompute_keeps_generated_tokens() -> None:
    s = mk(24, max_num_batched_tokens=64)
    a = s.add("a", list(range(1, 11)), SamplingParams(max_tokens=8, ignore_eos=True))
    b = s.add("b", list(range(50, 60)), SamplingParams(max_tokens=8, ignore_eos=True))
    preempted = []
    toks = iter(range(1000, 2000))
    while s.has_work():
        plan = s.schedule()
        s.check_invariant()
        preempted += plan.preempted
        s.update(plan, [next(toks) for _ in plan.sample_seqs])
        s.check_invariant()
    assert preempted and preempted[0] is b  # the youngest goes first
    assert b.num_preemptions >= 1
    assert len(a.output_ids) == len(b.output_ids) == 8


def test_context_full_finishes_with_length() -> None:
    s = mk(16)
    a = s.add("a", list(range(1, 11)), SamplingParams(max_tokens=None, ignore_eos=True))
    while s.has_work():
        step(s)
    assert a.finish_reason is FinishReason.LENGTH and a.num_tokens == 16


def test_eos_stop_ids_and_external_finish() -> None:
    s = mk(128, eos_token_ids=(2,))
    a = s.add("a", [5, 6], SamplingParams(max_tokens=10))
    b = s.add("b", [5, 7], SamplingParams(max_tokens=10, ignore_eos=True, stop_token_ids=(8,)))
    c = s.add("c", [5, 8], SamplingParams(max_tokens=10))
    plan = s.schedule()
    s.update(plan, [2, 2, 4])
    assert a.finish_reason is FinishReason.STOP and a.output_ids == [2]
    assert b.status is SeqStatus.RUNNING
    plan = s.schedule()
    s.update(plan, [8, 4])
    assert b.finish_reason is FinishReason.STOP and b.stop_reason == 8
    s.finish(c, FinishReason.STOP, "###")  # the detokenizer saw a stop string
    assert c.stop_reason == "###" and not s.running
    s.check_invariant()
    assert s.kv.num_free + s.kv.evictable == s.kv.total


def test_stop_string_in_the_last_allowed_token_is_a_stop() -> None:
    """The token that reaches max_tokens also completes a stop string: the text is cut at the
    stop string, so the finish reason is "stop", not "length"."""
    s = mk(128)
    a = s.add("a", [5, 6], SamplingParams(max_tokens=1))
    s.update(s.schedule(), [9])
    assert a.finish_reason is FinishReason.LENGTH
    s.finish(a, FinishReason.STOP, "###")
    assert a.finish_reason is FinishReason.STOP and a.stop_reason == "###"
    s.finish(a, FinishReason.ABORT)  # anything else after the end changes nothing
    assert a.finish_reason is FinishReason.STOP
    s.check_invariant()


def test_abort_frees_everything() -> None:
    s = mk(128, max_num_batched_tokens=8)
    a = s.add("a", list(range(1, 30)), SamplingParams(max_tokens=10, n=3))
    w = s.add("w", list(range(1, 30)))
    step(s)
    s.abort("a")
    s.abort("w")
    assert a.finish_reason is FinishReason.ABORT and w.finish_reason is FinishReason.ABORT
    assert not s.has_work() and s.kv.locked == 0
    s.check_invariant()
    assert s.kv.num_free + s.kv.evictable == s.kv.total


def test_n_samples_share_the_prompt() -> None:
    s = mk(128)
    a = s.add("a", list(range(1, 21)), SamplingParams(max_tokens=3, n=3, seed=1, ignore_eos=True))
    plan = s.schedule()
    (it,) = plan.items
    assert it.num_samples == 3 and len(plan.sample_seqs) == 3
    assert plan.to_forward_batch().logit_indices.tolist() == [19, 19, 19]
    s.update(plan, [100, 101, 102])
    kids = s.sequences("a")
    assert [k.index for k in kids] == [0, 1, 2] and [k.output_ids for k in kids] == [[100], [101], [102]]
    assert all(k.slots[:20] == a.slots[:20] and k.cached_len == 20 for k in kids)
    assert s.kv.locked == 20 and s.kv.private == 0  # one copy of the prompt, locked
    plan = s.schedule()
    assert [len(i.token_ids) for i in plan.items] == [1, 1, 1]
    outs = {i.out_slots[0] for i in plan.items}
    assert len(outs) == 3  # each sample writes its own slot
    s.update(plan, [1, 2, 3])
    s.check_invariant()
    while s.has_work():
        step(s)
    assert [len(k.output_ids) for k in kids] == [3, 3, 3]


def test_waiting_order_longest_prefix_first_with_aging() -> None:
    s = mk(512, max_num_batched_tokens=16, max_running=1, aging_steps=5)
    shared = list(range(100, 140))
    s.add("warm", shared + [1], SamplingParams(max_tokens=1))
    while s.has_work():
        step(s)
    cold = s.add("cold", list(range(200, 240)), SamplingParams(max_tokens=1))
    hot = s.add("hot", shared + [2], SamplingParams(max_tokens=1))
    plan, _ = step(s)
    assert plan.items[0].seq is hot  # arrived later but has a 40-token cached prefix
    while s.has_work():
        step(s)
    # aging: a cold request that has waited aging_steps goes before newer cache hits
    blocker = s.add("blocker", list(range(300, 340)), SamplingParams(max_tokens=8))
    step(s)
    old = s.add("old", list(range(400, 410)), SamplingParams(max_tokens=1))
    while blocker.status is not SeqStatus.FINISHED:
        step(s)
    new = s.add("new", shared + [3], SamplingParams(max_tokens=1))
    plan, _ = step(s)
    assert plan.items[0].seq is old and new.status is SeqStatus.WAITING
    assert cold.finish_reason is FinishReason.LENGTH


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["add", "add", "step", "step", "step", "abort", "stop"]),
            st.integers(0, 7),
            st.integers(1, 40),
            st.integers(1, 6),
            st.sampled_from([None, "k"]),
        ),
        max_size=50,
    )
)
def test_property_random_engine_ops(ops) -> None:
    s = mk(96, max_num_batched_tokens=24, max_running=5, eos_token_ids=(0,))
    n = 0
    for op, a, length, mt, key in ops:
        if op == "add":
            prompt = [(a * 7 + i) % 13 + 1 for i in range(length)]
            s.add(f"r{n}", prompt, SamplingParams(max_tokens=mt, n=1 + a % 2), cache_key=key)
            n += 1
        elif op == "step":
            plan = s.schedule()
            assert plan.num_tokens <= 24
            s.update(plan, [(a + i) % 5 for i in range(len(plan.sample_seqs))])
        elif op == "abort" and n:
            s.abort(f"r{a % n}")
        elif op == "stop" and s.running:
            s.finish(s.running[a % len(s.running)], FinishReason.STOP, "x")
        s.check_invariant()
    for _ in range(2000):
        if not s.has_work():
            break
        plan = s.schedule()
        s.update(plan, [1] * len(plan.sample_seqs))
        s.check_invariant()
    assert not s.has_work()
    assert s.kv.locked == 0 and s.kv.num_free + s.kv.evictable == s.kv.total


def test_abort_while_plan_in_flight_caches_only_written_tokens() -> None:
    s = mk(128, max_num_batched_tokens=8)
    a = s.add("a", list(range(1, 21)), SamplingParams(max_tokens=4))
    step(s)  # tokens 0..7 written
    plan = s.schedule()  # tokens 8..15 in flight
    s.abort("a")
    s.check_invariant()
    assert s.kv.cache.match(None, list(range(1, 21)))[0] == 8
    assert s.update(plan, []) == [] and a.output_ids == []
    s.check_invariant()


def test_schedule_update_must_alternate() -> None:
    s = mk(64)
    s.add("a", [1, 2, 3])
    plan = s.schedule()
    with pytest.raises(RuntimeError, match="before update"):
        s.schedule()
    with pytest.raises(ValueError, match="1 rows"):
        s.update(plan, [1, 2])
    s.update(plan, [4])
    with pytest.raises(ValueError, match="not the one in flight"):
        s.update(plan, [4])


def test_decodes_round_robin_when_budget_is_short() -> None:
    s = mk(1024, max_num_batched_tokens=16, min_prefill_tokens=6, max_running=32)
    decs = [s.add(f"d{i}", [1, 2, i], SamplingParams(max_tokens=100, ignore_eos=True)) for i in range(14)]
    while any(q.in_prefill or q.status is SeqStatus.WAITING for q in decs):
        step(s)
    s.add("long", list(range(300, 500)), SamplingParams(max_tokens=2))
    seen: dict[str, int] = {}
    for _ in range(3):
        plan, _ = step(s)
        assert plan.num_tokens == 16
        for it in plan.items:
            if it.seq.seq_id != "long":
                seen[it.seq.seq_id] = seen.get(it.seq.seq_id, 0) + 1
    assert set(seen) == {d.seq_id for d in decs}  # 10 decode slots/step, 14 decodes: all ran
    assert max(seen.values()) - min(seen.values()) <= 1


def test_long_prompts_that_do_not_fit_together_wait_instead_of_preempting_each_other() -> None:
    """Chunked prefill reserves chunk by chunk; admission still checks the whole uncached prompt
    against what the running prefills will need. Two 70-token prompts in a 100-slot pool: the
    second waits for the first to finish, nobody is preempted, no prefix is recomputed."""
    s = mk(100, max_num_batched_tokens=16, max_running=8)
    a = s.add("a", list(range(1000, 1070)), SamplingParams(max_tokens=4, ignore_eos=True))
    b = s.add("b", list(range(2000, 2070)), SamplingParams(max_tokens=4, ignore_eos=True))
    prefilled = 0
    for _ in range(200):
        if a.status is SeqStatus.FINISHED and b.status is SeqStatus.FINISHED:
            break
        plan, _ = step(s)
        prefilled += sum(len(it.token_ids) for it in plan.items if it.num_samples == 0 or len(it.token_ids) > 1)
        if b.status is SeqStatus.RUNNING:
            assert a.status is SeqStatus.FINISHED     # b started only once a was done
    assert a.output_ids == [5] * 4 and b.output_ids == [5] * 4
    assert s.num_preemptions == 0
    assert prefilled == 140                           # each prompt computed once
    # alone in the pool, a prompt is admitted whatever it needs (it cannot wait for anyone)
    c = s.add("c", list(range(3000, 3090)), SamplingParams(max_tokens=2, ignore_eos=True))
    for _ in range(50):
        if c.status is SeqStatus.FINISHED:
            break
        step(s)
    assert c.output_ids == [5, 5]
