"""Scheduler simulation: many requests through schedule/update with a fake "model".

The fake model keeps a fake KV store (slot -> token id written there) and checks, for every
scheduled sequence, that reading its context slots gives back exactly its own tokens (so cache
hits, forks and recomputation after preemption hand out the right slots); its "next token" is
a hash of that context read back from the store. Scheduling logic only: no real model.
"""

from __future__ import annotations

import random

import pytest

from headway.runtime.llm.kv_manager import KVManager
from headway.runtime.llm.scheduler import SchedulePlan, Scheduler, SchedulerConfig
from headway.runtime.llm.sequence import FinishReason, SamplingParams, SeqStatus

VOCAB = 1000


def fake_forward(kv: dict[int, int], plan: SchedulePlan) -> list[int]:
    fb = plan.to_forward_batch()
    assert fb.input_ids.shape == fb.positions.shape == fb.out_slots.shape
    assert sum(fb.query_lens) == fb.input_ids.numel()
    assert len(set(fb.out_slots.tolist())) == fb.out_slots.numel()  # no slot written twice
    for slot, tok in zip(fb.out_slots.tolist(), fb.input_ids.tolist()):
        kv[slot] = tok
    tokens: list[int] = []
    off = 0
    row = 0
    for it, ql, cl, cs in zip(plan.items, fb.query_lens, fb.context_lens, fb.context_slots):
        seq = it.seq
        ctx = [kv[s] for s in cs.tolist()]
        assert cl == len(ctx) == it.positions[-1] + 1
        assert ctx == seq.all_ids[:cl], f"{seq.seq_id}: context slots hold the wrong tokens"
        assert cs.tolist()[-ql:] == it.out_slots
        assert fb.positions[off : off + ql].tolist() == list(range(cl - ql, cl))
        off += ql
        for _ in range(it.num_samples):
            assert fb.logit_indices[row].item() == off - 1
            s = plan.sample_seqs[row]
            tokens.append((hash(tuple(ctx)) % (VOCAB - 10) + 10 + 7 * s.index) % VOCAB)
            row += 1
    assert row == len(plan.sample_seqs) == fb.logit_indices.numel()
    return tokens


def make_workload(seed: int, n_req: int) -> list[tuple[int, str, list[int], SamplingParams]]:
    rng = random.Random(seed)
    systems = [[rng.randrange(10, VOCAB) for _ in range(rng.randrange(20, 60))] for _ in range(3)]
    out = []
    step = 0
    for i in range(n_req):
        step += rng.randrange(0, 3)
        prompt = list(rng.choice(systems)) if rng.random() < 0.7 else []
        prompt += [rng.randrange(10, VOCAB) for _ in range(rng.randrange(1, 50))]
        n = 2 if rng.random() < 0.15 else 1
        params = SamplingParams(max_tokens=rng.randrange(1, 40), n=n, ignore_eos=True)
        out.append((step, f"r{i}", prompt, params))
    return out


def run_sim(num_slots: int, cfg: SchedulerConfig, workload) -> tuple[Scheduler, dict[str, list[int]], int]:
    sched = Scheduler(KVManager(num_slots), config=cfg)
    kv: dict[int, int] = {}
    pending = list(workload)
    seqs = []
    got = {}
    step = 0
    while pending or sched.has_work():
        while pending and pending[0][0] <= step:
            _, rid, prompt, params = pending.pop(0)
            seqs.append(sched.add(rid, prompt, params, now=float(step)))
        plan = sched.schedule(now=float(step))
        sched.check_invariant()
        assert plan.num_tokens <= cfg.max_num_batched_tokens
        assert len(sched.running) <= cfg.max_running
        if not plan.is_empty:
            for x in sched.update(plan, fake_forward(kv, plan), now=float(step) + 0.5):
                got[x.seq_id] = x
        sched.check_invariant()
        step += 1
        assert step < 20_000, "simulation did not converge"
    assert {s.seq_id for s in seqs} <= set(got)
    outputs = {sid: x.output_ids for sid, x in got.items()}
    assert all(x.status is SeqStatus.FINISHED for x in got.values())
    return sched, outputs, step


@pytest.mark.parametrize("priority", ["prefill", "decode"])
def test_simulation_under_memory_pressure(priority: str) -> None:
    workload = make_workload(1, 60)
    cfg = SchedulerConfig(max_num_batched_tokens=48, max_running=12, priority=priority, min_prefill_tokens=8)
    # reference: a pool big enough that nothing is ever preempted
    ref_sched, ref_out, _ = run_sim(20_000, cfg, workload)
    assert ref_sched.num_preemptions == 0
    sched, out, _ = run_sim(260, cfg, workload)
    assert sched.num_preemptions > 0, "the tight pool should force preemption"
    assert sched.kv.hit_tokens > 0, "shared system prompts should hit the cache"
    # every request (and every one of its n samples) finished with exactly max_tokens
    total = 0
    for _, rid, _, params in workload:
        for i in range(params.n):
            sid = rid if i == 0 else f"{rid}#{i}"
            assert len(out[sid]) == params.max_tokens, sid
            total += 1
    assert len(out) == total
    # recomputed sequences produce exactly what they would have without preemption
    assert out == ref_out
    assert not sched.running and not sched.waiting
    assert sched.kv.num_free + sched.kv.evictable == sched.kv.total
    assert sched.kv.locked == 0


def test_all_finished_reasons_and_metrics() -> None:
    workload = make_workload(2, 15)
    cfg = SchedulerConfig(max_num_batched_tokens=32, max_running=4)
    sched = Scheduler(KVManager(400), config=cfg)
    kv: dict[int, int] = {}
    seqs = [sched.add(rid, p, params, now=0.0) for _, rid, p, params in workload]
    t = 0.0
    while sched.has_work():
        t += 1
        plan = sched.schedule(now=t)
        sched.update(plan, fake_forward(kv, plan), now=t + 0.5)
    for s in seqs:
        assert s.status is SeqStatus.FINISHED and s.finish_reason is FinishReason.LENGTH
        assert s.arrival_time <= s.first_scheduled_time < s.first_token_time <= s.finish_time
