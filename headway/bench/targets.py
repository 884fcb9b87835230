"""Engine benchmarks that need a purpose-built workload, each with its baseline in the same run.

- `prefix-cache`: TTFT of requests whose ~1,000-token system prompt is already cached (hit)
  against requests with a system prompt never seen before (miss), interleaved, one at a time.
- `prefill-stall`: streams decoding while a long prompt arrives; the ITL of those streams
  while the long prompt is being prefilled, against their ITL outside that window.
- `offload`: TTFT of a long prefix restored from the KV offload tier vs recomputed (headway/bench/offload.py).
- `roofline`: the engine's steady-state decode throughput at a batch size, in process, as a
  fraction of the machine's measured matmul FLOP/s at the engine's own GEMM shapes.

It also runs the router, fleet and weight-fetch benchmarks (`router`, `router-tokenize`,
`router-trace`, `cold-start`, `burst-deploy`, `weights`): argparse programs in headway/bench/,
each also `python -m headway.bench.<module>`.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import httpx
import typer
from rich.console import Console

from headway.bench.report import machine_info, percentile
from headway.bench.text import TextGenerator

app = typer.Typer(help="Purpose-built benchmarks: engine (prefix cache, prefill stall, roofline), router, fleet, "
                       "weight fetch.",
                  no_args_is_help=True)
console = Console()


def _tokenizer(path: Path | None) -> Any:
    if path is None:
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


async def _stream(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """One streamed completion: arrival times of its content chunks."""
    t0 = time.perf_counter()
    times: list[float] = []
    async with client.stream("POST", url, json={**body, "stream": True}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            choices = chunk.get("choices") or []
            if choices and (choices[0].get("text") or (choices[0].get("delta") or {}).get("content")):
                times.append(time.perf_counter())
    return {"start": t0, "times": times, "ttft": times[0] - t0 if times else None}


def _write(report: dict[str, Any], path: Path | None) -> None:
    report["machine"] = machine_info()
    if path is not None:
        path.write_text(json.dumps(report, indent=2))
        console.print(f"wrote {path}")


@app.command("prefix-cache")
def prefix_cache(
    base_url: Annotated[str, typer.Option(help="OpenAI-compatible server")] = "http://127.0.0.1:8000",
    model: Annotated[str, typer.Option(help="model name")] = "smollm2-135m-instruct",
    system_tokens: Annotated[int, typer.Option(help="shared system prompt length")] = 1000,
    pairs: Annotated[int, typer.Option(help="hit/miss pairs measured")] = 10,
    tokenizer: Annotated[Optional[Path], typer.Option(help="tokenizer.json for exact lengths")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    json_path: Annotated[Optional[Path], typer.Option("--json")] = None,
) -> None:
    """TTFT with the system prompt cached (hit) vs never seen (miss), interleaved."""
    gen = TextGenerator(_tokenizer(tokenizer))
    rng = random.Random(seed)
    shared = gen.text(system_tokens, rng)
    url = base_url.rstrip("/") + "/v1/chat/completions"

    def body(system: str) -> dict[str, Any]:
        return {"model": model, "max_tokens": 1, "temperature": 0, "messages": [
            {"role": "system", "content": system}, {"role": "user", "content": gen.text(12, rng)}]}

    async def run() -> dict[str, list[float]]:
        out: dict[str, list[float]] = {"hit": [], "miss": []}
        async with httpx.AsyncClient(timeout=300) as client:
            await _stream(client, url, body(shared))  # put the shared prefix in the cache
            for _ in range(pairs):
                miss = await _stream(client, url, body(gen.text(system_tokens, rng)))
                hit = await _stream(client, url, body(shared))
                out["miss"].append(miss["ttft"])
                out["hit"].append(hit["ttft"])
        return out

    ttft = asyncio.run(run())
    p50 = {k: percentile(v, 50) for k, v in ttft.items()}
    ratio = p50["miss"] / p50["hit"]
    console.print(f"TTFT p50  miss {p50['miss'] * 1000:.1f} ms   hit {p50['hit'] * 1000:.1f} ms   "
                  f"miss/hit = {ratio:.2f}x  ({pairs} pairs, {system_tokens}-token system prompt)")
    _write({"benchmark": "prefix-cache", "system_tokens": system_tokens, "pairs": pairs,
            "ttft_s": ttft, "p50_s": p50, "miss_over_hit": ratio}, json_path)


@app.command("prefill-stall")
def prefill_stall(
    base_url: Annotated[str, typer.Option(help="OpenAI-compatible server")] = "http://127.0.0.1:8000",
    model: Annotated[str, typer.Option(help="model name")] = "smollm2-135m-instruct",
    streams: Annotated[int, typer.Option(help="streams decoding while the long prompt arrives")] = 8,
    long_tokens: Annotated[int, typer.Option(help="length of the long prompt")] = 2000,
    output_tokens: Annotated[int, typer.Option(help="output length of each stream")] = 160,
    tokenizer: Annotated[Optional[Path], typer.Option(help="tokenizer.json for exact lengths")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    json_path: Annotated[Optional[Path], typer.Option("--json")] = None,
) -> None:
    """ITL of running streams while a long prompt is prefilled, against their ITL otherwise."""
    gen = TextGenerator(_tokenizer(tokenizer))
    rng = random.Random(seed)
    url = base_url.rstrip("/") + "/v1/completions"

    async def run() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=streams + 4)) as client:
            bodies = [{"model": model, "prompt": gen.text(64, rng), "max_tokens": output_tokens, "temperature": 0,
                       "ignore_eos": True} for _ in range(streams)]
            tasks = [asyncio.create_task(_stream(client, url, b)) for b in bodies]
            await asyncio.sleep(0)
            # let every stream reach steady decoding before the long prompt arrives
            deadline = time.perf_counter() + 120
            while time.perf_counter() < deadline:
                await asyncio.sleep(0.5)
                state = (await client.get(base_url.rstrip("/") + "/headway/state")).json()
                if state.get("queued", 0) == 0 and state.get("in_flight", 0) >= streams:
                    break
            await asyncio.sleep(1.0)
            long = await _stream(client, url, {"model": model, "prompt": gen.text(long_tokens, rng),
                                               "max_tokens": 1, "temperature": 0})
            return list(await asyncio.gather(*tasks)), long

    results, long = asyncio.run(run())
    window = (long["start"], long["times"][0] if long["times"] else long["start"])
    inside: list[float] = []
    outside: list[float] = []
    for r in results:
        for a, b in zip(r["times"], r["times"][1:]):
            (inside if a < window[1] and b > window[0] else outside).append(b - a)
    stats = {name: {"p50_ms": percentile(v, 50) * 1000, "p99_ms": percentile(v, 99) * 1000, "n": len(v)}
             for name, v in (("during_prefill", inside), ("outside", outside), ("all", inside + outside))}
    p99_over_p50 = stats["all"]["p99_ms"] / stats["all"]["p50_ms"]
    console.print(f"long prompt: {long_tokens} tokens, TTFT {long['ttft']:.2f} s; {streams} streams")
    for name, s in stats.items():
        console.print(f"  ITL {name:15s} p50 {s['p50_ms']:7.1f} ms  p99 {s['p99_ms']:7.1f} ms  (n={s['n']})")
    console.print(f"  p99/p50 of all stream ITLs = {p99_over_p50:.2f}")
    _write({"benchmark": "prefill-stall", "streams": streams, "long_tokens": long_tokens,
            "long_ttft_s": long["ttft"], "itl": stats, "p99_over_p50": p99_over_p50}, json_path)


def engine_decode_roofline(model_dir: Path, *, batch: int, context: int, steps: int, dtype: str,
                           device: str | None = None) -> dict[str, float]:
    """The engine's steady-state decode (in process: schedule, forward, sample, update) for
    `batch` random prompts of `context` tokens, placed on the device's measured matmul roofline."""
    import torch

    from headway.bench.roofline import DecoderShape, decode_roofline_report
    from headway.runtime.llm.engine import LLMEngine
    from headway.runtime.llm.sequence import SamplingParams

    engine = LLMEngine(model_dir, dtype=dtype, device=device, max_running=batch, max_num_batched_tokens=max(512, batch))
    rng = random.Random(0)
    for i in range(batch):
        prompt = [rng.randrange(100, engine.tokenizer.vocab_size - 1) for _ in range(context)]
        engine.scheduler.add(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True))
    while any(s.in_prefill for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine._step()  # prefill everything (not timed)
    engine._step()
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine._step()
    sync()
    tok_s = batch * steps / (time.perf_counter() - t0)
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return decode_roofline_report(DecoderShape.from_hf_config(cfg), batch, tok_s, context=context + steps // 2,
                                  device=engine.device, dtype=getattr(torch, dtype))


@app.command("roofline")
def roofline(
    model_dir: Annotated[Path, typer.Option(help="converted model directory (headway library pull)")],
    batch: Annotated[int, typer.Option(help="sequences decoding at once")] = 32,
    context: Annotated[int, typer.Option(help="prompt tokens per sequence")] = 250,
    steps: Annotated[int, typer.Option(help="decode steps timed")] = 64,
    dtype: Annotated[str, typer.Option()] = "float32",
    json_path: Annotated[Optional[Path], typer.Option("--json")] = None,
) -> None:
    """Steady-state decode tokens/s of the engine vs the matmul roofline at its GEMM shapes."""
    report = engine_decode_roofline(model_dir, batch=batch, context=context, steps=steps, dtype=dtype)
    tok_s = report["decode_tokens_per_s"]
    console.print(f"decode: {tok_s:.0f} tokens/s at batch {batch} ({batch / tok_s * 1000:.1f} ms/step)")
    console.print(json.dumps(report, indent=2, default=str))
    _write({"benchmark": "roofline", **report}, json_path)


@app.command("burst")
def burst(
    model_dir: Annotated[Path, typer.Option(help="converted model directory (headway library pull)")],
    requests: Annotated[int, typer.Option(help="requests arriving together")] = 32,
    prompt_tokens: Annotated[int, typer.Option(help="prompt tokens per request")] = 250,
    output_tokens: Annotated[int, typer.Option(help="output tokens per request")] = 128,
    dtype: Annotated[str, typer.Option()] = "auto",
    json_path: Annotated[Optional[Path], typer.Option("--json")] = None,
) -> None:
    """A burst of simultaneous requests, in process: steps and seconds until every prompt is
    prefilled, and until all are done, under the engine's prefill policy (priority while at
    least a quarter as many wait as decode) against the earlier rule (only while as many wait)."""
    from headway.runtime.llm.engine import LLMEngine
    from headway.runtime.llm.sequence import SamplingParams

    out: dict[str, Any] = {"benchmark": "burst", "requests": requests, "prompt_tokens": prompt_tokens,
                           "output_tokens": output_tokens}
    for name, fraction in (("headway", 0.25), ("as-many-waiting", 1.0)):
        engine = LLMEngine(model_dir, dtype=dtype, max_running=requests)
        engine.chunker.burst_fraction = fraction
        rng = random.Random(0)
        vocab = engine.tokenizer.vocab_size

        # add() is called only within this iteration, so it reads this iteration's engine, rng and vocab
        def add(tag: str, n: int, length: int, max_tokens: int) -> None:
            for i in range(n):
                engine.scheduler.add(f"{tag}{i}", [rng.randrange(100, vocab - 1) for _ in range(length)],  # noqa: B023
                                     SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))

        add("warm", 2, 16, 8)  # a served engine has seen decode steps: its chunker has a cost model
        while engine.scheduler.has_work():
            engine._step()
        add("r", requests, prompt_tokens, output_tokens)
        t0, steps = time.perf_counter(), 0
        while any(s.in_prefill for s in engine.scheduler.running) or engine.scheduler.waiting:
            engine._step()
            steps += 1
        prefill_s = time.perf_counter() - t0
        while engine.scheduler.has_work():
            engine._step()
        out[name] = {"prefill_steps": steps, "prefill_s": prefill_s, "total_s": time.perf_counter() - t0}
        console.print(f"{name:<16} all prompts prefilled after {steps} steps, {prefill_s:.2f} s; "
                      f"all {requests} done after {out[name]['total_s']:.2f} s")
    out["total_speedup"] = out["as-many-waiting"]["total_s"] / out["headway"]["total_s"]
    out["prefill_speedup"] = out["as-many-waiting"]["prefill_s"] / out["headway"]["prefill_s"]
    console.print(f"headway vs as-many-waiting: prefill {out['prefill_speedup']:.2f}x faster, "
                  f"whole burst {out['total_speedup']:.2f}x faster")
    _write(out, json_path)


from headway.bench.offload import offload as _offload  # noqa: E402  (its own module: two engines in process)

app.command("offload")(_offload)


# Fleet, router and weight-fetch benchmarks: argparse programs of their own (also run as
# `python -m headway.bench.<module>`); these commands pass their arguments through unchanged.
_PROGRAMS = {
    "router": ("headway.bench.router", "Latency the router adds and requests/s through it, direct vs routed."),
    "router-tokenize": ("headway.bench.router_tokenize",
                        "The router's per-request cost of exact prefix routing: whole vs segment-cached."),
    "router-trace": ("headway.bench.router_trace",
                     "Routing policies side by side on a multi-turn chat trace over real LLM replicas."),
    "cold-start": ("headway.bench.cold_start", "From zero replicas to the first token, with and without a standby."),
    "burst-deploy": ("headway.bench.burst_deploy", "A burst against a deployment at its minimum: autoscaled vs pinned."),
    "weights": ("headway.bench.weights", "Parallel byte ranges vs one stream from a bandwidth-limited store."),
}


def _program(module: str) -> Callable[[typer.Context], None]:
    def run(ctx: typer.Context) -> None:
        import importlib

        code = importlib.import_module(module).main(ctx.args)
        if code:
            raise typer.Exit(code)

    return run


for _name, (_module, _help) in _PROGRAMS.items():
    app.command(_name, help=f"{_help} (`headway bench-target {_name} --help` for the options)",
                context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                  "help_option_names": []})(_program(_module))


# The engine before and after a change (a git ref against this tree), in one run.
from headway.bench.ab import main as _engine_ab_serving  # noqa: E402
from headway.bench.engine_ab import main as _engine_ab_in_process  # noqa: E402

app.command("engine-ab", help="Throughput, prefix-cache TTFT and chunked-prefill ITL of --before REF and this "
            "tree, their servers alternating.")(_engine_ab_serving)
app.command("engine-ab-in-process", help="Prefill and a 32-request burst in the engine alone, --before REF "
            "and this tree alternating in fresh processes.")(_engine_ab_in_process)
