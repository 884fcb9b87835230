"""The engine step loop (scheduler -> batch -> logits -> sampler -> update -> detokenizer)
driven by a real model: tinycoder's 1M-parameter Llama through transformers. The "forward"
recomputes each scheduled sequence's context from its token ids (no KV reuse; the real
ModelRunner lives elsewhere), so this checks the loop's plumbing against HF ``generate``."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from headway.runtime.llm.detokenizer import IncrementalDetokenizer
from headway.runtime.llm.kv_manager import KVManager
from headway.runtime.llm.sampling import Sampler
from headway.runtime.llm.scheduler import Scheduler, SchedulerConfig
from headway.runtime.llm.sequence import FinishReason, SamplingParams

pytestmark = pytest.mark.slow  # loads a model through transformers (~7 s)


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("tinycoder")
    assert spec is not None and spec.origin is not None
    d = os.path.join(os.path.dirname(spec.origin), "models")
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(d, gguf_file="tiny.gguf")
    return model, tok


def run_loop(model, tok, requests, num_slots=64, budget=16):
    sched = Scheduler(KVManager(num_slots), config=SchedulerConfig(max_num_batched_tokens=budget, max_running=4,
                                                                 eos_token_ids=(tok.eos_token_id,)))
    sampler = Sampler(seed=0)
    detoks: dict[str, IncrementalDetokenizer] = {}
    texts: dict[str, str] = {}
    seqs = {}
    for rid, ids, params in requests:
        sched.add(rid, ids, params)
    while sched.has_work():
        plan = sched.schedule()
        if plan.is_empty:
            continue
        fb = plan.to_forward_batch()
        rows = []
        with torch.no_grad():
            for it, cl in zip(plan.items, fb.context_lens):
                if it.num_samples:
                    ctx = torch.tensor([it.seq.all_ids[:cl]])
                    rows += [model(input_ids=ctx).logits[0, -1]] * it.num_samples
        logits = torch.stack(rows).float() if rows else torch.empty(0, model.config.vocab_size)
        out = sampler.sample(logits, plan.sample_seqs)
        for seq in sched.update(plan, out.tokens):
            seqs[seq.seq_id] = seq
            d = detoks.setdefault(seq.seq_id, IncrementalDetokenizer(tok.backend_tokenizer, seq.prompt_ids, seq.params.stop))
            delta = d.push(seq.output_ids[-1])
            if delta.stop is not None:
                sched.finish(seq, FinishReason.STOP, delta.stop)
            texts[seq.seq_id] = texts.get(seq.seq_id, "") + delta.text + (d.flush() if seq.is_finished else "")
        sched.check_invariant()
    return sched, texts, list(seqs.values())


def test_greedy_loop_matches_hf_generate(hf) -> None:
    model, tok = hf
    prompts = ["def fibonacci(n):", "Hello, my name is", "import numpy as np\n", "The quick brown fox jumps over"]
    reqs = []
    for i, p in enumerate(prompts):
        ids = tok(p).input_ids
        reqs.append((f"r{i}", ids, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)))
    # a pool too small for all four at once: chunked prefill, waiting and preemption all happen
    sched, texts, outs = run_loop(model, tok, reqs, num_slots=48, budget=8)
    with torch.no_grad():
        for rid, ids, _ in reqs:
            ref = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                                 min_new_tokens=10, pad_token_id=0)[0, len(ids):].tolist()
            out = next(s for s in outs if s.seq_id == rid)
            assert out.output_ids == ref, rid
            full, head = tok.decode(ids + ref, skip_special_tokens=True), tok.decode(ids, skip_special_tokens=True)
            assert texts[rid] == full[len(head):], rid
    assert sched.num_preemptions > 0 or any(s.num_preemptions for s in outs)


def test_seeded_sampling_independent_of_batch_and_n(hf) -> None:
    model, tok = hf
    ids = tok("int main() {").input_ids
    p = SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=8, ignore_eos=True)
    _, alone, _ = run_loop(model, tok, [("x", ids, p)])
    others = [(f"o{i}", tok(f"other prompt {i}").input_ids, SamplingParams(temperature=1.0, max_tokens=6)) for i in range(3)]
    _, mixed, _ = run_loop(model, tok, others[:2] + [("x", ids, p)] + others[2:])
    assert alone["x"] == mixed["x"] and alone["x"]
    pn = SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=8, ignore_eos=True, n=3)
    _, fork, _ = run_loop(model, tok, [("x", ids, pn)])
    assert fork["x"] == alone["x"]  # sample 0 of n uses the request's seed stream
    assert set(fork) == {"x", "x#1", "x#2"} and len({fork["x"], fork["x#1"], fork["x#2"]}) > 1
