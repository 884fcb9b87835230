"""Engine before/after: the same three serving benchmarks against two versions of the code, in one run.

A change to the engine must not move its throughput, prefix-cache TTFT or chunked-prefill ITL.
This checks that the way the figures in docs/benchmarks.md were taken, but side by side: it puts
the ``--before`` git ref in a temporary worktree, then for each round serves the model from the
*before* tree and from this tree in turn (same venv, same port, same machine, alternating so
drift in the machine's speed hits both), and runs the same load generator (this tree's) against
each:

- throughput: ``headway bench``, 32 concurrent chat completions, ~250-token prompts, 128 tokens out;
- prefix cache: ``headway bench-target prefix-cache`` (TTFT miss vs hit, ~1,000-token system prompt);
- chunked prefill: ``headway bench-target prefill-stall`` (ITL of 8 streams while a 2,000-token prompt
  is prefilled).

It prints each figure for both versions with the after/before ratio, and writes the raw reports.

    python -m headway.bench.ab --before aacb240 --rounds 2 --json ab.json
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any, Optional

import httpx
import typer
from rich.console import Console
from rich.table import Table

from headway.bench.servers import wait_ready

console = Console()
ROOT = Path(__file__).resolve().parents[2]
MODEL = "smollm2-135m-instruct"


def _serve(tree: Path, port: int, dtype: str | None, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-m", "headway", "serve", MODEL, "--port", str(port), "--log-level", "warning"]
    if dtype:
        cmd += ["--dtype", dtype]
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    wait_ready(f"http://127.0.0.1:{port}/health/ready", proc, 300, why=lambda: f"see {log}")
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _run(args: list[str], out: Path) -> dict[str, Any]:
    """One benchmark command of this tree's CLI, its JSON report read back."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "headway", *args, "--json", str(out)], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL, timeout=1200)
    return json.loads(out.read_text())


def _figures(url: str, tok: Path, work: Path, tag: str) -> dict[str, float]:
    tp = _run(["bench", "--base-url", url, "--model", MODEL, "--api", "chat", "--workload", "fixed",
               "--num-requests", "32", "--concurrency", "32", "--prompt-tokens", "250", "--output-tokens", "128",
               "--ignore-eos", "--tokenizer", str(tok), "--target-name", tag], work / f"{tag}-tp.json")
    pc = _run(["bench-target", "prefix-cache", "--base-url", url, "--model", MODEL, "--system-tokens", "1000",
               "--pairs", "10", "--tokenizer", str(tok)], work / f"{tag}-pc.json")
    ps = _run(["bench-target", "prefill-stall", "--base-url", url, "--model", MODEL, "--streams", "8",
               "--long-tokens", "2000", "--output-tokens", "160", "--tokenizer", str(tok)], work / f"{tag}-ps.json")
    t = tp["targets"][0]
    if t["errors"]:
        raise RuntimeError(f"{tag}: {t['errors']} of {t['requests']} throughput requests failed: {t['error_messages']}")
    return {
        "throughput_tok_s": float(t["output_token_throughput"]),
        "ttft_hit_ms": pc["p50_s"]["hit"] * 1000, "ttft_miss_ms": pc["p50_s"]["miss"] * 1000,
        "miss_over_hit": pc["miss_over_hit"],
        "itl_p50_ms": ps["itl"]["all"]["p50_ms"], "itl_p99_ms": ps["itl"]["all"]["p99_ms"],
        "itl_p99_over_p50": ps["p99_over_p50"],
    }


def main(
    before: Annotated[str, typer.Option(help="git ref of the code before the change")],
    rounds: Annotated[int, typer.Option(help="alternating rounds (before, after) per figure")] = 2,
    port: Annotated[int, typer.Option()] = 8299,
    dtype: Annotated[Optional[str], typer.Option(help="--dtype for both servers (default: auto)")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json")] = None,
) -> None:
    """Serve the model from --before and from this tree in turn; the same benchmarks on each."""
    from headway.bench.report import machine_info
    from headway.library import resolve

    model_dir = resolve(MODEL).path
    tok = model_dir / "tokenizer.json"
    work = Path(tempfile.mkdtemp(prefix="headway-ab-"))
    old = work / "before"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(old), before], cwd=ROOT, check=True)
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    dtypes: dict[str, str] = {}
    try:
        for r in range(rounds):
            for tag, tree in (("before", old), ("after", ROOT)):
                console.print(f"round {r + 1}/{rounds}: {tag} ({tree})")
                proc = _serve(tree, port, dtype, work / f"{tag}-{r}.log")
                try:
                    state = httpx.get(f"http://127.0.0.1:{port}/headway/state", timeout=10).json()
                    figs = _figures(f"http://127.0.0.1:{port}", tok, work, f"{tag}{r}")
                    runs[tag].append(figs)
                    dtypes[tag] = str(state.get("dtype") or state.get("engine", {}).get("dtype", "?"))
                finally:
                    _stop(proc)
                console.print(f"  {json.dumps(runs[tag][-1])}")
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, check=False)
    table = Table(title=f"engine before ({before}) and after (this tree), median of {rounds} rounds; "
                        f"dtype {dtypes}, {os.cpu_count()} CPUs")
    for col in ("figure", "before", "after", "after / before"):
        table.add_column(col)
    summary: dict[str, dict[str, float]] = {}
    for key in runs["after"][0]:
        b = statistics.median(x[key] for x in runs["before"])
        a = statistics.median(x[key] for x in runs["after"])
        summary[key] = {"before": b, "after": a, "ratio": a / b}
        table.add_row(key, f"{b:.2f}", f"{a:.2f}", f"{a / b:.3f}")
    console.print(table)
    report = {"benchmark": "engine-ab", "before": before, "rounds": runs, "summary": summary, "dtype": dtypes,
              "machine": machine_info()}
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2))
        console.print(f"wrote {json_path}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    typer.run(main)
