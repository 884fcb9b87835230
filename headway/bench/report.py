"""Benchmark statistics and reports: percentiles, per-target summaries, baseline ratios.

Owns turning ``RunResult``s into numbers (TTFT / ITL / end-to-end mean and p50/p95/p99, request
and output-token throughput, error counts with their messages), a rich table on stdout and a
JSON file. Latency statistics use successful requests only; errors are counted, never dropped.

Ratios are ``target / baseline`` for every metric: above 1 is better for throughputs, below 1
is better for latencies (the table says which).
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from headway.bench.client import RunResult

LATENCY_METRICS = ("ttft", "itl", "e2e")
THROUGHPUT_METRICS = ("request_throughput", "output_token_throughput")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics
    (numpy's default 'linear' method)."""
    if not values:
        raise ValueError("percentile of an empty sample is undefined")
    if not 0.0 <= q <= 100.0 or math.isnan(q):
        raise ValueError(f"percentile q must be within [0, 100], got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class Stat:
    """Summary of one latency sample, in seconds."""

    count: int
    mean: float
    p50: float
    p95: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat | None:
        if not values:
            return None
        return cls(count=len(values), mean=sum(values) / len(values), p50=percentile(values, 50),
                   p95=percentile(values, 95), p99=percentile(values, 99))


@dataclass
class TargetSummary:
    """The numbers reported for one target."""

    name: str
    requests: int
    completed: int
    errors: int
    wall_s: float
    output_tokens: int
    request_throughput: float  # completed requests / wall second
    output_token_throughput: float  # output tokens of completed requests / wall second
    ttft: Stat | None
    itl: Stat | None
    e2e: Stat | None
    error_messages: dict[str, int] = field(default_factory=dict)
    meta: dict[str, object] = field(default_factory=dict)

    def metric(self, name: str) -> float | None:
        """A scalar used for ratios: throughputs, or the p50 of a latency."""
        if name in THROUGHPUT_METRICS:
            return float(getattr(self, name))
        stat = getattr(self, name.split(".")[0])
        return None if stat is None else float(getattr(stat, name.split(".")[1] if "." in name else "p50"))


def summarize(run: RunResult) -> TargetSummary:
    """Summary of one run."""
    ok = [r for r in run.results if r.ok]
    errors = [r for r in run.results if not r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    wall = max(run.wall_s, 1e-9)
    return TargetSummary(
        name=run.target, requests=len(run.results), completed=len(ok), errors=len(errors),
        wall_s=run.wall_s, output_tokens=out_tokens, request_throughput=len(ok) / wall,
        output_token_throughput=out_tokens / wall,
        ttft=Stat.of([r.ttft_s for r in ok if r.ttft_s is not None]),
        itl=Stat.of([gap for r in ok for gap in r.itl_s]),
        e2e=Stat.of([r.e2e_s for r in ok if r.e2e_s is not None]),
        error_messages=dict(Counter(str(r.error) for r in errors).most_common()),
        meta=dict(run.meta),
    )


RATIO_METRICS = ("output_token_throughput", "request_throughput", "ttft.p50", "ttft.p95",
                 "itl.p50", "itl.p95", "e2e.p50", "e2e.p95")


def compare(summaries: Sequence[TargetSummary], baseline: str) -> dict[str, dict[str, float | None]]:
    """``{target: {metric: target/baseline}}`` for every target, against the one named ``baseline``."""
    by_name = {s.name: s for s in summaries}
    if baseline not in by_name:
        raise ValueError(f"baseline {baseline!r} is not one of the targets: {sorted(by_name)}")
    base = by_name[baseline]
    ratios: dict[str, dict[str, float | None]] = {}
    for s in summaries:
        row: dict[str, float | None] = {}
        for m in RATIO_METRICS:
            a, b = s.metric(m), base.metric(m)
            row[m] = None if a is None or b is None or b == 0 else a / b
        ratios[s.name] = row
    return ratios


def machine_info() -> dict[str, object]:
    """Where the numbers were measured (absolute times are only meaningful with this)."""
    info: dict[str, object] = {"platform": platform.platform(), "python": platform.python_version(),
                               "cpu_count": os.cpu_count(), "processor": platform.processor()}
    if hasattr(os, "sched_getaffinity"):
        info["cpus_available"] = len(os.sched_getaffinity(0))
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name(0)
    except ImportError:  # pragma: no cover - torch is a project dependency
        pass
    return info


def build_report(summaries: Sequence[TargetSummary], workload: dict[str, object],
                 baseline: str | None = None) -> dict[str, object]:
    """The JSON-ready report: machine, workload, one summary per target, ratios to a baseline."""
    report: dict[str, object] = {
        "machine": machine_info(),
        "workload": workload,
        "targets": [asdict(s) for s in summaries],
        "baseline": baseline,
    }
    if baseline is not None:
        report["ratios"] = compare(summaries, baseline)
    return report


def write_json(report: dict[str, object], path: str | Path) -> Path:
    """Write ``report`` as indented JSON; creates parent directories."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return out


def _ms(stat: Stat | None, key: str) -> str:
    return "-" if stat is None else f"{getattr(stat, key) * 1000:.1f}"


def render(summaries: Sequence[TargetSummary], baseline: str | None = None,
           console: Console | None = None) -> None:
    """Print the comparison table (and the errors, if any) with rich."""
    console = console or Console()
    table = Table(title="headway bench (latencies in ms)")
    table.add_column("metric")
    for s in summaries:
        table.add_column(s.name + (" (baseline)" if s.name == baseline else ""), justify="right")
    rows: list[tuple[str, list[str]]] = [
        ("requests ok / total", [f"{s.completed}/{s.requests}" for s in summaries]),
        ("errors", [str(s.errors) for s in summaries]),
        ("wall s", [f"{s.wall_s:.2f}" for s in summaries]),
        ("req/s", [f"{s.request_throughput:.3f}" for s in summaries]),
        ("output tok/s", [f"{s.output_token_throughput:.1f}" for s in summaries]),
    ]
    for metric in LATENCY_METRICS:
        for key in ("mean", "p50", "p95", "p99"):
            rows.append((f"{metric} {key}", [_ms(getattr(s, metric), key) for s in summaries]))
    if baseline is not None:
        ratios = compare(summaries, baseline)
        for m in RATIO_METRICS:
            better = "higher" if m in THROUGHPUT_METRICS else "lower"
            cells = [("-" if ratios[s.name][m] is None else f"{ratios[s.name][m]:.2f}x") for s in summaries]
            rows.append((f"{m} vs baseline ({better} is better)", cells))
    for label, cells in rows:
        table.add_row(label, *cells)
    console.print(table)
    for s in summaries:
        for msg, n in s.error_messages.items():
            console.print(f"[red]{s.name}: {n} x {msg}[/red]")
