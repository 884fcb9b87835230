"""Autoscaling policies: Headway's startup-aware policy and two baselines, all pure.

`StartupAware` (Headway's):
- follows the trend line of concurrency (least squares) rather than its lagging window mean:
  on a ramp up it sizes for the line's value one measured startup ahead, so capacity is asked
  for when it will be needed, not when the load has already arrived. A rise counts from its
  onset: the line over the last two startups is used when its slope is significant (t > 2)
  and adds at least a fifth of the load within a startup; else the stable window's line when
  its slope is significant; else the stable-window mean. A rise that adds less than a replica
  within a startup is noise to it (no forecast), and so is any trend in less than half a
  stable window of history;
- on a ramp down (the stable window's line falls significantly and fits it, R^2 >= 0.8: a
  ramp, not a step) it sizes for the line's value now and lets replicas go without the
  scale-down delay (except to zero); after a step down the delay holds as usual;
- panics like Knative when the short window wants `panic_threshold` times the ready capacity
  (a burst: it sizes for the short window without extrapolating the step, and never scales
  down until the panic ends);
- counts replicas already starting as capacity (its answer is a total), so repeated decisions
  during a startup do not keep adding replicas for load those will absorb;
- scales from zero at once when a request waits and to zero after `scale_down_delay_s`
  without traffic; any lower recommendation must hold for `scale_down_delay_s`;
- with a latency objective, grows by one replica per decision while the latency is above it.

Every policy can hand out its state (`state()`, JSON-able) and take it back (`resume()`), so a
control plane that restarts continues where it stopped instead of deciding from no history. A
resumed policy also holds the replica count the control plane adopted until it has evidence to
go lower: for `scale_down_delay_s`, and at least until the restored and new samples together
cover a stable window (a restart is no evidence of lower load).

`KnativeKPA`: Knative's KPA (stable and panic windows, no forecast). `RayServeDefault`: Ray
Serve's default autoscaler (ongoing requests over a look-back window against a target, with
upscale and downscale delays). They share the config's targets so comparisons are like for like.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from headway.infra.autoscale.types import AutoscaleConfig, DeploymentMetrics, ResumablePolicy, ScaleDecision, window_mean


def line(samples: Sequence[tuple[float, float]], now: float, window_s: float) -> tuple[float, float, float, float]:
    """The least-squares line through the samples in the window: (its value at `now`, slope per
    second, t statistic of the slope, R^2). Flat or too few samples: slope, t and R^2 are 0."""
    pts = [(t, c) for t, c in samples if now - window_s < t <= now]
    if len(pts) < 3:
        return (pts[-1][1] if pts else 0.0), 0.0, 0.0, 0.0
    n = len(pts)
    mt = sum(t for t, _ in pts) / n
    mc = sum(c for _, c in pts) / n
    var = sum((t - mt) ** 2 for t, _ in pts)
    total = sum((c - mc) ** 2 for _, c in pts)
    if var == 0 or total == 0:
        return mc, 0.0, 0.0, 0.0
    slope = sum((t - mt) * (c - mc) for t, c in pts) / var
    residual = max(0.0, total - slope * slope * var)
    se = math.sqrt(residual / (n - 2) / var)
    tstat = slope / se if se > 0 else math.copysign(math.inf, slope)
    return mc + slope * (now - mt), slope, tstat, 1.0 - residual / total


def trend(samples: Sequence[tuple[float, float]], now: float, window_s: float) -> float:
    """Least-squares slope (concurrency per second) of the samples in the window; 0 if flat or too few."""
    return line(samples, now, window_s)[1]


class _Hold:
    """Recommendations of the last `delay_s`; the decision is their maximum (delayed scale-down)."""

    def __init__(self, delay_s: float):
        self.delay_s = delay_s
        self._recs: deque[tuple[float, int]] = deque()

    def push(self, now: float, rec: int) -> int:
        self._recs.append((now, rec))
        while self._recs and self._recs[0][0] < now - self.delay_s:
            self._recs.popleft()
        return max(r for _, r in self._recs)

    def state(self) -> list[list[float]]:
        return [[t, r] for t, r in self._recs]

    def resume(self, recs: object, shift: float) -> None:
        self._recs = deque((t + shift, int(r)) for t, r in _pairs(recs))


class _Floor:
    """After a resume: the adopted count, held until `until` (a restart is no evidence of lower load)."""

    def __init__(self) -> None:
        self.until = -math.inf
        self.count = 0

    def resume(self, cfg: AutoscaleConfig, adopted: int, covered_s: float, now: float) -> None:
        self.until = now + max(cfg.scale_down_delay_s, cfg.window_s - max(0.0, covered_s))
        self.count = adopted

    def apply(self, now: float, held: int) -> int:
        return max(held, self.count) if now < self.until else held


def _pairs(value: object) -> list[tuple[float, float]]:
    """[[t, x], ...] of numbers from saved state; anything else is no state."""
    if not isinstance(value, list):
        return []
    return [(p[0], p[1]) for p in value if isinstance(p, (list, tuple)) and len(p) == 2
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in p)]


def _time(value: object, shift: float) -> float:
    """A saved time (None: never) moved onto the new clock."""
    return float(value) + shift if isinstance(value, (int, float)) else -math.inf


def _saved_time(t: float) -> float | None:
    return t if math.isfinite(t) else None


def _clamp(cfg: AutoscaleConfig, n: int) -> int:
    return max(cfg.min_replicas, min(cfg.max_replicas, n))


class StartupAware:
    name = "headway"
    SIGNIFICANT = 2.0     # |t| of a trend's slope above this is a trend, not noise
    ONSET_GAIN = 0.2      # the onset line is used when it adds at least this fraction within a startup
    RAMP_FIT = 0.8        # R^2 above which a fall is a ramp (a step fits a line at most 0.75)

    def __init__(self, config: AutoscaleConfig):
        self.cfg = config
        self._hold = _Hold(config.scale_down_delay_s)
        self._panic_until = -math.inf
        self._latency_floor = 0
        self._floor = _Floor()

    def state(self) -> dict[str, Any]:
        return {"hold": self._hold.state(), "panic_until": _saved_time(self._panic_until),
                "latency_floor": self._latency_floor}

    def resume(self, state: Mapping[str, Any], shift: float, adopted: int, covered_s: float, now: float) -> None:
        """Continue from `state()` (its times move by `shift` onto this clock), holding `adopted`."""
        self._hold.resume(state.get("hold"), shift)
        self._panic_until = _time(state.get("panic_until"), shift)
        floor = state.get("latency_floor")
        self._latency_floor = floor if isinstance(floor, int) else 0
        self._floor.resume(self.cfg, adopted, covered_s, now)

    def decide(self, m: DeploymentMetrics, now: float) -> ScaleDecision:
        cfg = self.cfg
        total = m.ready + m.starting
        startup = cfg.startup_s if m.startup_s is None else m.startup_s
        stable = window_mean(m.samples, now, cfg.window_s)
        short = window_mean(m.samples, now, cfg.panic_window_s)
        level, slope, tstat, fit = line(m.samples, now, cfg.window_s)
        onset = line(m.samples, now, min(cfg.window_s, max(cfg.panic_window_s, 2 * startup)))
        if onset[2] > self.SIGNIFICANT and onset[1] * startup >= max(self.ONSET_GAIN * onset[0], cfg.per_replica):
            level, slope, tstat, fit = onset
        if not m.samples or now - m.samples[0][0] < cfg.window_s / 2:
            tstat = 0.0  # too little history for a trend (a deployment just started): the mean
        ramp_down = tstat < -self.SIGNIFICANT and fit >= self.RAMP_FIT
        if tstat > self.SIGNIFICANT and slope * startup >= cfg.per_replica:  # a ramp up worth a replica
            # followed one startup ahead (at most 2x now, plus one)
            forecast = min(level + slope * startup, 2 * short + cfg.per_replica)
        elif ramp_down:
            forecast = stable = max(level, short)
        else:
            forecast = stable
        want_stable = math.ceil(stable / cfg.per_replica)
        want_short = math.ceil(short / cfg.per_replica)
        if want_short >= cfg.panic_threshold * max(m.ready, 1) and want_short > total:
            self._panic_until = now + cfg.window_s
        panic = now < self._panic_until
        if panic:  # a burst (a step, not a ramp): size for what is here, never extrapolate a step
            rec, reason = max(want_stable, want_short, total), "panic"
        else:
            want_forecast = math.ceil(forecast / cfg.per_replica)
            rec, reason = (want_forecast, "forecast") if want_forecast > want_stable else (want_stable, "stable")
        if cfg.latency_objective_s is not None and m.latency_p95_s is not None and m.ready > 0:
            if m.latency_p95_s > cfg.latency_objective_s:
                self._latency_floor = max(self._latency_floor, total + 1)
            elif stable < cfg.per_replica * max(self._latency_floor - 1, 0):
                self._latency_floor = 0  # the load that needed it is gone
            if self._latency_floor > rec:
                rec, reason = self._latency_floor, "latency"
        if (m.queued > 0 or short > 0) and rec < 1:
            rec, reason = 1, "from-zero" if total == 0 else reason
        held = self._hold.push(now, rec)
        if ramp_down and not panic and rec > 0:
            held = rec  # the line says where the load is going: no delay on a ramp down (to zero: the delay)
        if panic:
            held = max(held, total)
        if self._floor.apply(now, held) > held:
            held, reason = self._floor.apply(now, held), "resumed"
        desired = _clamp(cfg, held)
        if desired != held:
            reason = "bounds"
        elif held > rec and reason != "resumed":
            reason = "hold"
        return ScaleDecision(desired, reason, panic)


class KnativeKPA:
    """Knative's KPA: stable-window average over target (x utilization); a panic window that
    takes over, without scaling down, when it wants `panic_threshold` times the ready pods."""

    name = "knative-kpa"

    def __init__(self, config: AutoscaleConfig):
        self.cfg = config
        self._panic_until = -math.inf
        self._hold = _Hold(config.scale_down_delay_s)
        self._floor = _Floor()

    def state(self) -> dict[str, Any]:
        return {"hold": self._hold.state(), "panic_until": _saved_time(self._panic_until)}

    def resume(self, state: Mapping[str, Any], shift: float, adopted: int, covered_s: float, now: float) -> None:
        self._hold.resume(state.get("hold"), shift)
        self._panic_until = _time(state.get("panic_until"), shift)
        self._floor.resume(self.cfg, adopted, covered_s, now)

    def decide(self, m: DeploymentMetrics, now: float) -> ScaleDecision:
        cfg = self.cfg
        total = m.ready + m.starting
        want_stable = math.ceil(window_mean(m.samples, now, cfg.window_s) / cfg.per_replica)
        want_panic = math.ceil(window_mean(m.samples, now, cfg.panic_window_s) / cfg.per_replica)
        if m.ready and want_panic / m.ready >= cfg.panic_threshold:
            self._panic_until = now + cfg.window_s
        panic = now < self._panic_until
        rec = max(want_panic, total) if panic else want_stable
        if m.queued > 0 and rec < 1:
            rec = 1  # the activator asks for a pod at once
        held = self._hold.push(now, rec)
        floored = self._floor.apply(now, held)
        desired = _clamp(cfg, floored)
        return ScaleDecision(desired, "resumed" if floored > held else "panic" if panic else "stable", panic)


class RayServeDefault:
    """Ray Serve's default: average ongoing requests over `look_back_s` divided by the target
    per replica; a change only after it has been recommended for the whole upscale (30 s) or
    downscale (600 s) delay. From zero it scales at once when a request waits."""

    name = "ray-serve"

    def __init__(self, config: AutoscaleConfig, *, look_back_s: float = 30.0, upscale_delay_s: float = 30.0,
                 downscale_delay_s: float = 600.0):
        self.cfg = config
        self.look_back_s = look_back_s
        self.up_delay = upscale_delay_s
        self.down_delay = downscale_delay_s
        self._since: tuple[str, float] | None = None  # direction of the pending change, since when

    def state(self) -> dict[str, Any]:
        return {"since": list(self._since) if self._since else None}

    def resume(self, state: Mapping[str, Any], shift: float, adopted: int, covered_s: float, now: float) -> None:
        """Its own delays already hold a count it sees: only the pending change needs restoring."""
        since = state.get("since")
        ok = (isinstance(since, list) and len(since) == 2 and since[0] in ("up", "down")
              and isinstance(since[1], (int, float)))
        self._since = (str(since[0]), float(since[1]) + shift) if ok else None  # type: ignore[index]

    def decide(self, m: DeploymentMetrics, now: float) -> ScaleDecision:
        cfg = self.cfg
        current = m.ready + m.starting
        want = _clamp(cfg, math.ceil(window_mean(m.samples, now, self.look_back_s) / cfg.target_concurrency))
        if current == 0 and m.queued > 0:
            self._since = None
            return ScaleDecision(max(1, want), "from-zero")
        direction = "up" if want > current else "down" if want < current else None
        if direction is None:
            self._since = None
            return ScaleDecision(current, "stable")
        if self._since is None or self._since[0] != direction:
            self._since = (direction, now)
        delay = self.up_delay if direction == "up" else self.down_delay
        if now - self._since[1] >= delay:
            self._since = None
            return ScaleDecision(want, direction)
        return ScaleDecision(_clamp(cfg, current), "hold")


POLICIES: dict[str, Callable[[AutoscaleConfig], ResumablePolicy]] = {"headway": StartupAware, "knative-kpa": KnativeKPA, "ray-serve": RayServeDefault}
