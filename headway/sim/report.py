"""Figures of a run and the side-by-side table of policies on one trace.

SLA attainment is the fraction of the trace's requests whose time to first token (arrival to
first token: activator wait, prefill, one decode step) is within the TTFT objective and whose
mean time per output token after the first (TPOT) is within the TPOT objective; a request
dropped by the activator or unfinished at the end is a miss. Replica-seconds count every
replica from when it was asked for (its startup included) until it is gone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np

from headway.sim.run import RunResult


@dataclass(frozen=True)
class Summary:
    policy: str
    requests: int
    sla_attainment: float
    ttft_p50_s: float
    ttft_p95_s: float
    ttft_p99_s: float
    e2e_p50_s: float
    e2e_p95_s: float
    tpot_p95_s: float
    replica_seconds: float
    scale_ups: int
    scale_downs: int
    replicas_started: int
    peak_replicas: int
    dropped: int
    unfinished: int
    wall_s: float
    rs_vs_oracle: float | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _pct(x: np.ndarray, q: float) -> float:
    """Percentile over all requests with the never-served ones as +inf (so they count as slow)."""
    return float(np.percentile(np.nan_to_num(x, nan=np.inf), q, method="higher")) if len(x) else 0.0


def summarize(r: RunResult, ttft_objective_s: float, tpot_objective_s: float | None = None) -> Summary:
    ttft = np.frombuffer(r.ttft_s, dtype=np.float64)
    e2e = np.frombuffer(r.e2e_s, dtype=np.float64)
    tpot = np.frombuffer(r.tpot_s, dtype=np.float64)
    ok = (ttft <= ttft_objective_s) & ~np.isnan(e2e)  # NaN compares False: a miss
    if tpot_objective_s is not None:
        ok &= tpot <= tpot_objective_s
    met = int(np.count_nonzero(ok))
    return Summary(r.policy, r.requests, met / r.requests if r.requests else 1.0, _pct(ttft, 50), _pct(ttft, 95),
                   _pct(ttft, 99), _pct(e2e, 50), _pct(e2e, 95), _pct(tpot, 95), r.replica_seconds, r.scale_ups,
                   r.scale_downs, r.replicas_started, r.peak_replicas, r.dropped, r.unfinished, r.wall_s)


def with_oracle_ratio(rows: Sequence[Summary]) -> list[Summary]:
    """Each row's replica-seconds over the oracle's (the row named "oracle"), when there is one."""
    base = next((s.replica_seconds for s in rows if s.policy == "oracle"), None)
    if not base:
        return list(rows)
    return [replace(s, rs_vs_oracle=s.replica_seconds / base) for s in rows]


def _secs(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.2f}"


def render(rows: Sequence[Summary], ttft_objective_s: float, tpot_objective_s: float | None = None) -> str:
    tpot = "" if tpot_objective_s is None else f", TPOT <= {1e3 * tpot_objective_s:g} ms"
    head = (f"| policy | SLA (TTFT <= {ttft_objective_s:g} s{tpot}) | TTFT p50 / p95 / p99 s | TPOT p95 ms | "
            "e2e p50 / p95 s | "
            "replica-s | vs oracle | ups / downs | started | peak | dropped |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in rows:
        ratio = "—" if s.rs_vs_oracle is None else f"{s.rs_vs_oracle:.2f}x"
        lines.append(f"| {s.policy} | {100 * s.sla_attainment:.2f} % | {_secs(s.ttft_p50_s)} / {_secs(s.ttft_p95_s)} / "
                     f"{_secs(s.ttft_p99_s)} | {1e3 * s.tpot_p95_s:.0f} | {_secs(s.e2e_p50_s)} / {_secs(s.e2e_p95_s)} | "
                     f"{s.replica_seconds:,.0f} | "
                     f"{ratio} | {s.scale_ups} / {s.scale_downs} | {s.replicas_started} | {s.peak_replicas} | "
                     f"{s.dropped + s.unfinished} |")
    return "\n".join(lines)


def verdict(rows: Sequence[Summary], ours: str = "headway", sla: float = 0.99, rs_ratio: float = 1.2) -> str:
    """Whether `ours` meets the target: >= `sla` attainment, <= `rs_ratio` x the oracle's
    replica-seconds, and against each other policy better on one of the two, worse on neither."""
    by = {s.policy: s for s in rows}
    me = by.get(ours)
    if me is None or me.rs_vs_oracle is None:
        return f"no verdict: need rows for '{ours}' and 'oracle'"
    parts = [f"SLA {100 * me.sla_attainment:.2f} % (>= {100 * sla:g} %: {'yes' if me.sla_attainment >= sla else 'NO'})",
             (f"replica-s {me.rs_vs_oracle:.2f}x oracle "
              f"(<= {rs_ratio:g}x: {'yes' if me.rs_vs_oracle <= rs_ratio else 'NO'})")]
    for s in rows:
        if s.policy in (ours, "oracle"):
            continue
        better = me.sla_attainment > s.sla_attainment or me.replica_seconds < s.replica_seconds
        worse = me.sla_attainment < s.sla_attainment or me.replica_seconds > s.replica_seconds
        parts.append(f"vs {s.policy}: {'beats' if better and not worse else 'does NOT beat'}")
    return "; ".join(parts)
