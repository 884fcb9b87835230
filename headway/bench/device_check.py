"""The engine on an accelerator, checked and measured against Hugging Face transformers on the
same device, in one process: `python -m headway.bench.device_check --device cuda`.

For machines that cannot reach a model hub or hold the library's packages (a lent GPU box), it
builds a random-weight model with a real model's shape (SmolLM2-135M by default; `--tiny` for a
seconds-long run) and a tokenizer directory given with `--tokenizer-dir` (any model directory
with tokenizer.json, e.g. the library's converted SmolLM2). Three parts:

1. greedy parity: the engine's greedy tokens (float32, continuous batching of prompts of mixed
   lengths) equal `generate`'s, prompt by prompt;
2. throughput: `batch` requests of `prompt_tokens` -> `output_tokens` through the engine
   against `generate` on the same prompts padded into one batch (same dtype);
3. decode roofline: the engine's steady-state decode tokens/s as a fraction of the device's
   matmul FLOP/s at the engine's own GEMM shapes (the same figure `bench-target roofline` gives).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from headway.bench.targets import engine_decode_roofline

SMOLLM2_135M: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True,
    "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
}
TINY = {**SMOLLM2_135M, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def build_random_model(out: Path, config: dict[str, Any], tokenizer_dir: Path, *, std: float = 0.05,
                       seed: int = 0) -> Path:
    """A Hugging Face directory with random weights (float32) of `config`'s shape and the
    tokenizer files of `tokenizer_dir`. A larger std than HF's init keeps logits peaked, so
    greedy argmax is not decided by rounding."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**config), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, std)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in _TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out / name)
    if not (out / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{tokenizer_dir} has no tokenizer.json")
    return out


def _prompts(n: int, lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 1) for _ in range(lengths[i % len(lengths)])] for i in range(n)]


async def _engine_outputs(engine: Any, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], float]:
    from headway.runtime.llm.sequence import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

    async def one(p: list[int]) -> list[int]:
        ids: list[int] = []
        async for deltas in engine.generate(p, params):
            for d in deltas:
                ids.extend(d.token_ids)
        return ids

    t0 = time.perf_counter()
    outs = await asyncio.gather(*(one(p) for p in prompts))
    return list(outs), time.perf_counter() - t0


def _hf_generate(hf: Any, prompts: list[list[int]], max_tokens: int, device: str) -> tuple[list[list[int]], float]:
    """`generate` on `prompts` left-padded into one batch; greedy, exactly max_tokens each."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                          do_sample=False, pad_token_id=0)
    _sync(device)
    return out[:, width:].tolist(), time.perf_counter() - t0


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _hf(model_dir: Path, dtype: torch.dtype, device: str) -> Any:
    from transformers import AutoModelForCausalLM

    # transformers types PreTrainedModel.to through a wrapper whose signature mypy misreads
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()  # type: ignore[arg-type]


def greedy_parity(model_dir: Path, device: str, *, prompts: int = 8, max_tokens: int = 24) -> dict[str, Any]:
    """Engine (float32, all prompts batched continuously) vs `generate` one prompt at a time."""
    from headway.runtime.llm.engine import LLMEngine

    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    batch = _prompts(prompts, [5, 17, 64, 3, 130, 41, 9, 250], vocab, seed=1)
    engine = LLMEngine.launch(model_dir, dtype="float32", device=device, max_num_batched_tokens=128)
    try:
        ours, _ = asyncio.run(_engine_outputs(engine, batch, max_tokens))
    finally:
        engine.stop()
    hf = _hf(model_dir, torch.float32, device)
    theirs = [_hf_generate(hf, [p], max_tokens, device)[0][0] for p in batch]
    same = sum(a == b for a, b in zip(ours, theirs))
    return {"prompts": len(batch), "identical": same, "max_tokens": max_tokens,
            "first_mismatch": next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)}


def throughput(model_dir: Path, device: str, dtype: str, *, batch: int = 32, prompt_tokens: int = 250,
               output_tokens: int = 128) -> dict[str, Any]:
    """Output tokens/s of the engine and of batched `generate`, same prompts, same dtype."""
    from headway.runtime.llm.engine import LLMEngine

    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompts = _prompts(batch, [prompt_tokens], vocab, seed=2)
    engine = LLMEngine.launch(model_dir, dtype=dtype, device=device, max_running=batch)
    try:
        asyncio.run(_engine_outputs(engine, prompts[:2], 4))  # warm-up
        outs, ours_s = asyncio.run(_engine_outputs(engine, prompts, output_tokens))
    finally:
        engine.stop()
    assert all(len(o) == output_tokens for o in outs), "every request must produce output_tokens tokens"
    hf = _hf(model_dir, getattr(torch, dtype), device)
    _hf_generate(hf, prompts[:2], 4, device)  # warm-up
    _, theirs_s = _hf_generate(hf, prompts, output_tokens, device)
    total = batch * output_tokens
    return {"batch": batch, "prompt_tokens": prompt_tokens, "output_tokens": output_tokens, "dtype": dtype,
            "headway_tokens_per_s": total / ours_s, "transformers_batched_tokens_per_s": total / theirs_s,
            "ratio": theirs_s / ours_s}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="a real Hugging Face model directory to use instead of random weights")
    ap.add_argument("--tokenizer-dir", type=Path, default=None,
                    help="a model directory with tokenizer.json, for the random-weight model")
    ap.add_argument("--work-dir", type=Path, default=Path("device-check-model"))
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model of the same vocabulary (seconds)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=250)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    if (a.model_dir is None) == (a.tokenizer_dir is None):
        ap.error("give --model-dir (a real model) or --tokenizer-dir (random weights with that tokenizer)")
    if a.model_dir is not None:
        model_dir, label = a.model_dir, str(a.model_dir)
    else:
        model_dir = build_random_model(a.work_dir, TINY if a.tiny else SMOLLM2_135M, a.tokenizer_dir)
        label = "random, tiny" if a.tiny else "random, smollm2-135m shape"
    report: dict[str, Any] = {"device": a.device, "device_name": torch.cuda.get_device_name(0)
                              if a.device.startswith("cuda") else "cpu", "model": label}
    report["greedy_parity"] = greedy_parity(model_dir, a.device)
    print("greedy parity:", json.dumps(report["greedy_parity"]), flush=True)
    report["throughput"] = throughput(model_dir, a.device, a.dtype, batch=a.batch, prompt_tokens=a.prompt_tokens,
                                      output_tokens=a.output_tokens)
    print("throughput:", json.dumps(report["throughput"]), flush=True)
    report["roofline"] = engine_decode_roofline(model_dir, batch=a.batch, context=a.prompt_tokens, steps=48,
                                                dtype=a.dtype, device=a.device)
    print("decode roofline:", json.dumps(report["roofline"]), flush=True)
    if a.json:
        a.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
