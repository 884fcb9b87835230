"""python -m headway.sim: autoscaling policies side by side on a simulated trace.

    python -m headway.sim --trace bursty --policy all --duration 3600 [--json out.json]

Prints one row per policy (SLA attainment, TTFT percentiles, replica-seconds and their ratio
to the oracle's, scale events, peak replicas, dropped) and whether Headway's policy meets the
target (>= 99 % SLA, <= 1.2x the oracle's replica-seconds, better than each baseline on one
of the two and worse on neither).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

from headway.infra.autoscale.types import AutoscaleConfig
from headway.infra.router.policies import POLICIES as ROUTERS
from headway.sim import arrivals
from headway.sim.compare import AUTOSCALERS, compare
from headway.sim.report import render, verdict
from headway.sim.run import SimConfig
from headway.sim.service import DEFAULT, ServiceModel

TRACES = ("poisson", "bursty", "diurnal")


def build_trace(a: argparse.Namespace) -> arrivals.Trace:
    tokens = arrivals.Tokens(prompt_median=a.prompt_median, output_median=a.output_median)
    if a.trace == "poisson":
        return arrivals.poisson(a.rate, a.duration, a.seed, tokens)
    if a.trace == "bursty":
        return arrivals.bursty(a.rate, a.duration, a.seed, burst_factor=a.burst_factor, mean_gap_s=a.mean_gap,
                               mean_burst_s=a.mean_burst, rise_s=a.rise, first_at_s=a.first_burst, tokens=tokens)
    if a.trace == "diurnal":
        return arrivals.diurnal(a.rate, a.rate * a.burst_factor, a.duration, a.seed, period_s=a.duration,
                                tokens=tokens)
    if Path(a.trace).is_file():
        return arrivals.replay(a.trace)
    raise SystemExit(f"--trace must be one of {', '.join(TRACES)} or a JSONL file; got '{a.trace}'")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m headway.sim", description=__doc__.split("\n\n")[0])
    t = ap.add_argument_group("trace")
    t.add_argument("--trace", default="bursty", help=f"{', '.join(TRACES)}, or a JSONL file of "
                   '{"t": s, "prompt_tokens": n, "output_tokens": m}')
    t.add_argument("--duration", type=float, default=3600.0, help="simulated seconds")
    t.add_argument("--rate", type=float, default=10.0,
                   help="requests/s: poisson's rate, bursty's base, diurnal's trough")
    t.add_argument("--burst-factor", type=float, default=10.0, help="bursts (and diurnal's peak) at this x the rate")
    t.add_argument("--rise", type=float, default=120.0, help="seconds a burst takes to ramp up and down (0: steps)")
    t.add_argument("--mean-gap", type=float, default=600.0, help="mean seconds between bursts")
    t.add_argument("--mean-burst", type=float, default=180.0, help="mean seconds a burst lasts")
    t.add_argument("--first-burst", type=float, default=300.0, help="when the first burst starts")
    t.add_argument("--prompt-median", type=int, default=256)
    t.add_argument("--output-median", type=int, default=192)
    t.add_argument("--seed", type=int, default=0)
    f = ap.add_argument_group("fleet")
    f.add_argument("--policy", default="all", help=f"comma-separated from {', '.join(AUTOSCALERS)}, or all")
    f.add_argument("--router", default="least-load", choices=sorted(ROUTERS))
    f.add_argument("--startup", type=float, default=10.0, help="replica startup seconds (scheduled -> ready)")
    f.add_argument("--startup-spread", type=float, default=0.0, help="startup drawn uniformly within +- this")
    f.add_argument("--max-concurrency", type=int, default=32, help="requests a replica holds at most")
    f.add_argument("--target-concurrency", type=float, default=16.0)
    f.add_argument("--target-utilization", type=float, default=0.9)
    f.add_argument("--max-replicas", type=int, default=5000)
    f.add_argument("--window", type=float, default=60.0, help="stable window seconds")
    f.add_argument("--panic-window", type=float, default=6.0)
    f.add_argument("--panic-threshold", type=float, default=2.0)
    f.add_argument("--scale-down-delay", type=float, default=30.0)
    f.add_argument("--initial-replicas", type=int, default=None, help="ready at t=0 (default: the oracle's)")
    f.add_argument("--warmup", type=float, default=None,
                   help="seconds before the autoscaler is first consulted (default: the stable window)")
    f.add_argument("--ttft-objective", type=float, default=2.0, help="the SLA: TTFT within this many seconds")
    f.add_argument("--tpot-objective", type=float, default=0.05,
                   help="and mean seconds per output token within this (0: no TPOT objective)")
    f.add_argument("--activator-timeout", type=float, default=120.0)
    f.add_argument("--service-model", type=Path, default=None, help="JSON from python -m headway.sim.fit --json")
    f.add_argument("--speedup", type=float, default=1.0, help="replicas this many times faster than the fitted model")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    return ap


def main(argv: Sequence[str] | None = None) -> None:
    a = parser().parse_args(argv)
    names = list(AUTOSCALERS) if a.policy == "all" else [p.strip() for p in a.policy.split(",") if p.strip()]
    model = DEFAULT
    if a.service_model:
        model = ServiceModel(**json.loads(a.service_model.read_text())["model"])
    if a.speedup != 1.0:
        model = model.scaled(a.speedup)
    try:
        config = AutoscaleConfig(min_replicas=0, max_replicas=a.max_replicas, target_concurrency=a.target_concurrency,
                                 target_utilization=a.target_utilization, window_s=a.window,
                                 panic_window_s=a.panic_window, panic_threshold=a.panic_threshold,
                                 scale_down_delay_s=a.scale_down_delay, startup_s=a.startup)
        sim = SimConfig(max_concurrency=a.max_concurrency, startup_s=a.startup, startup_spread_s=a.startup_spread,
                        ttft_objective_s=a.ttft_objective,
                        tpot_objective_s=a.tpot_objective or None,
                        warmup_s=a.window if a.warmup is None else a.warmup,
                        activator_timeout_s=a.activator_timeout, seed=a.seed)
        t0, c0 = time.perf_counter(), time.process_time()
        trace = build_trace(a)
        rows = compare(trace, names, config, sim, model, router=a.router, initial_replicas=a.initial_replicas)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"trace {trace.name}: {len(trace):,} requests over {trace.duration_s:g} s {trace.params}; "
          f"startup {a.startup:g} s; router {a.router}; service model: {model}")
    print(render(rows, sim.ttft_objective_s, sim.tpot_objective_s))
    if "oracle" in names and "headway" in names:
        print("target: " + verdict(rows))
    print(f"simulated {len(names)} policies in {time.perf_counter() - t0:.1f} s wall, "
          f"{time.process_time() - c0:.1f} s CPU; per policy: "
          + ", ".join(f"{s.policy} {s.wall_s:.1f} s ({trace.duration_s / s.wall_s:.0f}x real time, "
                      f"{s.requests / s.wall_s / 1e3:.0f}k requests/s, peak {s.peak_replicas} replicas)" for s in rows))
    if a.json:
        a.json.write_text(json.dumps({"trace": {"name": trace.name, "requests": len(trace), **trace.params},
                                      "argv": vars(a) | {"json": str(a.json), "service_model": str(a.service_model)},
                                      "rows": [s.to_dict() for s in rows]}, indent=1))


if __name__ == "__main__":
    main()
