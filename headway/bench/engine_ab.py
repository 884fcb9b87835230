"""The engine in process, before and after a change: prefill and a 32-request burst, no HTTP.

``bench/ab.py`` compares two versions through their servers; this compares the engines alone
(no server, no load generator on the same cores), which separates a change in the engine from
noise in the serving path. For each round it runs, in a fresh process per version (alternating):
a 1,000-token prefill (median of 6 distinct prompts, 1 output token) and a burst of 32 random
250-token prompts x 128 output tokens (EOS ignored), and prints both versions with the ratio.

    python -m headway.bench.engine_ab --before aacb240 --rounds 3
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

console = Console()
ROOT = Path(__file__).resolve().parents[2]


def measure(dtype: str) -> dict[str, float]:
    """One process's figures (run in the tree under test: ``python -m headway.bench.engine_ab --child``)."""
    import random

    from headway.library import resolve
    from headway.runtime.llm.engine import LLMEngine
    from headway.runtime.llm.sequence import SamplingParams

    engine = LLMEngine.launch(resolve("smollm2-135m-instruct").path, dtype=dtype)
    rng = random.Random(0)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(1000, 40000) for _ in range(n)]

    async def one(ids: list[int], n: int) -> None:
        async for _ in engine.generate(ids, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)):
            pass

    async def run() -> dict[str, float]:
        await one(prompt(50), 4)  # warm-up
        times = []
        for _ in range(6):
            ids = prompt(1000)
            t = time.perf_counter()
            await one(ids, 1)
            times.append(time.perf_counter() - t)
        prompts = [prompt(250) for _ in range(32)]
        t = time.perf_counter()
        await asyncio.gather(*(one(p, 128) for p in prompts))
        return {"prefill_1000_ms": statistics.median(times) * 1000,
                "burst_tok_s": 32 * 128 / (time.perf_counter() - t)}

    try:
        return asyncio.run(run())
    finally:
        engine.stop()


def main(
    before: Annotated[str, typer.Option(help="git ref of the code before the change")] = "",
    rounds: Annotated[int, typer.Option(help="alternating rounds, a fresh process per version each")] = 3,
    dtype: Annotated[str, typer.Option()] = "float32",
    child: Annotated[bool, typer.Option(hidden=True)] = False,
) -> None:
    """Run the engine of --before and of this tree in turn, in fresh processes; compare."""
    if child:
        print(json.dumps(measure(dtype)))
        return
    if not before:
        raise typer.BadParameter("--before REF is required (e.g. --before HEAD~1)")
    work = Path(tempfile.mkdtemp(prefix="headway-engine-ab-"))
    old = work / "before"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(old), before], cwd=ROOT, check=True)
    # the child code is this file's measure(), run against each tree's engine
    script = work / "child.py"
    script.write_text(Path(__file__).read_text())
    runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    try:
        for r in range(rounds):
            for tag, tree in (("before", old), ("after", ROOT)):
                env = {**os.environ, "PYTHONPATH": str(tree)}
                out = subprocess.run([sys.executable, str(script), "--child", "--dtype", dtype], cwd=tree, env=env,
                                     check=True, capture_output=True, text=True, timeout=900)
                runs[tag].append(json.loads(out.stdout.strip().splitlines()[-1]))
                console.print(f"round {r + 1}/{rounds} {tag}: {runs[tag][-1]}")
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, check=False)
    table = Table(title=f"engine in process: {before} vs this tree, median of {rounds} ({dtype}, {os.cpu_count()} CPUs)")
    for col in ("figure", "before", "after", "after / before"):
        table.add_column(col)
    for key in runs["after"][0]:
        b = statistics.median(x[key] for x in runs["before"])
        a = statistics.median(x[key] for x in runs["after"])
        table.add_row(key, f"{b:.1f}", f"{a:.1f}", f"{a / b:.3f}")
    console.print(table)


if __name__ == "__main__":
    typer.run(main)
