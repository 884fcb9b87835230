"""Multi-LoRA throughput: a batch of 4 concurrent requests on the base model against the same 4
on 4 different adapters (and on one adapter), in one engine, interleaved round by round.

    python -m headway.bench.lora [--model smollm2-135m-instruct] [--ranks 8 16] [--rounds 3]
                                 [--max-tokens 64] [--threads 1] [--json out.json]

Adapters are random PEFT directories on every projection (q, k, v, o, gate, up, down) of the
model, written to a temporary directory. Prefix caching is off, so every batch prefills its
prompts. Throughput is output tokens / wall time of the whole batch (prefill included); the
ratio is the median over rounds of (mode tokens/s) / (base tokens/s) measured in the same round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import TypedDict

from headway.library import resolve
from headway.runtime.llm.config import ModelConfig
from headway.runtime.llm.engine import LLMEngine
from headway.runtime.llm.lora.peft import random_adapter
from headway.runtime.llm.sequence import SamplingParams

PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a hash map handles collisions, with an example in Python.",
    "List five things to check before a long bicycle ride in the mountains.",
    "Summarize the causes of the French Revolution in a few sentences.",
)


async def _batch(engine: LLMEngine, prompts: list[list[int]], adapters: list[str | None], max_tokens: int) -> int:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)

    async def one(ids: list[int], adapter: str | None) -> int:
        n = 0
        async for deltas in engine.generate(ids, params, adapter=adapter):
            n += sum(len(d.token_ids) for d in deltas)
        return n

    return sum(await asyncio.gather(*[one(p, a) for p, a in zip(prompts, adapters)]))


class RankResult(TypedDict):
    rank: int
    tokens_per_s: dict[str, list[float]]   # per mode, one rate per round
    ratio_vs_base: dict[str, float]         # per mode, the median of the per-round ratios


def run(model: str, rank: int, rounds: int, max_tokens: int, threads: int | None) -> RankResult:
    model_dir = resolve(model).path
    cfg = ModelConfig.from_model_dir(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        ads = {f"lora{i}": str(random_adapter(Path(tmp) / f"lora{i}", cfg, r=rank, lora_alpha=2 * rank, seed=i))
               for i in range(4)}
        engine = LLMEngine.launch(model_dir, dtype="float32", num_threads=threads, enable_prefix_caching=False,
                                  lora_adapters=ads, max_loras=4, max_lora_rank=max(64, rank))
        try:
            return _measure(engine, list(ads), rank, rounds, max_tokens)
        finally:
            engine.stop()


def _measure(engine: LLMEngine, ads: list[str], rank: int, rounds: int, max_tokens: int) -> RankResult:
    prompts = [engine.tokenizer.encode_chat([{"role": "user", "content": p}], add_generation_prompt=True)
               for p in PROMPTS]
    modes: dict[str, list[str | None]] = {"base": [None] * 4, "1 adapter x4": ["lora0"] * 4, "4 adapters": list(ads)}
    asyncio.run(_batch(engine, prompts, modes["4 adapters"], 4))  # warm-up: first-use costs
    rates: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(rounds):
        for mode, adapters in modes.items():
            t = time.perf_counter()
            tokens = asyncio.run(_batch(engine, prompts, adapters, max_tokens))
            rates[mode].append(tokens / (time.perf_counter() - t))
    ratios = {m: statistics.median(r / b for r, b in zip(rates[m], rates["base"])) for m in modes}
    return {"rank": rank, "tokens_per_s": rates, "ratio_vs_base": ratios}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.rounds < 1 or args.max_tokens < 1 or any(r < 1 for r in args.ranks):
        ap.error("--rounds, --max-tokens and --ranks must be >= 1")
    results = [run(args.model, r, args.rounds, args.max_tokens, args.threads) for r in args.ranks]
    print(f"\n{args.model}: batch of 4 concurrent requests x {args.max_tokens} output tokens, "
          f"{args.rounds} rounds interleaved (tokens/s per round; ratio = median of per-round ratios)")
    print(f"{'rank':>4}  {'mode':<14} {'tokens/s per round':<30} {'ratio vs base':>13}")
    for res in results:
        for mode, rates in res["tokens_per_s"].items():
            print(f"{res['rank']:>4}  {mode:<14} {', '.join(f'{x:.1f}' for x in rates):<30} "
                  f"{res['ratio_vs_base'][mode]:>12.3f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
