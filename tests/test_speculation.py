"""Speculative decoding without a model: the scheduler's runs of proposed tokens (slots of
rejected proposals freed, stops inside a run, only committed tokens cached), the n-gram
proposer, the adaptive length, and the exactness of verification (greedy prefix rule;
rejection sampling matches the target distribution under a chi-square test, and the test
catches a deliberately wrong acceptance rule)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

from headway.runtime.llm.kv_manager import KVManager
from headway.runtime.llm.sampling import Sampler
from headway.runtime.llm.scheduler import Scheduler, SchedulerConfig
from headway.runtime.llm.sequence import FinishReason, SamplingParams, SeqStatus
from headway.runtime.llm.speculation import SpeculativeConfig
from headway.runtime.llm.speculation.adaptive import AdaptiveLength
from headway.runtime.llm.speculation.ngram import propose_ngram
from headway.runtime.llm.speculation.verify import Verdict, _Row, truncated_probs, verify


def chi2_homogeneity_p(a: torch.Tensor, b: torch.Tensor) -> float:
    """p-value of a chi-square test that two count vectors come from one distribution."""
    keep = (a + b) > 0
    a, b = a[keep].double(), b[keep].double()
    na, nb = a.sum(), b.sum()
    pooled = (a + b) / (na + nb)
    ea, eb = pooled * na, pooled * nb
    stat = (((a - ea) ** 2) / ea).sum() + (((b - eb) ** 2) / eb).sum()
    df = keep.sum().item() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat / 2.0))


def chi2_gof_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of a chi-square goodness-of-fit test of ``counts`` against ``probs``."""
    keep = probs > 0
    n = counts.sum().double()
    e = probs[keep].double() * n
    stat = (((counts[keep].double() - e) ** 2) / e).sum() + (counts[~keep].sum().double() * 1e9)
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat / 2.0))


# ---- scheduler: runs of tokens ------------------------------------------------------------

def mk(num_slots: int = 128, **cfg) -> Scheduler:
    return Scheduler(KVManager(num_slots), config=SchedulerConfig(**cfg))


def prefill(s: Scheduler, rid: str, prompt: list[int], **params):
    seq = s.add(rid, prompt, SamplingParams(ignore_eos=True, **params))
    plan = s.schedule(now=0.0)
    s.update(plan, [7] * len(plan.sample_seqs), now=0.0)
    s.check_invariant()
    return seq


def test_run_keeps_accepted_kv_and_frees_the_rest() -> None:
    s = mk(128)
    seq = prefill(s, "a", [1, 2, 3, 4], max_tokens=50)
    assert seq.output_ids == [7] and seq.num_computed == 4
    free0 = s.kv.num_free
    plan = s.schedule(now=0.0, proposals={"a": [8, 9, 10]})
    (it,) = plan.items
    assert it.token_ids == [7, 8, 9, 10] and it.positions == [4, 5, 6, 7] and it.proposal == [8, 9, 10]
    assert plan.proposal_rows() == {id(seq): [0, 1, 2, 3]}
    fb = plan.to_forward_batch()
    assert fb.logit_indices.tolist() == [0, 1, 2, 3]
    assert s.kv.num_free == free0 - 4
    s.check_invariant()
    s.update(plan, [[8, 9, 42]], now=0.0)  # 2 accepted, then the target's own token
    s.check_invariant()
    assert seq.output_ids == [7, 8, 9, 42]
    assert seq.num_computed == seq.num_tokens - 1 == 7  # K/V of 7, 8, 9 kept; 10's freed
    assert s.kv.num_free == free0 - 3
    plan = s.schedule(now=0.0)
    assert plan.items[0].token_ids == [42] and plan.items[0].positions == [7]
    s.update(plan, [5], now=0.0)
    s.check_invariant()


def test_mixed_batch_rows_and_bad_runs() -> None:
    s = mk(256, max_running=4)
    a = prefill(s, "a", [1, 2, 3], max_tokens=50)
    b = prefill(s, "b", [4, 5, 6], max_tokens=50)
    plan = s.schedule(now=0.0, proposals={"a": [1, 2]})
    assert [len(it.token_ids) for it in plan.items] == [3, 1]
    # rows: one per sample seq (a after its last known token, b), then a's proposal rows
    assert plan.proposal_rows() == {id(a): [0, 2, 3]} and plan.sample_seqs == [a, b]
    assert plan.to_forward_batch().logit_indices.tolist() == [0, 3, 1, 2]
    with pytest.raises(ValueError, match="1 \\+ proposed at most"):
        s.update(plan, [[1, 2], [3, 4]], now=0.0)  # b proposed nothing: one token only
    assert a.output_ids == [7, 7] and b.output_ids == [7]  # a bad update applies nothing
    s.update(plan, [[1, 2, 5], [3]], now=0.0)
    assert a.output_ids == [7, 7, 1, 2, 5] and b.output_ids == [7, 3]
    s.check_invariant()


def test_stops_inside_a_run_cut_it_and_cache_only_committed() -> None:
    s = mk(128, eos_token_ids=(99,))
    seq = s.add("a", [1, 2, 3, 4], SamplingParams(max_tokens=50))
    s.update(s.schedule(now=0.0), [7], now=0.0)
    plan = s.schedule(now=0.0, proposals={"a": [8, 99, 10]})
    s.update(plan, [[8, 99, 10, 11]], now=0.0)  # EOS accepted mid-run: nothing past it
    assert seq.output_ids == [7, 8, 99] and seq.finish_reason is FinishReason.STOP
    s.check_invariant()
    assert s.kv.locked == 0 and s.kv.num_free + s.kv.evictable == s.kv.total
    # cached: exactly the computed committed tokens (the last one never has K/V)
    assert s.kv.cache.match(None, [1, 2, 3, 4, 7, 8, 99, 10])[0] == 6
    # max_tokens inside a run
    seq = s.add("b", [1, 2, 3, 4], SamplingParams(max_tokens=3, ignore_eos=True))
    s.update(s.schedule(now=0.0), [7], now=0.0)
    s.update(s.schedule(now=0.0, proposals={"b": [8, 9, 10]}), [[8, 9, 10, 11]], now=0.0)
    assert seq.output_ids == [7, 8, 9] and seq.finish_reason is FinishReason.LENGTH
    s.check_invariant()
    assert s.kv.num_free + s.kv.evictable == s.kv.total


def test_truncate_for_stop_strings_and_proposal_dropped_when_short() -> None:
    s = mk(128)
    seq = prefill(s, "a", [1, 2, 3], max_tokens=50)
    s.update(s.schedule(now=0.0, proposals={"a": [8, 9, 10]}), [[8, 9, 10, 11]], now=0.0)
    assert seq.output_ids == [7, 8, 9, 10, 11] and seq.num_computed == 7
    s.truncate(seq, 2)  # a stop string ended in the second token
    assert seq.output_ids == [7, 8] and seq.num_computed == seq.num_tokens - 1
    s.check_invariant()
    s.finish(seq, FinishReason.STOP, "x")
    s.check_invariant()
    # a pool with no room for the proposal runs the plain decode instead of preempting
    s = mk(17)
    c = prefill(s, "c", [20, 21, 22, 23], max_tokens=50)
    b = prefill(s, "b", list(range(1, 11)), max_tokens=50)
    assert s.kv.num_free == 2
    plan = s.schedule(now=0.0, proposals={"c": [1, 2, 3]})
    assert [it.proposal for it in plan.items] == [[], []] and not plan.preempted
    s.update(plan, [3, 3], now=0.0)
    s.check_invariant()
    assert c.status is SeqStatus.RUNNING and b.status is SeqStatus.RUNNING


# ---- proposer and adaptive length ---------------------------------------------------------

def test_ngram_proposes_the_latest_continuation_longest_match_first() -> None:
    toks = [1, 2, 3, 4, 5, 9, 2, 3, 4, 6, 7, 8, 3, 4]
    assert propose_ngram(toks, 3, 1, 3) == [6, 7, 8]  # "2 3 4"? no: tail is "8 3 4"; "3 4" -> latest is 6 7 8
    assert propose_ngram([1, 2, 3, 1, 2], 2, 2, 2) == [3, 1]
    assert propose_ngram([5, 6, 7], 4, 1, 3) == []
    assert propose_ngram([1, 2, 1, 2], 0, 1, 2) == []
    assert propose_ngram([9, 1, 2, 3, 9, 7, 2, 3], 2, 1, 3) == [9, 7]  # n=2 "2 3" beats n=1
    with pytest.raises(ValueError, match="min_n <= max_n"):
        propose_ngram([1, 2], 2, 3, 2)


def test_adaptive_length_grows_and_shrinks() -> None:
    ad = AdaptiveLength(max_tokens=8)
    start = ad.next_length()
    for _ in range(10):
        ad.observe(ad.next_length(), ad.next_length())
    assert ad.next_length() == 8 > start
    for _ in range(10):
        ad.observe(ad.next_length(), 0)
    assert ad.next_length() == 1
    with pytest.raises(ValueError, match="accepted must be in"):
        ad.observe(2, 3)
    with pytest.raises(ValueError, match="draft_model"):
        SpeculativeConfig(method="draft")
    with pytest.raises(ValueError, match="num_tokens"):
        SpeculativeConfig(num_tokens=0)


# ---- verification -------------------------------------------------------------------------

def test_greedy_accepts_the_matching_prefix_then_the_target_token() -> None:
    logits = torch.full((4, 10), -5.0)
    for row, best in enumerate([3, 4, 1, 6]):
        logits[row, best] = 5.0
    row = _Row(SamplingParams(temperature=0, logprobs=True), [1], [])
    v = verify(logits, [3, 4, 2], row, lambda: 0.5)
    assert v.tokens == [3, 4, 1] and v.accepted == 2
    assert v.logprobs is not None and len(v.logprobs) == 3
    assert v.logprobs[0].logprob == pytest.approx(float(torch.log_softmax(logits[0], -1)[3]))
    v = verify(logits, [3, 4, 1], row, lambda: 0.5)
    assert v.tokens == [3, 4, 1, 6] and v.accepted == 3
    allowed = torch.ones(4, 10, dtype=torch.bool)
    allowed[0, 3] = False  # a per-position mask rejects even the argmax
    v = verify(logits, [3, 4, 1], row, lambda: 0.5, allowed=allowed)
    assert v.accepted == 0 and v.tokens[0] != 3


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.8, top_k=6),
    SamplingParams(temperature=1.3, top_p=0.7),
    SamplingParams(temperature=1.0, min_p=0.05, top_k=8, top_p=0.9),
])
def test_truncated_probs_is_what_the_sampler_draws_from(params: SamplingParams) -> None:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 24, generator=g) * 2
    n = 20000
    out = Sampler(seed=3).sample(z.repeat(n, 1), [_Row(params, [1], [])] * n)
    counts = torch.bincount(torch.tensor(out.tokens), minlength=24)
    probs = truncated_probs(z / params.temperature, params)[0]
    assert chi2_gof_p(counts, probs) > 1e-3


def _resample_from_p(logits, proposal, row, uniform, draft_probs=None):  # type: ignore[no-untyped-def]
    """A classic wrong rule: accept with min(1, p/q) but on rejection draw from p itself
    instead of norm(max(0, p - q)), which over-weights the draft's favourite tokens."""
    p = truncated_probs(logits / row.params.temperature, row.params)
    out: list[int] = []
    for i, t in enumerate(proposal):
        if uniform() * float(draft_probs[i, t]) < float(p[i, t]):
            out.append(t)
            continue
        out.append(int(torch.multinomial(p[i], 1)))
        return Verdict(out, i, None)
    out.append(int(torch.multinomial(p[len(proposal)], 1)))
    return Verdict(out, len(proposal), None)


def _joint_first_two(logits: torch.Tensor, params: SamplingParams, n: int, seed: int,
                     q: torch.Tensor | None, rule=verify) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Counts of the first two emitted tokens over n verifications of 2-token proposals:
    drawn from ``q`` each time (a draft), or the argmax then token 2 (an n-gram) when q is
    None. Row 1 of ``logits`` does not depend on the first token, so when only one token is
    emitted the second (the next step's) is drawn from row 1's target distribution."""
    V = logits.shape[1]
    rng = torch.Generator().manual_seed(seed)
    p1 = truncated_probs(logits[1:2] / params.temperature, params)[0]
    row = _Row(params, [1], [])
    counts = torch.zeros(V * V, dtype=torch.int64)
    for _ in range(n):
        if q is None:
            toks = [int(logits[0].argmax()), 2]
        else:
            toks = [int(torch.multinomial(q[i], 1, generator=rng)) for i in range(2)]
        v = rule(logits, toks, row, lambda: float(torch.rand(1, generator=rng, dtype=torch.float64)),
                 draft_probs=q)
        second = v.tokens[1] if len(v.tokens) > 1 else int(torch.multinomial(p1, 1, generator=rng))
        counts[v.tokens[0] * V + second] += 1
    return counts


def test_rejection_sampling_matches_the_target_and_the_test_catches_a_wrong_rule() -> None:
    V = 6
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, V, generator=g)
    logits[1] = logits[2]
    params = SamplingParams(temperature=1.2, top_k=5)
    p = truncated_probs(logits / params.temperature, params)
    target = (p[0].unsqueeze(1) * p[1].unsqueeze(0)).flatten()  # the joint without speculation
    q = torch.softmax(2 * torch.randn(2, V, generator=g), -1)
    n = 2000
    assert chi2_gof_p(_joint_first_two(logits, params, n, 1, None), target) > 1e-3  # n-gram (q one-hot)
    assert chi2_gof_p(_joint_first_two(logits, params, n, 2, q), target) > 1e-3  # draft
    # the same test fails a classic bug: after a rejection, resampling from p (not p - q)
    assert chi2_gof_p(_joint_first_two(logits, params, n, 3, q, rule=_resample_from_p), target) < 1e-3


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "step", "step", "step", "abort", "cut"]), st.integers(0, 7),
                          st.integers(1, 30), st.integers(1, 9)), max_size=50))
def test_property_runs_keep_the_kv_true(ops) -> None:
    """Random adds, speculative steps (random proposals, random accepted prefixes), aborts and
    stop-string cuts on a small pool (so proposals get dropped and sequences preempted and
    resumed): every slot a running sequence holds, cached prefix included, holds the K/V of
    its token at its position, i.e. rejected proposals never survive, and the cache only
    hands out committed tokens."""
    s = mk(64, max_num_batched_tokens=16, max_running=4, eos_token_ids=(0,))
    written: dict[int, tuple[int, int]] = {}  # slot -> (token, position): what the forward wrote
    n = 0

    def do_step(a: int) -> None:
        props = {q.seq_id: [(a + j) % 6 + 1 for j in range(a % 5)] for q in s.running if not q.in_prefill}
        plan = s.schedule(proposals=props)
        for it in plan.items:
            for tok, pos, slot in zip(it.token_ids, it.positions, it.out_slots):
                written[slot] = (tok, pos)
        runs = []
        for q in plan.sample_seqs:
            it = next((i for i in plan.items if i.seq is q), None)
            prop = it.proposal if it is not None else []
            take = (a + len(q.output_ids)) % (len(prop) + 1)
            runs.append(prop[:take] + [(a * 3 + len(q.output_ids)) % 7 + 1])
        s.update(plan, runs)

    def check() -> None:
        s.check_invariant()
        for q in s.running:
            ids = q.all_ids
            assert q.num_computed <= q.num_tokens
            for i, slot in enumerate(q.slots):
                assert written[slot] == (ids[i], i), (q.seq_id, i)

    for op, a, length, mt in ops:
        if op == "add":
            s.add(f"r{n}", [(a * 5 + i) % 9 + 1 for i in range(length)], SamplingParams(max_tokens=mt))
            n += 1
        elif op == "step":
            do_step(a)
        elif op == "abort" and n:
            s.abort(f"r{a % n}")
        elif op == "cut":
            cands = [q for q in s.running if len(q.output_ids) >= 2]
            if cands:
                q = cands[a % len(cands)]
                s.truncate(q, 1 + a % (len(q.output_ids) - 1))
                s.finish(q, FinishReason.STOP, "x")
        check()
    for i in range(2000):
        if not s.has_work():
            break
        do_step(i)
        check()
    assert not s.has_work()
    assert s.kv.locked == 0 and s.kv.num_free + s.kv.evictable == s.kv.total


def test_speculator_proposes_within_max_tokens_and_stops_above_max_batch() -> None:
    from headway.runtime.llm.speculation import Speculator

    s = mk(256, max_running=4)
    rep = [1, 2, 3, 4, 5, 6, 7, 8, 9] * 3
    prefill(s, "a", rep, max_tokens=50)  # output [7]: only "7" matches (n=1); its latest occurrence
    sp = Speculator(SpeculativeConfig(method="ngram", ngram_min=1, num_tokens=6, max_batch=1))
    props = sp.propose(s.running)
    assert props == {"a": [8, 9, 7]}  # is the prompt's last 7, followed by 8 9 and the output's 7
    b = prefill(s, "b", rep, max_tokens=2)
    assert sp.propose(s.running) == {}  # two running > max_batch=1: off
    sp = Speculator(SpeculativeConfig(method="ngram", ngram_min=1, num_tokens=6, max_batch=2))
    props = sp.propose(s.running)
    # b has 1 of 2 tokens: the step's own token reaches max_tokens, so nothing to propose
    assert len(b.output_ids) == 1 and "b" not in props and props["a"]
