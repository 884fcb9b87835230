"""The fleet simulator: traces, the service model, the fleet's phases, the event loop driving
the real autoscaling and routing policy objects, the oracle, the report and the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from headway.infra.autoscale.policy import KnativeKPA, RayServeDefault, StartupAware
from headway.infra.autoscale.types import AutoscaleConfig, DeploymentMetrics, ScaleDecision
from headway.infra.router.policies import LeastLoad, make_policy
from headway.sim import arrivals
from headway.sim.arrivals import Trace
from headway.sim.compare import compare
from headway.sim.fit import fit, linear_fit
from headway.sim.fleet import DRAINING, GONE, READY, Fleet
from headway.sim.oracle import Oracle, oracle_schedule
from headway.sim.report import summarize, verdict
from headway.sim.run import SimConfig, simulate
from headway.sim.service import DEFAULT, ServiceModel

ROOT = Path(__file__).resolve().parents[1]
MODEL = ServiceModel(itl_base_s=0.02, itl_per_seq_s=0.001, prefill_base_s=0.0, prefill_tokens_per_s=1000.0)
ACFG = AutoscaleConfig(max_replicas=200, target_concurrency=8, target_utilization=0.8, window_s=30,
                       panic_window_s=6, scale_down_delay_s=20, startup_s=10)
SIM = SimConfig(max_concurrency=16, startup_s=10, ttft_objective_s=2.0, tpot_objective_s=0.032,  # ITL(12)
                activator_timeout_s=60, tail_s=600)


def small_bursty(seed: int = 0, duration: float = 600) -> Trace:
    return arrivals.bursty(2.0, duration, seed, burst_factor=6, mean_gap_s=200, mean_burst_s=90, rise_s=30,
                           first_at_s=120, tokens=arrivals.Tokens(prompt_median=200, output_median=100))


def fixed(times: list[float], prompt: int = 100, output: int = 50) -> Trace:
    return Trace("fixed", times, [prompt] * len(times), [output] * len(times), max(times) + 1, {})


def served(r) -> int:
    return int(np.count_nonzero(~np.isnan(np.frombuffer(r.e2e_s, dtype=np.float64))))


class Constant:
    """An autoscaler that always wants `n`, and remembers what it was shown."""

    name = "constant"

    def __init__(self, n: int):
        self.n = n
        self.seen: list[tuple[float, DeploymentMetrics]] = []

    def decide(self, m: DeploymentMetrics, now: float) -> ScaleDecision:
        self.seen.append((now, m))
        return ScaleDecision(self.n, "constant")


class Recording(LeastLoad):
    """The real least-load policy, recording the candidates and events it gets (it listens)."""

    def __init__(self, cap: int):
        super().__init__(seed=0)
        self.cap = cap
        self.chosen = 0
        self.events: dict[str, int] = {}

    def choose(self, req, replicas, now):  # type: ignore[no-untyped-def]
        assert replicas and all(r.in_flight < self.cap for r in replicas)
        self.chosen += 1
        return super().choose(req, replicas, now)

    def observe(self, event):  # type: ignore[no-untyped-def]
        self.events[event.kind] = self.events.get(event.kind, 0) + 1


# ---- traces and the service model ------------------------------------------------------------

def test_traces_are_seeded_and_bursts_raise_the_rate(tmp_path: Path) -> None:
    a, b, c = small_bursty(1), small_bursty(1), small_bursty(2)
    assert a.times == b.times and a.output_tokens == b.output_tokens and a.times != c.times
    assert all(x <= y for x, y in zip(a.times, a.times[1:])) and 0 <= a.times[0] and a.times[-1] < a.duration_s
    steady = arrivals.bursty(2.0, 3600, 0, burst_factor=10, first_at_s=5000)  # no burst inside the trace
    assert len(steady) == pytest.approx(7200, rel=0.1)
    windows = arrivals.burst_windows(3600, 0, 600, 180, 300)
    burst = arrivals.bursty(2.0, 3600, 0, burst_factor=10, rise_s=0)
    inside = sum(1 for t in burst.times if any(s <= t < e for s, e in windows))
    span = sum(e - s for s, e in windows)
    assert inside / span > 5 * (len(burst) - inside) / (3600 - span)
    path = tmp_path / "t.jsonl"
    arrivals.write_jsonl(a, path)
    back = arrivals.replay(path)
    assert back.prompt_tokens == a.prompt_tokens and back.times == pytest.approx(a.times, abs=1e-6)
    path.write_text('{"t": 1.0, "prompt_tokens": 5}\n')
    with pytest.raises(ValueError, match=r"t.jsonl:1: expected a JSON object like"):
        arrivals.replay(path)
    with pytest.raises(ValueError, match="rate must be > 0"):
        arrivals.poisson(0, 10)


def test_service_model_fit_and_validation() -> None:
    assert linear_fit([1, 2, 3], [3, 5, 7]) == pytest.approx((1, 2))
    m = fit({1: 0.021, 8: 0.028, 32: 0.053}, {100: 0.11, 1000: 1.01}, "test")
    assert m.itl_base_s == pytest.approx(0.02, abs=1e-3) and m.itl_per_seq_s == pytest.approx(0.001, abs=1e-4)
    assert m.prefill_tokens_per_s == pytest.approx(1000, rel=0.01) and m.prefill_base_s == pytest.approx(0.01, abs=1e-3)
    assert DEFAULT.itl(32) > DEFAULT.itl(1) > 0
    with pytest.raises(ValueError, match="prefill_tokens_per_s > 0"):
        ServiceModel(0.02, 0.001, 0.0, 0.0)
    with pytest.raises(ValueError, match="at least two distinct"):
        linear_fit([1, 1], [2, 3])


@pytest.mark.slow
def test_the_fit_path_measures_the_real_engine() -> None:
    """headway.sim.fit on the engine in process (tinycoder-test: random weights, fast): decode
    steps per batch size, prefill per prompt length, and a valid model through them."""
    from headway.library import resolve
    from headway.sim.fit import measure

    decode, prefill = measure(resolve("tinycoder-test", install=False, progress=False).path, [1, 8], [32, 512],
                              steps=4, dtype="float32", threads=1)
    assert set(decode) == {1, 8} and set(prefill) == {32, 512}
    # times only, no ordering: on a shared machine a stall can outweigh this tiny model's work
    assert all(0 < s < 5 for s in [*decode.values(), *prefill.values()])
    m = fit(decode, prefill, "tinycoder-test")
    assert m.itl(8) >= m.itl(1) > 0 and m.prefill_s(512) > m.prefill_s(32)


# ---- the fleet ------------------------------------------------------------------------------

def run_fleet(fleet: Fleet, events: list[tuple[float, object]], until: float) -> list[tuple[float, int]]:
    """Process the fleet's scheduled completions in time order (as the loop does); returns (time, request)."""
    done = []
    for _ in range(10_000):
        live = [(t, r) for t, r in events if t <= until]
        if not live:
            break
        t, r = min(live, key=lambda x: x[0])
        events.clear()
        for i in fleet.complete(r, t):  # type: ignore[arg-type]
            done.append((t, i))
        fleet.check()
        for rep in fleet.all:  # pending completions of every replica, as the heap would hold them
            if rep.phase != GONE and rep.fin:
                events.append((t + (rep.fin[0][0] - rep.v) * MODEL.itl(rep.n), rep))
    return done


def test_one_request_alone_takes_prefill_plus_its_decode_steps_and_batching_slows_each() -> None:
    events: list[tuple[float, object]] = []
    fleet = Fleet(MODEL, 4, lambda t, r: events.append((t, r)))
    r = fleet.start(0.0, 5.0)
    assert fleet.mark_ready(r, 5.0) and fleet.views[0].id == r.id
    ttft = fleet.admit(r, 0, 500, 100, 5.0)
    assert ttft == pytest.approx(0.5 + MODEL.itl(1))
    (t, i), = run_fleet(fleet, events, 100)
    assert i == 0 and t == pytest.approx(5.0 + 0.5 + 100 * MODEL.itl(1))
    for k in range(4):
        fleet.admit(r, 10 + k, 500, 100, 50.0)
    assert not fleet.views  # full: no longer a candidate
    done = run_fleet(fleet, events, 1000)
    assert len(done) == 4 and done[0][0] - 50.0 > 0.5 + 100 * MODEL.itl(1)
    assert fleet.views and fleet.in_flight == 0


def test_a_drained_replica_takes_nothing_new_and_finishes_what_it_holds() -> None:
    events: list[tuple[float, object]] = []
    fleet = Fleet(MODEL, 8, lambda t, r: events.append((t, r)))
    a, b = fleet.start(0.0, 1.0), fleet.start(0.0, 1.0)
    fleet.mark_ready(a, 1.0), fleet.mark_ready(b, 1.0)
    for i in range(3):
        fleet.admit(a, i, 100, 40 + 10 * i, 1.0)
    fleet.admit(b, 3, 100, 10, 1.0)
    late = fleet.start(1.0, 30.0)
    assert fleet.remove(2, 2.0) == 2  # the starting one first, then the ready one holding least (b)
    assert late.phase == GONE and late.gone_at == 2.0 and b.phase == DRAINING and a.phase == READY
    assert [v.id for v in fleet.views] == [a.id]
    fleet.check()
    done = run_fleet(fleet, events, 100)
    assert sorted(i for _, i in done) == [0, 1, 2, 3]
    assert b.phase == GONE and b.gone_at == pytest.approx(next(t for t, i in done if i == 3))
    assert a.phase == READY and fleet.in_flight == 0


# ---- the event loop -------------------------------------------------------------------------

def test_same_seed_same_run_and_every_request_accounted_for() -> None:
    trace = small_bursty(3)
    cfg = SimConfig(**{**SIM.__dict__, "activator_timeout_s": 5.0, "startup_s": 20.0})
    runs = [simulate(trace, StartupAware(ACFG), make_policy("least-load", seed=1), cfg, MODEL) for _ in range(2)]
    assert runs[0].ttft_s.tobytes() == runs[1].ttft_s.tobytes() and runs[0].replica_seconds == runs[1].replica_seconds
    other = simulate(trace, StartupAware(ACFG), make_policy("least-load", seed=2), cfg, MODEL)
    assert other.e2e_s.tobytes() != runs[0].e2e_s.tobytes()
    for policy in (StartupAware(ACFG), KnativeKPA(ACFG), RayServeDefault(ACFG)):
        r = simulate(trace, policy, make_policy("least-load"), cfg, MODEL)
        assert served(r) + r.dropped + r.unfinished == len(trace) == r.requests, policy.name
        assert r.unfinished == 0 and r.scale_ups > 0
    # the bursts outrun a 20 s startup and a 5 s activator timeout: drops are counted, not lost
    assert simulate(trace, KnativeKPA(ACFG), make_policy("least-load"), cfg, MODEL).dropped > 0


def test_from_zero_requests_wait_in_the_activator_or_time_out() -> None:
    trace = fixed([100.0, 100.5, 101.0, 102.0])
    waits = simulate(trace, StartupAware(ACFG), make_policy("least-load"), SIM, MODEL)
    assert waits.dropped == 0 and served(waits) == 4
    ttft = np.frombuffer(waits.ttft_s, dtype=np.float64)
    # the first arrival finds no replica: decided at once (not at the next tick), ready 10 s later
    assert ttft[0] == pytest.approx(10 + 0.1 + MODEL.itl(1), abs=1e-6) and (ttft > 8).all()
    impatient = SimConfig(**{**SIM.__dict__, "activator_timeout_s": 3.0})
    gone = simulate(trace, StartupAware(ACFG), make_policy("least-load"), impatient, MODEL)
    assert gone.dropped == 4 and served(gone) == 0
    assert summarize(gone, 2.0).sla_attainment == 0.0 and summarize(waits, 20.0).sla_attainment == 1.0
    no_room = SimConfig(**{**SIM.__dict__, "activator_size": 0})
    full = simulate(trace, StartupAware(ACFG), make_policy("least-load"), no_room, MODEL)
    assert full.dropped == 4  # a full activator turns requests away at once


def test_the_loop_drives_the_policy_objects_it_is_given() -> None:
    trace = arrivals.poisson(4.0, 120, 0, arrivals.Tokens(prompt_median=100, output_median=50))
    policy, router = Constant(5), Recording(SIM.max_concurrency)
    r = simulate(trace, policy, router, SIM, MODEL, keep_timeline=True)
    first, ticks = policy.seen[0][0], [t for t, _ in policy.seen[1:]]
    assert first == trace.times[0] < 1.0 and policy.seen[0][1].queued == 1  # from zero: at once
    assert ticks[:3] == [1.0, 2.0, 3.0] and all(b - a == pytest.approx(1.0) for a, b in zip(ticks, ticks[1:]))
    assert r.replicas_started == 5 and r.peak_replicas == 5 and r.scale_ups == 1 and r.scale_downs == 0
    at = {round(t): m for t, m in policy.seen}
    assert (at[5].ready, at[5].starting) == (0, 5) and (at[12].ready, at[12].starting) == (5, 0)
    assert at[12].startup_s == pytest.approx(10.0) and at[5].startup_s is None
    assert all(now - 61 <= t <= now for now, m in policy.seen for t, _ in m.samples)  # the window and a tick
    m = at[90]
    assert [t for t, _ in m.samples] == list(range(29, 91)) and m.latency_p95_s is not None
    assert router.chosen == len(trace) == served(r)
    assert router.events == {"started": len(trace), "finished": len(trace)}
    assert r.replica_seconds == pytest.approx(5 * (r.end_s - first))  # asked for at the first arrival, kept


def test_warmup_keeps_the_initial_fleet_and_asks_nothing() -> None:
    trace = arrivals.poisson(2.0, 90, 0, arrivals.Tokens(prompt_median=100, output_median=50))
    policy = Constant(1)
    cfg = SimConfig(**{**SIM.__dict__, "initial_replicas": 3, "warmup_s": 30.0})
    r = simulate(trace, policy, make_policy("least-load"), cfg, MODEL, keep_timeline=True)
    assert policy.seen[0][0] == 30.0 and len(policy.seen[0][1].samples) == 30  # a full history at the first call
    assert r.peak_replicas == 3 and r.scale_downs == 1 and (r.timeline[0][0], r.timeline[0][2]) == (30.0, 1)
    with pytest.raises(ValueError, match="warmup_s must be >= 0"):
        SimConfig(warmup_s=-1)


def test_the_oracle_uses_no_more_replica_seconds_than_any_policy() -> None:
    trace = small_bursty(0, duration=900)
    rows = compare(trace, ["headway", "knative-kpa", "ray-serve", "oracle"], ACFG, SIM, MODEL)
    by = {s.policy: s for s in rows}
    assert by["oracle"].sla_attainment >= 0.999 and by["oracle"].rs_vs_oracle == 1.0
    for name in ("headway", "knative-kpa", "ray-serve"):
        assert by[name].replica_seconds >= by["oracle"].replica_seconds, name
    assert "vs knative-kpa" in verdict(rows) and "SLA" in verdict(rows)
    schedule = oracle_schedule(trace, MODEL, ACFG.target_concurrency, SIM.startup_s)
    assert max(schedule) > 2 * min(schedule[:100])
    assert Oracle(schedule).decide(DeploymentMetrics([]), 1e9).desired == schedule[-1]
    with pytest.raises(ValueError, match="unknown autoscaling policy 'kpa'; choose from"):
        compare(trace, ["kpa"], ACFG, SIM, MODEL)


def test_cli_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, "-m", "headway.sim", "--trace", "bursty", "--duration", "400", "--rate", "1",
                           "--first-burst", "100", "--startup", "10", "--json", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| headway |" in proc.stdout and "| oracle |" in proc.stdout and "target: SLA" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["policy"] for r in rows] == ["headway", "knative-kpa", "ray-serve", "oracle"]
    assert all(0 <= r["sla_attainment"] <= 1 and not math.isnan(r["replica_seconds"]) for r in rows)
    bad = subprocess.run([sys.executable, "-m", "headway.sim", "--policy", "nope", "--duration", "10"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode != 0 and "unknown autoscaling policy 'nope'" in bad.stderr
