"""Fit the simulator's service-time model from the real engine, in process.

    python -m headway.sim.fit [--model smollm2-135m-instruct] [--batches 1,4,8,16,32] [--json out.json]

Runs `LLMEngine` steps directly (no server, no HTTP): for each batch size, that many
requests are prefilled (not timed) and then `--steps` decode steps are timed (their median);
ITL(batch) = a + b * batch is fitted by least squares. Prefill is timed alone on one prompt
per length (`--prompts`, the least of three), and prefill_s(p) = c + p / rate fitted the same
way. Prints the fitted
`ServiceModel` (paste it into `headway/sim/service.py` as DEFAULT) and the measurements.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from headway.sim.service import ServiceModel


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through the points."""
    if len(xs) != len(ys) or len(set(xs)) < 2:
        raise ValueError(f"need at least two distinct x values to fit a line, got {list(xs)}")
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def fit(decode: dict[int, float], prefill: dict[int, float], source: str) -> ServiceModel:
    """A model from measured step seconds per batch size and prefill seconds per prompt length."""
    a, b = linear_fit(list(decode), list(decode.values()))
    c, per_token = linear_fit(list(prefill), list(prefill.values()))
    if c < 0:  # prefill grows a little faster than linearly (attention): a line through 0 instead
        c, per_token = 0.0, sum(x * y for x, y in prefill.items()) / sum(x * x for x in prefill)
    return ServiceModel(max(a, 1e-4), max(b, 0.0), c, 1.0 / max(per_token, 1e-6), source)


def measure(model_dir: Path, batches: Sequence[int], prompts: Sequence[int], *, context: int = 128,
            steps: int = 16, repeats: int = 3, dtype: str = "bfloat16",
            threads: int | None = None) -> tuple[dict[int, float], dict[int, float]]:
    """Median seconds per decode step at each batch size, and the least seconds of `repeats`
    to prefill each prompt length alone."""
    from headway.runtime.llm.engine import LLMEngine
    from headway.runtime.llm.sequence import SamplingParams

    top = max(batches)
    engine = LLMEngine(model_dir, dtype=dtype, max_running=top, max_num_batched_tokens=max(2048, max(prompts)),
                       enable_prefix_caching=False, num_threads=threads)
    rng = random.Random(0)
    vocab = engine.tokenizer.vocab_size - 1

    def add(name: str, length: int, max_tokens: int) -> None:
        prompt = [rng.randrange(100, vocab) for _ in range(length)]
        engine.scheduler.add(name, prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))

    def drain() -> None:
        while engine.scheduler.running or engine.scheduler.waiting:
            engine._step()

    add("warm", 64, 8)
    drain()
    prefill: dict[int, float] = {}
    for length in prompts:  # one prompt alone: its prefill is the first step(s) until its first token
        runs = []
        for k in range(repeats):
            add(f"p{length}-{k}", length, 1)
            t0 = time.perf_counter()
            drain()
            runs.append(time.perf_counter() - t0)
        prefill[length] = min(runs)  # the least disturbed of the repeats (the machine may be shared)
    decode: dict[int, float] = {}
    for batch in batches:
        for i in range(batch):
            add(f"b{batch}-{i}", context, steps + 4)
        while any(s.in_prefill for s in engine.scheduler.running) or engine.scheduler.waiting:
            engine._step()  # prefill (not timed)
        engine._step()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            engine._step()
            times.append(time.perf_counter() - t0)
        decode[batch] = statistics.median(times)
        drain()
    engine.stop()
    return decode, prefill


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m headway.sim.fit", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a model library name")
    ap.add_argument("--batches", default="1,4,8,16,32", help="decode batch sizes, comma-separated")
    ap.add_argument("--prompts", default="128,512,1024", help="prompt lengths timed for prefill, comma-separated")
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed per batch size")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: the engine's); 1 holds up better on a machine others load")
    ap.add_argument("--json", type=Path, default=None, help="also write the fit and measurements here")
    a = ap.parse_args(argv)
    from headway.library import resolve

    batches = [int(x) for x in a.batches.split(",")]
    prompts = [int(x) for x in a.prompts.split(",")]
    if min(batches) < 1 or min(prompts) < 1 or a.steps < 1:
        raise SystemExit("--batches, --prompts and --steps must be positive integers")
    t0 = time.perf_counter()
    decode, prefill = measure(resolve(a.model).path, batches, prompts, steps=a.steps, dtype=a.dtype, threads=a.threads)
    model = fit(decode, prefill, f"{a.model} {a.dtype}, fitted by headway.sim.fit")
    for batch, s in decode.items():
        print(f"decode batch {batch:3d}: {s * 1e3:7.1f} ms/step  (fit {model.itl(batch) * 1e3:7.1f})")
    for length, s in prefill.items():
        print(f"prefill {length:5d} tokens: {s * 1e3:7.1f} ms  (fit {model.prefill_s(length) * 1e3:7.1f})")
    print(f"fitted in {time.perf_counter() - t0:.1f} s: {model!r}")
    if a.json:
        out = {"model": model.__dict__, "decode_step_s": decode, "prefill_s": prefill}
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
