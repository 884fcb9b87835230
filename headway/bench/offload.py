"""`python -m headway.bench.offload` (also `headway bench-target offload`): TTFT of a long prefix
restored from the KV offload tier against recomputing it, side by side in one run.

Two engines of the same model in one process, the same small main KV pool, one with the host
tier (``kv_offload_tokens``) and one without. Each round, on each engine in turn (interleaved, so
both see the same machine load):

1. a fresh prompt of ``evict_tokens`` arrives and evicts the long prefix from the main pool (on
   the tier engine the prefix moves to host memory);
2. measured: the long prefix + a new short question -- on the tier engine the prefix is
   restored from host memory, on the other it is recomputed ("restored" vs "recomputed");
3. measured for reference: the prefix + another question again, now a main-pool hit ("hit").

TTFT is in process: from handing the request to the scheduler to its first sampled token,
stepping the engine loop (no HTTP). Greedy, one output token. Reports p50 per kind and the
ratio recomputed / restored (the target: >= 3x).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from headway.bench.report import machine_info, percentile
from headway.bench.text import TextGenerator

console = Console()


def _ttft(engine: Any, rid: str, prompt: list[int]) -> float:
    from headway.runtime.llm.sequence import SamplingParams

    t0 = time.perf_counter()
    seq = engine.scheduler.add(rid, prompt, SamplingParams(temperature=0, max_tokens=1))
    first = None
    for _ in range(100_000):
        if not engine.scheduler.has_work():
            break
        engine._step()
        if first is None and seq.output_ids:
            first = time.perf_counter() - t0
    assert first is not None, f"{rid}: no token"
    return first


def measure(model_dir: Path, *, prefix_tokens: int, evict_tokens: int, kv_cache_tokens: int, offload_tokens: int,
            rounds: int, dtype: str, seed: int = 0) -> dict[str, Any]:
    from headway.runtime.llm.engine import LLMEngine

    if prefix_tokens + evict_tokens <= kv_cache_tokens:
        raise ValueError(f"prefix ({prefix_tokens}) + evicting prompt ({evict_tokens}) must exceed the main pool "
                         f"({kv_cache_tokens} tokens), or nothing is evicted")
    engines = {name: LLMEngine(model_dir, dtype=dtype, kv_cache_tokens=kv_cache_tokens, kv_offload_tokens=tier)
               for name, tier in (("tier", offload_tokens), ("no-tier", 0))}
    tok = engines["tier"].tokenizer
    rng = random.Random(seed)
    gen = TextGenerator(tok.tokenizer)
    prefix = tok.encode(gen.text(prefix_tokens, rng))
    question = lambda: tok.encode(gen.text(16, rng), add_special_tokens=False)  # noqa: E731
    out: dict[str, list[float]] = {"restored": [], "recomputed": [], "hit_tier": [], "hit_no_tier": []}
    for name, e in engines.items():  # the prefix once into each (not timed)
        _ttft(e, f"{name}-warm", prefix + question())
    for r in range(rounds):
        evictor, q1, q2 = tok.encode(gen.text(evict_tokens, rng)), question(), question()
        for name, e in (engines.items() if r % 2 == 0 else reversed(engines.items())):
            _ttft(e, f"evict-{r}", evictor)
            assert e.kv.peek(None, prefix) < len(prefix), "the prefix was not evicted"
            restored_before = e.kv.offload.restored_tokens if e.kv.offload else 0
            t = _ttft(e, f"again-{r}", prefix + q1)
            if e.kv.offload is not None:
                assert e.kv.offload.restored_tokens - restored_before >= len(prefix) - 1, e.kv.offload.stats()
            out["restored" if name == "tier" else "recomputed"].append(t)
            out["hit_tier" if name == "tier" else "hit_no_tier"].append(_ttft(e, f"hit-{r}", prefix + q2))
    p50 = {k: percentile(v, 50) for k, v in out.items()}
    tier = engines["tier"].kv.offload
    assert tier is not None, "the 'tier' engine was built with a host tier"
    stats = tier.stats()
    return {"benchmark": "offload", "prefix_tokens": len(prefix), "evict_tokens": evict_tokens,
            "kv_cache_tokens": kv_cache_tokens, "kv_offload_tokens": offload_tokens, "rounds": rounds,
            "dtype": str(engines["tier"].dtype).removeprefix("torch."), "device": str(engines["tier"].device),
            "ttft_s": out, "p50_s": p50, "recomputed_over_restored": p50["recomputed"] / p50["restored"],
            "restored_over_hit": p50["restored"] / p50["hit_tier"], "tier": stats, "machine": machine_info()}


def offload(
    model: Annotated[str, typer.Option(help="model-library name or model directory")] = "smollm2-135m-instruct",
    prefix_tokens: Annotated[int, typer.Option(help="long shared prefix")] = 1500,
    evict_tokens: Annotated[int, typer.Option(help="the prompt that evicts it each round")] = 700,
    kv_cache_tokens: Annotated[int, typer.Option(help="main KV pool, tokens")] = 2048,
    kv_offload_tokens: Annotated[int, typer.Option(help="host tier, tokens")] = 16384,
    rounds: Annotated[int, typer.Option(help="measured rounds (each: restored vs recomputed, and hits)")] = 5,
    dtype: Annotated[str, typer.Option()] = "float32",
    json_path: Annotated[Optional[Path], typer.Option("--json")] = None,
) -> None:
    """TTFT of a long prefix restored from the host tier vs recomputed (tier off), same run."""
    import json

    from headway.tokenization import model_dir

    report = measure(model_dir(model, Path.cwd()), prefix_tokens=prefix_tokens, evict_tokens=evict_tokens,
                     kv_cache_tokens=kv_cache_tokens, offload_tokens=kv_offload_tokens, rounds=rounds, dtype=dtype)
    p = report["p50_s"]
    console.print(f"{report['prefix_tokens']}-token prefix evicted from a {kv_cache_tokens}-token pool, "
                  f"{rounds} rounds, {report['dtype']} on {report['device']}")
    for k in ("recomputed", "restored", "hit_tier", "hit_no_tier"):
        console.print(f"  TTFT p50 {k:<12} {p[k] * 1000:9.1f} ms   all: "
                      + ", ".join(f"{x * 1000:.0f}" for x in report["ttft_s"][k]))
    console.print(f"  recomputed / restored = {report['recomputed_over_restored']:.2f}x   "
                  f"restored / main-pool hit = {report['restored_over_hit']:.2f}x")
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2))
        console.print(f"wrote {json_path}")


if __name__ == "__main__":
    typer.run(offload)
