"""Autoscaling policies (pure): Headway's startup-aware policy against Knative's KPA and Ray
Serve's default, on hand-made metric histories."""

from __future__ import annotations

import math

import pytest

from headway.infra.autoscale.policy import KnativeKPA, RayServeDefault, StartupAware, line, trend
from headway.infra.autoscale.types import AutoscaleConfig, DeploymentMetrics

CFG = AutoscaleConfig(min_replicas=0, max_replicas=50, target_concurrency=8, target_utilization=0.5,
                      window_s=20, panic_window_s=4, scale_down_delay_s=30, startup_s=10)  # 4 per replica


def samples(fn, now: float, span: float = 60, step: float = 1.0) -> list[tuple[float, float]]:
    n = int(span / step)
    return [(now - span + (i + 1) * step, float(fn(now - span + (i + 1) * step))) for i in range(n)]


def test_config_reports_every_error_at_once() -> None:
    with pytest.raises(ValueError) as e:
        AutoscaleConfig(min_replicas=5, max_replicas=2, target_utilization=1.5, panic_window_s=100, window_s=10)
    msg = str(e.value)
    assert "min_replicas" in msg and "target_utilization" in msg and "panic_window_s" in msg


def test_steady_load_sizes_for_target_times_utilization() -> None:
    for policy in (StartupAware(CFG), KnativeKPA(CFG)):
        d = policy.decide(DeploymentMetrics(samples(lambda t: 40, 100), ready=10), 100)
        assert d.desired == 10 and not d.panic, policy.name


def test_from_zero_at_once_and_to_zero_after_the_delay() -> None:
    p = StartupAware(CFG)
    d = p.decide(DeploymentMetrics([], ready=0, queued=1), 0.0)
    assert (d.desired, d.reason) == (1, "from-zero")
    busy = samples(lambda t: 2, 10, span=10)
    assert p.decide(DeploymentMetrics(busy, ready=1), 10).desired == 1
    quiet_until = lambda now: samples(lambda t: 2 if t <= 10 else 0, now, span=now)  # noqa: E731
    assert p.decide(DeploymentMetrics(quiet_until(35), ready=1), 35).desired == 1   # within the delay: hold
    assert p.decide(DeploymentMetrics(quiet_until(45), ready=1), 45).desired == 0   # no traffic for 30 s
    assert RayServeDefault(CFG).decide(DeploymentMetrics([], ready=0, queued=3), 0).desired == 1


def test_replicas_starting_count_as_capacity() -> None:
    """A burst from 4 to 40: the first decision asks for 10 in total; decisions while those
    start keep asking for 10, not 10 more each time."""
    p = StartupAware(CFG)
    burst = lambda now: samples(lambda t: 4 if t < 100 else 40, now)  # noqa: E731
    first = p.decide(DeploymentMetrics(burst(104), ready=1), 104)
    assert first.panic and first.desired == 10
    for now in (106, 108, 110, 112):
        d = p.decide(DeploymentMetrics(burst(now), ready=1, starting=first.desired - 1), now)
        assert d.desired == first.desired, (now, d)


def test_a_ramp_is_met_one_startup_ahead() -> None:
    """Load rising 1 request/s: with a 10 s startup, Headway asks now for what the ramp will
    need when the replicas are ready; KPA sizes for the (lagging) window average."""
    ramp = samples(lambda t: max(0.0, t - 40), 100)  # 60 at t=100, rising 1/s
    assert trend(ramp, 100, 20) == pytest.approx(1.0)
    m = DeploymentMetrics(ramp, ready=15)
    ours, kpa = StartupAware(CFG).decide(m, 100), KnativeKPA(CFG).decide(m, 100)
    assert ours.reason == "forecast" and ours.desired >= 17   # ceil((~58 + 10) / 4)
    assert kpa.desired <= 13                                  # ceil(mean of the last 20 s / 4)
    flat = StartupAware(AutoscaleConfig(**{**CFG.__dict__, "startup_s": 0}))
    assert flat.decide(m, 100).desired < ours.desired


def test_scale_down_waits_for_the_delay_and_bounds_hold() -> None:
    p = StartupAware(CFG)
    load = lambda now: samples(lambda t: 40 if t < 100 else 8, now)  # noqa: E731
    assert p.decide(DeploymentMetrics(load(99), ready=10), 99).desired == 10
    for now in (110, 120, 128):
        d = p.decide(DeploymentMetrics(load(now), ready=10), now)
        assert d.desired == 10 and d.reason == "hold", now
    d = p.decide(DeploymentMetrics(load(140), ready=10), 140)   # t=110 still saw the old load in its window
    assert (d.desired, d.reason) == (6, "hold")
    assert p.decide(DeploymentMetrics(load(151), ready=10), 151).desired == 2
    capped = StartupAware(AutoscaleConfig(max_replicas=3, target_concurrency=8, target_utilization=0.5))
    d = capped.decide(DeploymentMetrics(samples(lambda t: 400, 100), ready=3), 100)
    assert (d.desired, d.reason) == (3, "bounds")


def test_latency_objective_grows_one_replica_per_decision() -> None:
    cfg = AutoscaleConfig(**{**CFG.__dict__, "latency_objective_s": 0.5})
    p = StartupAware(cfg)
    calm = samples(lambda t: 4, 100)  # one replica's worth by concurrency
    d1 = p.decide(DeploymentMetrics(calm, ready=1, latency_p95_s=1.2), 100)
    d2 = p.decide(DeploymentMetrics(calm, ready=2, latency_p95_s=0.9), 102)
    assert (d1.desired, d1.reason) == (2, "latency") and (d2.desired, d2.reason) == (3, "latency")
    d3 = p.decide(DeploymentMetrics(calm, ready=3, latency_p95_s=0.3), 104)
    assert d3.desired == 3  # met: kept, not grown


def test_ray_serve_waits_out_its_delays() -> None:
    p = RayServeDefault(CFG)
    up = lambda now: samples(lambda t: 64, now)  # noqa: E731  (8 per replica -> 8 replicas)
    assert p.decide(DeploymentMetrics(up(100), ready=2), 100).desired == 2
    assert p.decide(DeploymentMetrics(up(120), ready=2), 120).desired == 2
    assert p.decide(DeploymentMetrics(up(130), ready=2), 130).desired == 8   # after 30 s of asking
    down = lambda now: samples(lambda t: 8, now)  # noqa: E731
    assert p.decide(DeploymentMetrics(down(200), ready=8), 200).desired == 8
    assert p.decide(DeploymentMetrics(down(700), ready=8), 700).desired == 8
    assert p.decide(DeploymentMetrics(down(800), ready=8), 800).desired == 1  # after 600 s


def test_line_fits_and_reports_significance() -> None:
    level, slope, t, r2 = line(samples(lambda t: 2 * t + 1, 100), 100, 20)
    assert (level, slope, r2) == pytest.approx((201, 2, 1)) and t == math.inf
    flat = line(samples(lambda t: 7, 100), 100, 20)
    assert flat == (7.0, 0.0, 0.0, 0.0)
    step = line(samples(lambda t: 40 if t <= 90 else 8, 100), 100, 20)
    assert step[1] < 0 and step[3] < 0.76  # a step fits a line poorly (R^2 <= 3/4): not a ramp


def test_a_ramp_down_is_followed_without_the_delay_but_a_step_down_is_held() -> None:
    p = StartupAware(CFG)
    down = lambda now: samples(lambda t: max(8.0, 100 - 2 * (t - 50)) if t > 50 else 100, now)  # noqa: E731
    assert p.decide(DeploymentMetrics(down(50), ready=25), 50).desired == 25
    d = p.decide(DeploymentMetrics(down(75), ready=25), 75)   # the line says 50 now, the short window 53
    assert d.desired == math.ceil(53 / CFG.per_replica) and d.reason == "stable"
    kpa = KnativeKPA(CFG)
    kpa.decide(DeploymentMetrics(down(50), ready=25), 50)
    assert kpa.decide(DeploymentMetrics(down(75), ready=25), 75).desired == 25   # KPA holds the delay
    held = StartupAware(CFG)
    step = lambda now: samples(lambda t: 100 if t < 60 else 20, now)  # noqa: E731
    held.decide(DeploymentMetrics(step(59), ready=25), 59)
    assert held.decide(DeploymentMetrics(step(75), ready=25), 75).desired == 25  # a step: the delay holds


def test_a_rise_counts_from_its_onset() -> None:
    """Flat at 40, then rising 4/s for the last 8 s: the 60 s window's line barely moves; the
    onset line (two startups, 20 s) sees the rise and sizes one startup ahead."""
    cfg = AutoscaleConfig(**{**CFG.__dict__, "window_s": 60})
    rise = samples(lambda t: 40 + max(0.0, 4 * (t - 92)), 100, span=120)
    ours = StartupAware(cfg).decide(DeploymentMetrics(rise, ready=10), 100)
    late = StartupAware(cfg)
    late.ONSET_GAIN = math.inf  # the stable window's line only
    assert ours.reason == "forecast" and ours.desired == 20       # ceil((61.9 + 1.55 * 10) / 4)
    # the 60 s line rises 2.2 within a startup, less than a replica (4): no forecast, the mean
    assert late.decide(DeploymentMetrics(rise, ready=10), 100).desired == 11
    assert KnativeKPA(cfg).decide(DeploymentMetrics(rise, ready=10), 100).desired == 11
    young = samples(lambda t: 40 + max(0.0, 4 * (t - 92)), 100, span=20)  # 20 s of history: no trend yet
    assert StartupAware(cfg).decide(DeploymentMetrics(young, ready=10), 100).reason != "forecast"
    noise = samples(lambda t: 40 + (1 if int(t) % 2 else -1), 100, span=120)  # noise is no trend
    assert StartupAware(cfg).decide(DeploymentMetrics(noise, ready=10), 100).desired == 10


# ---- resuming after a control-plane restart ----------------------------------------------------

def test_a_fresh_policy_after_a_restart_would_drop_what_runs_and_a_resumed_one_holds_it() -> None:
    """Four replicas carry 16 in flight; the control plane restarts and its first sample sees 0
    (clients reconnecting). With no history a policy scales to zero at once (the bug); resumed
    with the adopted count it holds 4 for the scale-down delay and a full stable window."""
    quiet = [(100.0, 0.0)]
    assert StartupAware(CFG).decide(DeploymentMetrics(quiet, ready=4), 100).desired == 0
    for cls in (StartupAware, KnativeKPA):
        p = cls(CFG)
        p.resume({}, 0.0, 4, 0.0, 100.0)                 # no saved state: hold for max(delay 30, window 20)
        for now in (100.0, 110.0, 129.0):
            d = p.decide(DeploymentMetrics([(t, 0.0) for t in range(100, int(now) + 1)], ready=4), now)
            assert (d.desired, d.reason) == (4, "resumed"), (cls.name, now, d)
        d = p.decide(DeploymentMetrics([(t, 0.0) for t in range(100, 162)], ready=4), 161)
        assert d.desired == 0, (cls.name, d)             # nothing came for a whole delay: now it may go
        p = cls(CFG)
        p.resume({}, 0.0, 4, 0.0, 100.0)
        busy = [(t, 40.0) for t in range(95, 106)]       # more load than before: growing is never held back
        assert p.decide(DeploymentMetrics(busy, ready=4), 105).desired == 10, cls.name


def test_state_survives_json_and_a_clock_shift() -> None:
    """A restart moves the loop's clock (a new process, maybe a new machine): saved times move by
    the shift, and a policy resumed from JSON (with the loop's samples moved alike) decides as the
    one that never stopped."""
    import json

    p = StartupAware(CFG)
    load = lambda now: samples(lambda t: 16 if t <= 50 else 0, now, span=now)  # noqa: E731
    for now in range(1, 61):
        d = p.decide(DeploymentMetrics(load(now), ready=4), float(now))
    assert d.desired == 4 and d.reason == "hold"
    q = StartupAware(CFG)
    q.resume(json.loads(json.dumps(p.state())), 1000.0, 0, 20.0, 1060.0)   # adopted 0: no floor
    went = []
    for now in range(61, 130):
        a = p.decide(DeploymentMetrics(load(now), ready=4), float(now))
        b = q.decide(DeploymentMetrics([(t + 1000, c) for t, c in load(now)], ready=4), now + 1000.0)
        assert a == b, (now, a, b)
        went.append(a.desired)
    assert went[0] == 4 and went[-1] == 0          # it held, then let go, on both
    k = KnativeKPA(CFG)
    k.decide(DeploymentMetrics(load(50), ready=4), 50)
    k2 = KnativeKPA(CFG)
    k2.resume(json.loads(json.dumps(k.state())), 10.0, 0, 20.0, 60.0)
    assert k2.decide(DeploymentMetrics([(60.0, 0.0)], ready=4), 60).desired == 4
    r = RayServeDefault(CFG)
    r.decide(DeploymentMetrics([(0.0, 0.0)], ready=4), 0.0)        # a pending scale-down since 0
    r2 = RayServeDefault(CFG)
    r2.resume(json.loads(json.dumps(r.state())), 5.0, 4, 0.0, 10.0)
    assert r2.decide(DeploymentMetrics([(604.0, 0.0)], ready=4), 604.0).desired == 4   # 599 s since
    assert r2.decide(DeploymentMetrics([(606.0, 0.0)], ready=4), 606.0).desired == 0
    for cls in (StartupAware, KnativeKPA, RayServeDefault):
        for junk in ({"hold": "garbage", "panic_until": "x", "since": [1]},
                     {"hold": [["x", 1], [1, None], [True, 2]], "since": ["down", "later"], "latency_floor": "2"}):
            cls(CFG).resume(junk, 0.0, 1, 0.0, 0.0)      # unreadable state is no state, not an error
