"""Speculative decoding through the real engine (SmolLM2-135M-Instruct; tinycoder for the
distribution test): greedy output token for token identical to decoding without speculation
(n-gram and a 4-layer draft of the same model; one request at a time and a batch; an
input-grounded prompt where most proposals are accepted), stop strings and max_tokens inside
an accepted run, the target's logprobs, n > 1, seeded sampling reproducible, and the
distribution of sampled tokens unchanged (chi-square over many seeds)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from headway.bench.speculative import grounded_prompt
from headway.library import resolve
from headway.runtime.llm.engine import LLMEngine
from headway.runtime.llm.sequence import SamplingParams
from headway.runtime.llm.speculation import SpeculativeConfig

pytestmark = pytest.mark.slow  # loads SmolLM2 three times (~10 s) and decodes a few hundred tokens



def chat(tok, text: str) -> list[int]:  # type: ignore[no-untyped-def]
    return tok.encode(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n").ids


async def _one(engine: LLMEngine, ids: list[int], params: SamplingParams) -> dict[int, dict]:
    out: dict[int, dict] = {}
    async for deltas in engine.generate(ids, params):
        for d in deltas:
            o = out.setdefault(d.index, {"tokens": [], "text": "", "lps": [], "finish": None})
            o["tokens"] += d.token_ids
            o["text"] += d.text
            o["lps"] += [lp.logprob for lp in d.logprobs or []]
            o["finish"] = d.finish_reason or o["finish"]
    return out


def run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> list[dict[int, dict]]:
    async def main() -> list[dict[int, dict]]:
        return await asyncio.gather(*[_one(engine, p, params) for p in prompts])
    return asyncio.run(main())


@pytest.fixture(scope="module")
def engines():
    path = resolve("smollm2-135m-instruct").path
    kw = dict(dtype="float32", kv_cache_tokens=8192, num_threads=2)
    base = LLMEngine.launch(path, **kw)
    ngram = LLMEngine.launch(path, speculative=SpeculativeConfig(method="ngram", max_batch=8), **kw)
    draft = LLMEngine.launch(path, speculative=SpeculativeConfig(method="draft", draft_layers=4, num_tokens=4,
                                                                 max_batch=8), **kw)
    yield base, ngram, draft
    for e in (base, ngram, draft):
        e.stop()


def test_greedy_output_is_identical(engines) -> None:
    base, ngram, draft = engines
    tok = base.tokenizer.tokenizer
    grounded = grounded_prompt(base, 0, 2400)  # a source file to hand back with a comment added
    prompts = [grounded, chat(tok, "Write a short poem about the sea."),
               chat(tok, "List three prime numbers and explain why they are prime.")]
    params = SamplingParams(temperature=0, max_tokens=64)
    want = [o[0]["tokens"] for o in run(base, prompts, params)]
    assert all(len(w) > 20 for w in want)
    for engine in (ngram, draft):
        alone = [run(engine, [p], params)[0][0]["tokens"] for p in prompts]
        batch = [o[0]["tokens"] for o in run(engine, prompts, params)]
        assert alone == want and batch == want
        st = engine.state()["speculative"]
        assert st["proposed_tokens"] > 0 and st["accepted_tokens"] > 0
    before = ngram.state()["speculative"]
    run(ngram, [grounded], params)
    after = ngram.state()["speculative"]  # the grounded prompt copies: many proposals accepted
    assert (after["accepted_tokens"] - before["accepted_tokens"]) > 0.35 * (
        after["proposed_tokens"] - before["proposed_tokens"]) > 10
    text = base.metrics.render().decode()
    spec_metrics = ngram.metrics.render().decode()
    assert "headway_llm_spec_accepted_tokens_total" in spec_metrics
    assert 'headway_llm_spec_acceptance_rate{model="model"} 0.0' not in spec_metrics
    assert "headway_llm_spec_proposed_tokens_total{model=\"model\"} 0.0" in text  # no speculation: zero


def test_stops_logprobs_and_n_inside_accepted_runs(engines) -> None:
    base, ngram, _ = engines
    # prompt 0 answers at length; prompt 1's answer is a few tokens on some thread counts and chunkings
    prompt = grounded_prompt(base, 0, 2400)
    full = run(base, [prompt], SamplingParams(temperature=0, max_tokens=64))[0][0]
    # a stop string that ends mid-output: the spec engine must cut at the same place
    assert len(full["text"]) > 60, full["text"]
    stop = full["text"][40:52]
    cases = ((SamplingParams(temperature=0, max_tokens=64, stop=(stop,), logprobs=True, top_logprobs=2), "stop"),
             (SamplingParams(temperature=0, max_tokens=37, logprobs=True), "length"))
    for params, finish in cases:
        before = ngram.state()["speculative"]["accepted_tokens"]
        want = run(base, [prompt], params)[0][0]
        got = run(ngram, [prompt], params)[0][0]
        assert ngram.state()["speculative"]["accepted_tokens"] > before  # runs were accepted
        assert got["tokens"] == want["tokens"] and got["text"] == want["text"]
        assert got["finish"] == want["finish"] == finish
        assert len(got["lps"]) == len(got["tokens"])
        assert got["lps"] == pytest.approx(want["lps"], abs=2e-3)
    assert len(got["tokens"]) == 37
    # n > 1, seeded sampling: every choice reproducible, choices differ from each other
    params = SamplingParams(temperature=0.8, max_tokens=40, n=3, seed=7)
    a = run(ngram, [prompt], params)[0]
    b = run(ngram, [prompt], params)[0]
    assert sorted(a) == [0, 1, 2] and all(a[i]["tokens"] == b[i]["tokens"] for i in range(3))
    assert len({tuple(a[i]["tokens"]) for i in range(3)}) > 1


def _pair_counts(engine: LLMEngine, ids: list[int], n: int) -> dict[tuple[int, int], int]:
    params = [SamplingParams(temperature=1.5, top_k=4, max_tokens=3, seed=s, ignore_eos=True) for s in range(n)]

    async def main() -> list[dict[int, dict]]:
        outs = []
        for i in range(0, n, 32):  # batches of 32 requests: speculation on (max_batch=64)
            outs += await asyncio.gather(*[_one(engine, ids, p) for p in params[i:i + 32]])
        return outs
    counts: dict[tuple[int, int], int] = {}
    for o in asyncio.run(main()):
        t = o[0]["tokens"]
        pair = (t[1], t[2])  # tokens 2 and 3: both verified (token 1 comes from prefill)
        counts[pair] = counts.get(pair, 0) + 1
    return counts


def test_sampling_distribution_unchanged_under_chi_square() -> None:
    from tests.test_speculation import chi2_homogeneity_p

    path = resolve("tinycoder-test").path
    kw = dict(dtype="float32", kv_cache_tokens=8192, num_threads=1, max_running=64)
    engines = [LLMEngine.launch(path, **kw),
               LLMEngine.launch(path, speculative=SpeculativeConfig(method="draft", draft_layers=1, num_tokens=2,
                                                                    max_batch=64), **kw)]
    try:
        ids = engines[0].tokenizer.tokenizer.encode("def add(a, b):\n    return a + b\n\ndef").ids
        base, spec = (_pair_counts(e, ids, 600) for e in engines)
        st = engines[1].state()["speculative"]
        assert st["proposed_tokens"] > 300 and 0 < st["accepted_tokens"] < st["proposed_tokens"]
        keys = sorted(set(base) | set(spec))
        a = torch.tensor([base.get(k, 0) for k in keys])
        b = torch.tensor([spec.get(k, 0) for k in keys])
        assert chi2_homogeneity_p(a, b) > 1e-3
    finally:
        for e in engines:
            e.stop()


def test_grammar_constrained_output_is_identical_with_ngram_speculation(engines) -> None:
    """Structured output and speculation together: each proposed position is masked by the
    grammar state after the tokens before it, so the verified run is what masked greedy
    decoding gives, and it parses."""
    import json

    from headway.runtime.llm.grammar import GrammarSpec

    base, ngram, _ = engines
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items":
              {"type": "string"}, "maxItems": 4}, "size": {"type": "integer"}}, "required": ["name", "tags", "size"]}
    source = json.dumps({"name": "kv_pool", "tags": ["memory", "slots", "invariant"], "size": 78})
    ids = chat(base.tokenizer.tokenizer, f"Repeat this JSON object exactly, nothing else: {source}")

    def params(engine: LLMEngine) -> SamplingParams:
        grammar = asyncio.run(engine.grammars.compile(GrammarSpec.json_schema(schema)))
        return SamplingParams(temperature=0.0, max_tokens=80, grammar=grammar)

    proposed = ngram.speculator.proposed
    [want] = run(base, [ids], params(base))
    [got] = run(ngram, [ids], params(ngram))
    assert got[0]["tokens"] == want[0]["tokens"]
    doc = json.loads(got[0]["text"])
    assert set(doc) == {"name", "tags", "size"} and isinstance(doc["size"], int)
    assert ngram.speculator.proposed > proposed          # the grammar row was speculated on, not skipped
