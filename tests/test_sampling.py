from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from headway.runtime.llm.sampling import Sampler
from headway.runtime.llm.sequence import SamplingParams, make_generator


@dataclass
class Row:
    params: SamplingParams
    prompt_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None


def rows(n: int, **kw) -> list[Row]:
    p = SamplingParams(**kw)
    return [Row(p) for _ in range(n)]


def test_greedy_is_argmax_and_shape_checked() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    out = Sampler(0).sample(logits, rows(6, temperature=0.0))
    assert out.tokens == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 6
    with pytest.raises(ValueError, match="N == len"):
        Sampler(0).sample(logits, rows(5))


def test_temperature_matches_softmax_distribution() -> None:
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    n = 20000
    for temp in (0.5, 1.0, 2.0):
        out = Sampler(1).sample(base.repeat(n, 1), rows(n, temperature=temp))
        freq = torch.bincount(torch.tensor(out.tokens), minlength=5).float() / n
        want = torch.softmax(base / temp, -1)
        assert torch.allclose(freq, want, atol=0.015), (temp, freq, want)


def _support(logits: torch.Tensor, n: int = 6000, **kw) -> set[int]:
    out = Sampler(2).sample(logits.repeat(n, 1), rows(n, **kw))
    return set(out.tokens)


def test_top_k_top_p_min_p_match_transformers_warpers() -> None:
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.tensor([[3.0, 2.5, 2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    ids = torch.zeros(1, 1, dtype=torch.long)

    def hf_keep(w) -> set[int]:
        return set(torch.isfinite(w(ids, logits.clone())).nonzero()[:, 1].tolist())

    assert _support(logits[0], top_k=3) == hf_keep(TopKLogitsWarper(3)) == {0, 1, 2}
    assert _support(logits[0], top_p=0.8) == hf_keep(TopPLogitsWarper(0.8))
    assert _support(logits[0], min_p=0.2) == hf_keep(MinPLogitsWarper(0.2))
    # combined: top-k then top-p renormalized over the kept tokens (vLLM order)
    assert _support(logits[0], top_k=4, top_p=0.5) <= {0, 1}
    assert _support(logits[0], top_p=1e-6) == {0}  # the best token is always kept


def test_repetition_penalty_matches_transformers() -> None:
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 30, generator=g) * 3
    r = [Row(SamplingParams(temperature=0.0, repetition_penalty=1.7, logprobs=True), [1, 2, 3], [4, 4]),
         Row(SamplingParams(temperature=0.0, repetition_penalty=1.3, logprobs=True), [10], [11, 12])]
    out = Sampler(0).sample(logits, r)
    exp = []
    for i, (row, pen) in enumerate(zip(r, (1.7, 1.3))):
        hist = torch.tensor([row.prompt_ids + row.output_ids])
        exp.append(RepetitionPenaltyLogitsProcessor(pen)(hist, logits[i : i + 1].clone())[0])
    ref = torch.stack(exp)
    assert out.tokens == ref.argmax(-1).tolist()
    want = torch.log_softmax(ref, -1).gather(1, torch.tensor(out.tokens)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(out.logprobs), want, atol=1e-5)


def test_presence_frequency_penalties_openai_semantics() -> None:
    logits = torch.zeros(1, 10)
    logits[0, 3] = 1.0
    logits[0, 4] = 0.9
    row = Row(SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.1,
                             top_logprobs=3), prompt_ids=[4, 4, 4], output_ids=[3, 3, 5])
    out = Sampler(0).sample(logits, [row])
    adj = logits.clone()
    adj[0, 3] -= 0.5 + 2 * 0.1
    adj[0, 5] -= 0.5 + 0.1  # prompt tokens (4) are not penalized
    assert out.tokens == [4]
    lp = torch.log_softmax(adj, -1)[0]
    top = out.top_logprobs[0]
    assert [t for t, _ in top][0] == 4 and len(top) == 3
    assert all(abs(v - lp[t].item()) < 1e-5 for t, v in top)
    assert [v for _, v in top] == sorted([v for _, v in top], reverse=True)


def test_logprobs_are_after_temperature() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    r = [Row(SamplingParams(temperature=0.5, logprobs=True, top_logprobs=2, seed=0), generator=make_generator(0))]
    out = Sampler(0).sample(logits, r)
    lp = torch.log_softmax(logits / 0.5, -1)[0]
    assert abs(out.logprobs[0] - lp[out.tokens[0]].item()) < 1e-5
    assert out.top_logprobs[0][0][0] == 2 and abs(out.top_logprobs[0][0][1] - lp[2].item()) < 1e-5


def test_seeded_rows_independent_of_batch_composition() -> None:
    vocab = 200
    g = torch.Generator().manual_seed(5)
    steps = [torch.randn(1, vocab, generator=g) for _ in range(8)]
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)

    def run(extra: int) -> list[int]:
        target = Row(p, [1, 2], generator=make_generator(1234))
        others = [Row(SamplingParams(temperature=0.8, seed=i), generator=make_generator(i)) for i in range(extra)]
        others += [Row(SamplingParams(temperature=1.3)) for _ in range(extra)]
        sampler = Sampler(seed=extra)  # different shared generator state too
        toks = []
        for lg in steps:
            batch = others[: extra // 2] + [target] + others[extra // 2 :]
            logits = torch.cat([torch.randn(len(batch), vocab) for _ in range(1)])
            logits[extra // 2] = lg[0]
            out = sampler.sample(logits, batch)
            target.output_ids.append(out.tokens[extra // 2])
            toks.append(out.tokens[extra // 2])
        return toks

    a, b, c = run(0), run(3), run(8)
    assert a == b == c
    # a different seed gives a different stream
    assert make_generator(1234, 1).initial_seed() != make_generator(1234).initial_seed()


def test_mixed_greedy_and_random_rows() -> None:
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(9))
    r = [Row(SamplingParams(temperature=0.0)), Row(SamplingParams(temperature=1.0, top_k=1)),
         Row(SamplingParams(temperature=0.0, repetition_penalty=1.2), [0]), Row(SamplingParams(temperature=2.0, top_k=5))]
    out = Sampler(0).sample(logits, r)
    am = logits.argmax(-1).tolist()
    assert out.tokens[0] == am[0] and out.tokens[1] == am[1]  # top_k=1 is argmax
    assert out.tokens[3] in logits[3].topk(5).indices.tolist()


def test_sampling_params_validation() -> None:
    with pytest.raises(ValueError) as e:
        SamplingParams(temperature=-1, top_p=0, top_logprobs=50, n=0, max_tokens=0)
    msg = str(e.value)
    for part in ("temperature", "top_p", "top_logprobs", "n must", "max_tokens"):
        assert part in msg
    assert SamplingParams(stop="###").stop == ("###",)


def test_wide_nucleus_and_exact_truncated_distribution() -> None:
    from transformers.generation.logits_process import TopPLogitsWarper

    # a flat-ish 5000-token distribution: the 0.5 nucleus is ~2500 tokens wide (> candidates)
    logits = torch.linspace(0.0, 0.5, 5000).unsqueeze(0)
    kept = set(torch.isfinite(TopPLogitsWarper(0.5)(torch.zeros(1, 1, dtype=torch.long), logits.clone()))
               .nonzero()[:, 1].tolist())
    got = set(Sampler(4).sample(logits.repeat(3000, 1), rows(3000, top_p=0.5)).tokens)
    assert got <= kept and len(got) > 1024
    # top-k then top-p then min-p: sampled frequencies match the exactly truncated distribution
    base = torch.tensor([[2.0, 1.8, 1.5, 1.0, 0.2, 0.0, -0.5]])
    n = 20000
    out = Sampler(5).sample(base.repeat(n, 1), rows(n, temperature=0.7, top_k=5, top_p=0.9, min_p=0.15))
    freq = torch.bincount(torch.tensor(out.tokens), minlength=7).float() / n
    z = base[0] / 0.7
    p = torch.softmax(z[:5], -1)  # top-k 5, renormalized
    keep = (p.cumsum(0) - p) <= 0.9
    keep &= torch.softmax(z, -1)[:5] >= 0.15 * torch.softmax(z, -1).max()
    want = torch.zeros(7)
    want[:5] = torch.where(keep, p, torch.zeros(5))
    want /= want.sum()
    assert torch.allclose(freq, want, atol=0.015), (freq, want)
