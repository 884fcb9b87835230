"""Inter-token latency with and without structured output, side by side in one process:
`python -m headway.bench.structured`.

The engine (SmolLM2 by default) runs batches of `batch` concurrent requests, alternating an
unconstrained round and a JSON-schema round on the same prompts, `rounds` times each, so both
see the same machine load. Both modes produce exactly `max_tokens` tokens: the baseline with
`ignore_eos`, the constrained one under a schema (an array of at least 50 records) that cannot
be complete before `max_tokens`, so lengths and context sizes match. ITL is per request
(last token time - first token time) / (tokens - 1), taken where the asyncio caller receives
the tokens; the table gives the median over requests and the ratio constrained / baseline.
The grammar is compiled (and cached) before the first measured round.

On a shared machine the end-to-end ITLs are noisy, so the run also measures the grammar's own
work per decode step directly: the constrained rounds' token sequences are replayed through
the step loop's `GrammarMasker` (fill one bitmask row per sequence, apply it to a logits batch,
accept the tokens), and `est. ratio` = (unconstrained ITL + that cost) / unconstrained ITL.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from types import SimpleNamespace
from typing import Any

import torch

from headway.runtime.llm.engine import LLMEngine
from headway.runtime.llm.grammar import Grammar, GrammarMasker, GrammarSpec
from headway.runtime.llm.sequence import SamplingParams

SCHEMA = {"type": "array", "minItems": 50, "items": {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20}, "color": {"enum": ["red", "green", "blue", "yellow"]},
    "price": {"type": "integer", "minimum": 0, "maximum": 1000}, "ripe": {"type": "boolean"}},
    "required": ["name", "color", "price", "ripe"]}}
PROMPTS = ["List fruits with their color, price in cents and ripeness as JSON.",
           "Give me a JSON inventory of a fruit stand.", "Describe some fruits in JSON, one object each.",
           "Produce JSON records for the fruit on sale today.", "Write fruit data as a JSON array.",
           "Return a JSON array of fruits for a grocery app.", "JSON please: fruits, colors, prices.",
           "Make a JSON catalogue of tropical fruit."]


async def _one(engine: LLMEngine, ids: list[int], params: SamplingParams) -> tuple[int, float, list[int]]:
    times: list[float] = []
    tokens: list[int] = []
    async for deltas in engine.generate(ids, params):
        now = time.perf_counter()
        for d in deltas:
            times.extend(now for _ in d.token_ids)
            tokens.extend(d.token_ids)
    n = len(times)
    return n, (times[-1] - times[0]) / (n - 1) if n > 1 else float("nan"), tokens


def grammar_step_cost(grammar: Grammar, outputs: list[list[int]], vocab: int, repeats: int = 3) -> float:
    """Seconds of grammar work per decode step for a batch of ``len(outputs)`` sequences:
    mask (fill + apply) before sampling and accept after, replaying the given outputs."""
    best = float("inf")
    for _ in range(repeats):
        rows = [SimpleNamespace(params=SimpleNamespace(grammar=grammar), output_ids=[], grammar=None) for _ in outputs]
        masker = GrammarMasker()
        logits = torch.zeros(len(rows), vocab)
        steps = min(len(o) for o in outputs)
        started = time.perf_counter()
        for t in range(steps):
            masker.mask(logits, rows)
            for r, out in zip(rows, outputs):
                r.output_ids.append(out[t])
            masker.accept(rows)
        best = min(best, (time.perf_counter() - started) / steps)
    return best


async def _run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from headway.library import resolve

    engine = LLMEngine.launch(resolve(args.model).path, num_threads=args.threads)
    try:
        grammar = await engine.grammars.compile(GrammarSpec.json_schema(SCHEMA))
        tok = engine.tokenizer
        prompts = [tok.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
        base = SamplingParams(temperature=0.7, max_tokens=args.max_tokens, ignore_eos=True, seed=0)
        modes = {"unconstrained": base,
                 "json_schema": SamplingParams(temperature=0.7, max_tokens=args.max_tokens, seed=0, grammar=grammar)}
        rows = []
        for batch in args.batch:
            itl: dict[str, list[float]] = {m: [] for m in modes}
            lengths: dict[str, list[int]] = {m: [] for m in modes}
            outputs: list[list[int]] = []
            await asyncio.gather(*(_one(engine, prompts[i % len(prompts)], base) for i in range(batch)))  # warm-up
            for r in range(args.rounds):
                order = list(modes) if r % 2 == 0 else list(reversed(modes))  # alternate who goes first
                for mode in order:
                    got = await asyncio.gather(*(_one(engine, prompts[i % len(prompts)], modes[mode])
                                                 for i in range(batch)))
                    lengths[mode] += [n for n, _, _ in got]
                    itl[mode] += [x for _, x, _ in got]
                    if mode == "json_schema":
                        outputs = [toks for _, _, toks in got]
            b, g = statistics.median(itl["unconstrained"]), statistics.median(itl["json_schema"])
            cost = grammar_step_cost(grammar, outputs, engine.runner.config.vocab_size)
            rows.append({"batch": batch, "tokens": args.max_tokens,
                         "unconstrained_itl_ms": b * 1e3, "json_schema_itl_ms": g * 1e3, "ratio": g / b,
                         "grammar_ms_per_step": cost * 1e3, "est_ratio": (b + cost) / b,
                         "lengths_equal": set(lengths["unconstrained"]) == set(lengths["json_schema"])})
        return rows
    finally:
        engine.stop()


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=4, help="rounds per mode and batch size (interleaved)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    rows = asyncio.run(_run(args))
    print(f"{'batch':>5} {'tokens':>6} {'unconstrained ITL':>18} {'json_schema ITL':>16} {'ratio':>6} "
          f"{'grammar/step':>13} {'est. ratio':>10}  same lengths")
    for r in rows:
        print(f"{r['batch']:>5} {r['tokens']:>6} {r['unconstrained_itl_ms']:>15.2f} ms {r['json_schema_itl_ms']:>13.2f} ms "
              f"{r['ratio']:>5.3f}x {r['grammar_ms_per_step']:>10.3f} ms {r['est_ratio']:>9.3f}x  {r['lengths_equal']}")
    return rows


if __name__ == "__main__":
    main()
