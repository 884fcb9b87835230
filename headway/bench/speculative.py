"""Speculative decoding benchmark: the same engine with and without speculation, side by side.

    python -m headway.bench.speculative                      # n-gram, SmolLM2, batch 1 (+ batch sweep)
    python -m headway.bench.speculative --method draft --model qwen2.5-coder-1.5b-instruct \\
        --draft-model qwen2.5-coder-0.5b-instruct --batches 1

The task is input-grounded: the prompt gives a source file of this repository and asks for it
back with one identifier renamed, so much of the answer is in the context. Greedy decoding.
Two engines (speculation off / on) live in one process; each round runs the baseline and the
speculative engine one after the other (the order alternates), so load from other work on
the machine hits both alike. Reported: output tokens/s per request (prefill excluded: from
the first token to the last) and its ratio, acceptance rate, mean accepted length, and
whether every output is token for token identical to the baseline's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

from headway.bench.report import machine_info
from headway.library import resolve
from headway.runtime.llm.engine import LLMEngine
from headway.runtime.llm.sequence import SamplingParams
from headway.runtime.llm.speculation import SpeculativeConfig

ROOT = Path(__file__).resolve().parents[1]
FILES = ["runtime/llm/kv_pool.py", "runtime/llm/chunking.py", "runtime/llm/outputs.py", "runtime/llm/device.py",
         "runtime/llm/speculation/adaptive.py", "runtime/llm/speculation/ngram.py", "runtime/llm/batch.py",
         "runtime/llm/speculation/config.py"]


def grounded_prompt(engine: LLMEngine, index: int, max_chars: int) -> list[int]:
    """A chat prompt that hands the model a source file and asks for it back, lightly edited."""
    src = (ROOT / FILES[index % len(FILES)]).read_text()[:max_chars]
    text = ("Here is a Python file:\n\n```python\n" + src + "\n```\n\nRewrite this file exactly as it is, "
            "but add a one-line comment `# reviewed` at the top. Output only the code.")
    return engine.tokenizer.encode_chat([{"role": "user", "content": text}])


async def _one(engine: LLMEngine, ids: list[int], params: SamplingParams) -> tuple[list[int], float, float]:
    start = time.perf_counter()
    first = None
    toks: list[int] = []
    async for deltas in engine.generate(ids, params):
        for d in deltas:
            if d.token_ids and first is None:
                first = time.perf_counter()
            toks += d.token_ids
    end = time.perf_counter()
    return toks, (first or end) - start, end - (first or end)


def run_batch(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> dict[str, Any]:
    async def main() -> list[tuple[list[int], float, float]]:
        return await asyncio.gather(*[_one(engine, p, params) for p in prompts])
    t0 = time.perf_counter()
    outs = asyncio.run(main())
    wall = time.perf_counter() - t0
    ttft = max(o[1] for o in outs)
    n = sum(len(o[0]) - 1 for o in outs)  # tokens after the first one
    return {"tokens": [o[0] for o in outs], "decode_tok_s": n / max(wall - ttft, 1e-9), "wall_s": wall}


def spec_counts(engine: LLMEngine) -> tuple[int, int, int]:
    sp = engine.speculator
    return (sp.proposed, sp.accepted, sp.verified) if sp else (0, 0, 0)


def measure(base: LLMEngine, spec: LLMEngine, batch: int, rounds: int, max_tokens: int,
            max_chars: int) -> dict[str, Any]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    prompts = [grounded_prompt(base, i, max_chars) for i in range(batch)]
    run_batch(base, prompts, SamplingParams(temperature=0, max_tokens=4))  # warm: prefix cache, threads
    run_batch(spec, prompts, SamplingParams(temperature=0, max_tokens=4))
    rates: dict[str, list[float]] = {"base": [], "spec": []}
    identical = True
    c0 = spec_counts(spec)
    for r in range(rounds):
        order = [("base", base), ("spec", spec)] if r % 2 == 0 else [("spec", spec), ("base", base)]
        got: dict[str, list[list[int]]] = {}
        for name, engine in order:
            res = run_batch(engine, prompts, params)
            rates[name].append(res["decode_tok_s"])
            got[name] = res["tokens"]
        identical &= got["base"] == got["spec"]
    c1 = spec_counts(spec)
    proposed, accepted, verified = (b - a for a, b in zip(c0, c1))
    b, s = statistics.median(rates["base"]), statistics.median(rates["spec"])
    return {"batch": batch, "base_tok_s": round(b, 2), "spec_tok_s": round(s, 2), "ratio": round(s / b, 3),
            "identical": identical, "acceptance_rate": round(accepted / proposed, 3) if proposed else 0.0,
            "mean_accepted_length": round(accepted / verified, 2) if verified else 0.0,
            "rounds": rounds, "base_all": [round(x, 2) for x in rates["base"]],
            "spec_all": [round(x, 2) for x in rates["spec"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--method", choices=["ngram", "draft"], default="ngram")
    ap.add_argument("--draft-model", default=None, help="draft: a library name (same tokenizer)")
    ap.add_argument("--draft-layers", type=int, default=None, help="draft: keep the first N layers")
    ap.add_argument("--num-tokens", type=int, default=8, help="most tokens proposed per step")
    ap.add_argument("--ngram-min", type=int, default=2)
    ap.add_argument("--ngram-max", type=int, default=4)
    ap.add_argument("--batches", default="1,4,8,16", help="batch sizes (comma separated)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--max-chars", type=int, default=2400, help="characters of each source file in the prompt")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--kv-cache-tokens", type=int, default=16384, help="KV pool of each engine")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = ap.parse_args()
    path = resolve(a.model).path
    draft_dir = resolve(a.draft_model).path if a.draft_model else None
    batches = [int(x) for x in a.batches.split(",")]
    cfg = SpeculativeConfig(method=a.method, num_tokens=a.num_tokens, ngram_min=a.ngram_min, ngram_max=a.ngram_max,
                            draft_model_dir=draft_dir,
                            draft_layers=a.draft_layers, max_batch=max(batches))
    kw: dict[str, Any] = dict(dtype=a.dtype, num_threads=a.threads, kv_cache_tokens=a.kv_cache_tokens)
    base = LLMEngine.launch(path, **kw)
    spec = LLMEngine.launch(path, speculative=cfg, **kw)
    print(f"model {a.model} ({base.dtype}), speculation: {cfg.describe()}")
    print(f"{'batch':>5} {'base tok/s':>11} {'spec tok/s':>11} {'ratio':>7} {'accept':>7} {'mean len':>9} identical")
    results = []
    try:
        for bsz in batches:
            r = measure(base, spec, bsz, a.rounds, a.max_tokens, a.max_chars)
            results.append(r)
            print(f"{r['batch']:>5} {r['base_tok_s']:>11.2f} {r['spec_tok_s']:>11.2f} {r['ratio']:>6.2f}x "
                  f"{r['acceptance_rate']:>7.2f} {r['mean_accepted_length']:>9.2f} {r['identical']}", flush=True)
    finally:
        base.stop()
        spec.stop()
    if a.json:
        a.json.write_text(json.dumps({"machine": machine_info(), "args": vars(a) | {"json": str(a.json)},
                                      "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
