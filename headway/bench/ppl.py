"""`headway eval ppl`: what a quantization costs, measured against the unquantized model.

For one model, the same dtype and device, with and without quantization, in one run:
perplexity on a fixed text (shipped with Headway, or `--text`), prefill throughput over that
text, the time of a batch-32 decode step, and the memory of the decoder's linear weights.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Model quality and cost evaluations.", no_args_is_help=True)
console = Console()
EVAL_TEXT = Path(__file__).with_name("data") / "eval.txt"


def perplexity(runner: Any, ids: list[int], chunk: int = 256) -> float:
    """exp(mean negative log-likelihood of each token given the ones before it), prefilled in chunks."""
    import torch

    from headway.runtime.llm.batch import ForwardBatch

    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, chunk):
        piece = ids[start : start + chunk]
        logits = runner.forward(ForwardBatch.build([piece], [list(range(start + len(piece)))], all_logits=True))
        targets = ids[start + 1 : start + len(piece) + 1]
        logp = torch.log_softmax(logits[: len(targets)].float(), dim=-1)
        nll -= float(logp[torch.arange(len(targets)), torch.tensor(targets)].sum())
        count += len(targets)
    return math.exp(nll / count)


def decode_step_s(runner: Any, context: int, batch: int = 32, steps: int = 12) -> float:
    """Median time of a decode step: `batch` sequences sharing a `context`-token prefix."""
    from headway.runtime.llm.batch import ForwardBatch

    base = runner.num_slots - batch
    fb = ForwardBatch.build([[7]] * batch, [list(range(context - 1)) + [base + i] for i in range(batch)])
    runner.forward(fb)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        runner.forward(fb)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def linear_bytes(runner: Any) -> int:
    total = 0
    for layer in runner.model.layers:
        total += layer.qkv.nbytes + layer.o.nbytes + layer.mlp.gate_up.nbytes + layer.mlp.down.nbytes
    return total


def evaluate(model_dir: Path, quantization: str, *, dtype: str, text: str, max_tokens: int,
             device: str | None = None) -> dict[str, Any]:
    from headway.runtime.llm.device import default_device
    from headway.runtime.llm.runner import ModelRunner
    from headway.tokenization import ModelTokenizer

    ids = ModelTokenizer(model_dir).encode(text)[:max_tokens]
    if len(ids) < 16:
        raise ValueError(f"the evaluation text is {len(ids)} tokens; at least 16 are needed")
    out: dict[str, Any] = {"tokens": len(ids), "dtype": dtype}
    for name in ("none", quantization):
        runner = ModelRunner(model_dir, dtype=dtype, device=device or default_device(), num_slots=len(ids) + 64,
                             quantization=name)
        t0 = time.perf_counter()
        ppl = perplexity(runner, ids)
        elapsed = time.perf_counter() - t0
        out[name] = {"perplexity": ppl, "prefill_tokens_per_s": len(ids) / elapsed,
                     "decode_step_ms": decode_step_s(runner, min(len(ids), 256)) * 1000,
                     "linear_weight_mb": linear_bytes(runner) / 2**20}
        del runner
    base, q = out["none"], out[quantization]
    out["perplexity_change"] = q["perplexity"] / base["perplexity"] - 1
    out["prefill_speedup"] = q["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]
    out["decode_speedup"] = base["decode_step_ms"] / q["decode_step_ms"]
    out["memory_ratio"] = q["linear_weight_mb"] / base["linear_weight_mb"]
    return out


@app.command("ppl")
def ppl(
    model: Annotated[str, typer.Argument(help="A model-library name or a Hugging Face model directory.")],
    quantization: Annotated[str, typer.Option(help="The quantization to evaluate: int8 or fp8.")] = "int8",
    dtype: Annotated[str, typer.Option(help="Activation dtype of both runs: float32 or bfloat16.")] = "float32",
    text: Annotated[Optional[Path], typer.Option(help="Text file to score (default: Headway's fixed text).")] = None,
    max_tokens: Annotated[int, typer.Option(help="Score at most this many tokens of the text.")] = 1024,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the report here.")] = None,
) -> None:
    """Perplexity, speed and memory of a quantized model against the unquantized one, in one run."""
    if quantization not in ("int8", "fp8"):
        console.print(f"[red]error:[/red] quantization {quantization!r} is not supported; allowed: int8, fp8")
        raise typer.Exit(2)
    if dtype not in ("float32", "bfloat16"):
        console.print(f"[red]error:[/red] dtype {dtype!r} is not supported; allowed: float32, bfloat16")
        raise typer.Exit(2)
    from headway.tokenization import model_dir

    source = text or EVAL_TEXT
    if not source.is_file():
        console.print(f"[red]error:[/red] text file not found: {source}")
        raise typer.Exit(2)
    with console.status(f"scoring {model} without and with {quantization} ..."):
        report = evaluate(model_dir(model, Path.cwd()), quantization, dtype=dtype, text=source.read_text(), max_tokens=max_tokens)
    table = Table(title=f"{model}: {report['tokens']} tokens of {source.name}, {dtype}")
    for col in ("", "perplexity", "prefill tok/s", "decode step (batch 32)", "linear weights"):
        table.add_column(col, justify="right")
    for name in ("none", quantization):
        r = report[name]
        table.add_row(name, f"{r['perplexity']:.3f}", f"{r['prefill_tokens_per_s']:.0f}",
                      f"{r['decode_step_ms']:.1f} ms", f"{r['linear_weight_mb']:.2f} MB")
    table.add_row("change", f"{report['perplexity_change']:+.2%}", f"{report['prefill_speedup']:.2f}x",
                  f"{report['decode_speedup']:.2f}x faster", f"{report['memory_ratio']:.2f}x")
    console.print(table)
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2))
        console.print(f"wrote {json_path}")
