"""``headway bench``: build a workload, run it against targets and baselines, report side by side.

Owns wiring: options -> ``BenchConfig`` (validated) -> workload -> one ``RunResult`` per target
(the endpoint under test, then baselines in the same run) -> table on stdout and JSON file.
``bench`` is the Typer command; ``run_bench`` is the same thing for Python callers and tests.
"""

from __future__ import annotations

import asyncio
import math
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from headway.bench.client import RequestResult, RunResult, Target, run_workload
from headway.bench.report import build_report, render, summarize, write_json
from headway.bench.text import TextGenerator
from headway.bench.workloads import (
    WORKLOAD_KINDS, LengthDist, Workload, fixed_workload, max_context_tokens, multi_turn_workload,
    poisson_workload, shared_prefix_workload,
)

BASELINES = ("transformers", "llama.cpp")


def _eos_ids(cfg: BenchConfig) -> tuple[int, ...]:
    """EOS token ids from --model-dir (generation_config.json), for banning EOS via logit_bias."""
    if not cfg.ignore_eos or cfg.model_dir is None:
        return ()
    path = Path(cfg.model_dir) / "generation_config.json"
    eos = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
    return tuple(eos if isinstance(eos, list) else [eos] if eos is not None else [])


@dataclass
class BenchConfig:
    """Everything one bench run needs; ``validate`` reports every problem at once."""

    base_url: str | None = None
    model: str = "default"
    api: str = "chat"
    workload: str = "fixed"
    num_requests: int = 16
    concurrency: int = 4
    rate: float = 2.0
    prompt_tokens: str = "128"
    output_tokens: str = "64"
    seed: int = 0
    json_path: Path | None = None
    baselines: list[str] = field(default_factory=list)
    gguf: Path | None = None
    model_dir: Path | None = None
    tokenizer: Path | None = None
    duration_limit: float = 600.0
    request_timeout: float = 300.0
    groups: int = 4
    system_tokens: int = 1000
    turns: int = 3
    target_name: str = "target"
    ratio_to: str | None = None
    device: str = "cpu"
    warmup: int = 1
    ignore_eos: bool = False
    dtype: str = "float32"

    def validate(self) -> None:
        errors: list[str] = []
        if self.api not in ("chat", "completions"):
            errors.append(f"--api must be chat or completions, got {self.api!r}")
        if self.workload not in WORKLOAD_KINDS:
            errors.append(f"--workload must be one of {', '.join(WORKLOAD_KINDS)}, got {self.workload!r}")
        for b in self.baselines:
            if b not in BASELINES:
                errors.append(f"--baseline must be one of {', '.join(BASELINES)}, got {b!r}")
        if "llama.cpp" in self.baselines and self.gguf is None:
            errors.append("--baseline llama.cpp needs --gguf PATH (the GGUF file the server loads)")
        if "transformers" in self.baselines and self.gguf is None and self.model_dir is None:
            errors.append("--baseline transformers needs --gguf PATH or --model-dir PATH")
        if self.base_url is None and not self.baselines:
            errors.append("nothing to benchmark: give --base-url URL and/or --baseline transformers|llama.cpp")
        if self.warmup < 0:
            errors.append(f"--warmup must be >= 0, got {self.warmup}")
        for name in ("num_requests", "concurrency", "groups", "system_tokens", "turns"):
            if getattr(self, name) < 1:
                errors.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.workload == "poisson" and not (self.rate > 0 and math.isfinite(self.rate)):
            errors.append(f"--rate must be > 0 requests/s for the poisson workload, got {self.rate}")
        if self.duration_limit <= 0:
            errors.append(f"--duration-limit must be > 0 seconds, got {self.duration_limit}")
        for opt in ("prompt_tokens", "output_tokens"):
            try:
                LengthDist.parse(getattr(self, opt))
            except ValueError as exc:
                errors.append(f"--{opt.replace('_', '-')}: {exc}")
        for opt in ("gguf", "model_dir", "tokenizer"):
            p = getattr(self, opt)
            if p is not None and not Path(p).exists():
                errors.append(f"--{opt.replace('_', '-')} {p}: no such file or directory")
        if errors:
            raise ValueError("invalid bench options:\n  - " + "\n  - ".join(errors))


def load_text_generator(cfg: BenchConfig) -> TextGenerator:
    """Exact token counts from --tokenizer, the model dir's tokenizer.json, or the GGUF's tokenizer."""
    from tokenizers import Tokenizer

    if cfg.tokenizer is not None:
        return TextGenerator(Tokenizer.from_file(str(cfg.tokenizer)))
    if cfg.model_dir is not None and (Path(cfg.model_dir) / "tokenizer.json").is_file():
        return TextGenerator(Tokenizer.from_file(str(Path(cfg.model_dir) / "tokenizer.json")))
    if cfg.gguf is not None:
        from transformers import AutoTokenizer

        gguf = Path(cfg.gguf)
        return TextGenerator(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).backend_tokenizer)
    return TextGenerator(None)


def build_workload(cfg: BenchConfig, text: TextGenerator) -> Workload:
    prompt, output = LengthDist.parse(cfg.prompt_tokens), LengthDist.parse(cfg.output_tokens)
    if cfg.workload == "fixed":
        return fixed_workload(cfg.num_requests, cfg.concurrency, prompt, output, text, cfg.seed)
    if cfg.workload == "poisson":
        return poisson_workload(cfg.num_requests, cfg.rate, prompt, output, text, cfg.seed, concurrency=cfg.concurrency)
    if cfg.workload == "shared-prefix":
        return shared_prefix_workload(cfg.num_requests, cfg.concurrency, cfg.groups, cfg.system_tokens,
                                      prompt, output, text, cfg.seed)
    conversations = max(1, cfg.num_requests // cfg.turns)
    return multi_turn_workload(conversations, cfg.turns, cfg.concurrency, cfg.groups, prompt, output, text, cfg.seed)


def _n_ctx(workload: Workload) -> int:
    need = int(max_context_tokens(workload) * 1.25) + 128  # chat template and tokenizer slack
    return max(512, 1 << (need - 1).bit_length())


def run_bench(cfg: BenchConfig, console: Console | None = None) -> dict[str, object]:
    """Run the configured benchmark; prints progress and the table, writes JSON, returns the report."""
    cfg.validate()
    console = console or Console()
    text = load_text_generator(cfg)
    workload = build_workload(cfg, text)
    console.print(f"workload: {workload.describe()}")
    runs: list[RunResult] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("errors {task.fields[err]}"),
                  TimeElapsedColumn(), console=console, transient=False) as bar:

        def tracker(name: str):  # noqa: ANN202
            task = bar.add_task(name, total=workload.num_requests, err=0)

            def on_result(r: RequestResult) -> None:
                bar.update(task, advance=1, err=bar.tasks[task].fields["err"] + (0 if r.ok else 1))
            return on_result

        if cfg.base_url is not None:
            target = Target(cfg.target_name, cfg.base_url, cfg.model, cfg.api, cfg.ignore_eos, _eos_ids(cfg))  # type: ignore[arg-type]
            runs.append(asyncio.run(run_workload(target, workload, duration_limit_s=cfg.duration_limit,
                                                 request_timeout_s=cfg.request_timeout, warmup=cfg.warmup,
                                                 progress=tracker(cfg.target_name))))
        if "llama.cpp" in cfg.baselines:
            from headway.bench.baselines import LlamaCppServer

            with LlamaCppServer(cfg.gguf, n_ctx=_n_ctx(workload)) as server:  # type: ignore[arg-type]
                target = Target("llama.cpp", server.base_url, server.model_alias, cfg.api, cfg.ignore_eos, _eos_ids(cfg))  # type: ignore[arg-type]
                run = asyncio.run(run_workload(target, workload, duration_limit_s=cfg.duration_limit,
                                               request_timeout_s=cfg.request_timeout, warmup=cfg.warmup,
                                               progress=tracker("llama.cpp")))
                run.meta.update(server.meta())
                if server.exit_code() is not None:
                    run.meta["server_exit_code"] = server.exit_code()
                    console.print(f"[red]llama.cpp server died during the run with exit code {server.exit_code()} "
                                  f"(negative = killed by that signal, -11 = segfault)[/red]")
                runs.append(run)
        if "transformers" in cfg.baselines:
            import torch

            from headway.bench.baselines import TransformersBaseline

            hf = TransformersBaseline(model_dir=cfg.model_dir, gguf=None if cfg.model_dir else cfg.gguf,
                                      device=cfg.device, dtype=getattr(torch, cfg.dtype))
            hf.ignore_eos = cfg.ignore_eos
            for mode in ("sequential", "batched"):
                runs.append(hf.run(workload, api=cfg.api, mode=mode, duration_limit_s=cfg.duration_limit,
                                   progress=tracker(f"transformers-{mode}"), warmup=cfg.warmup > 0))
    summaries = [summarize(r) for r in runs]
    names = [s.name for s in summaries]
    baseline = cfg.ratio_to
    if baseline is None and len(names) > 1:  # the first baseline run after the target
        baseline = names[1] if cfg.base_url is not None else names[0]
    if baseline is not None and baseline not in names:
        raise ValueError(f"--ratio-to {baseline!r} is not one of the targets run: {names}")
    render(summaries, baseline, console)
    report = build_report(summaries, {**workload.describe(), "api": cfg.api}, baseline)
    if cfg.json_path is not None:
        console.print(f"JSON report: {write_json(report, cfg.json_path)}")
    return report


def bench(
    base_url: Annotated[Optional[str], typer.Option("--base-url", help="OpenAI-compatible server, e.g. http://127.0.0.1:8000")] = None,
    model: Annotated[str, typer.Option(help="model name sent in requests")] = "default",
    api: Annotated[str, typer.Option(help="chat | completions")] = "chat",
    workload: Annotated[str, typer.Option(help="fixed | poisson | shared-prefix | multi-turn")] = "fixed",
    num_requests: Annotated[int, typer.Option(help="requests in the run (multi-turn: total turns)")] = 16,
    concurrency: Annotated[int, typer.Option(help="max requests in flight; HF batched batch size")] = 4,
    rate: Annotated[float, typer.Option(help="poisson arrival rate, requests/s")] = 2.0,
    prompt_tokens: Annotated[str, typer.Option(help="N | uniform:LO:HI | normal:MEAN:STD:LO:HI")] = "128",
    output_tokens: Annotated[str, typer.Option(help="N | uniform:LO:HI | normal:MEAN:STD:LO:HI")] = "64",
    seed: Annotated[int, typer.Option(help="workload seed")] = 0,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="write the JSON report here")] = None,
    baseline: Annotated[Optional[list[str]], typer.Option(help="transformers | llama.cpp (repeatable)")] = None,
    gguf: Annotated[Optional[Path], typer.Option(help="GGUF file for the baselines")] = None,
    model_dir: Annotated[Optional[Path], typer.Option(help="HF model dir for the transformers baseline")] = None,
    tokenizer: Annotated[Optional[Path], typer.Option(help="tokenizer.json for exact prompt token counts")] = None,
    duration_limit: Annotated[float, typer.Option(help="stop each target's run after this many seconds")] = 600.0,
    request_timeout: Annotated[float, typer.Option(help="per-request timeout, seconds")] = 300.0,
    groups: Annotated[int, typer.Option(help="shared-prefix / multi-turn: system-prompt groups")] = 4,
    system_tokens: Annotated[int, typer.Option(help="shared-prefix: system prompt tokens")] = 1000,
    turns: Annotated[int, typer.Option(help="multi-turn: turns per conversation")] = 3,
    target_name: Annotated[str, typer.Option(help="label of the --base-url target")] = "target",
    ratio_to: Annotated[Optional[str], typer.Option(help="target name to compute ratios against")] = None,
    device: Annotated[str, typer.Option(help="device for the transformers baseline")] = "cpu",
    warmup: Annotated[int, typer.Option(help="untimed warm-up requests per target before the run")] = 1,
    dtype: Annotated[str, typer.Option(help="dtype of the transformers baseline: float32 or bfloat16")] = "float32",
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="generate exactly the output length (no early EOS), everywhere")] = False,
) -> None:
    """Load-test an OpenAI-compatible endpoint and compare it with baselines in the same run."""
    cfg = BenchConfig(base_url=base_url, model=model, api=api, workload=workload, num_requests=num_requests,
                      concurrency=concurrency, rate=rate, prompt_tokens=prompt_tokens, output_tokens=output_tokens,
                      seed=seed, json_path=json_path, baselines=list(baseline or []), gguf=gguf, model_dir=model_dir,
                      tokenizer=tokenizer, duration_limit=duration_limit, request_timeout=request_timeout,
                      groups=groups, system_tokens=system_tokens, turns=turns, target_name=target_name,
                      ratio_to=ratio_to, device=device, warmup=warmup, ignore_eos=ignore_eos, dtype=dtype)
    try:
        run_bench(cfg)
    except (ValueError, FileNotFoundError, RuntimeError, TimeoutError) as exc:
        raise typer.BadParameter(str(exc)) from None
