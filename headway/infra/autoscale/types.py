"""What an autoscaling policy sees and decides (DESIGN.md: policies are pure).

The control loop (and the simulator) collects, per deployment, samples of concurrency — requests
in flight on replicas plus requests held by the activator queue — and the replica counts by
phase, and hands them to a policy with the time. The policy returns the total number of
replicas the deployment should have (starting ones included); the loop starts or drains the
difference. A policy may keep state derived from what it was given (recent recommendations,
windows); it reads no clock and does no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class AutoscaleConfig:
    """A deployment's scaling settings (the deployment spec's `autoscaling` block)."""

    min_replicas: int = 0
    max_replicas: int = 10
    target_concurrency: float = 8.0     # requests in flight per replica the deployment is sized for
    target_utilization: float = 0.7     # fraction of target_concurrency to plan for (headroom for bursts)
    window_s: float = 60.0              # the stable window
    panic_window_s: float = 6.0         # the short window that reacts to bursts
    panic_threshold: float = 2.0        # panic when the short window wants this many times the ready capacity
    scale_down_delay_s: float = 30.0    # a lower recommendation must hold this long before replicas go
    startup_s: float = 10.0             # startup time assumed until one is measured
    latency_objective_s: float | None = None  # e.g. p95 TTFT; above it the deployment grows

    def __post_init__(self) -> None:
        errors = []
        if self.min_replicas < 0 or self.max_replicas < 1 or self.min_replicas > self.max_replicas:
            errors.append(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got "
                          f"min {self.min_replicas}, max {self.max_replicas}")
        if self.target_concurrency <= 0 or not 0 < self.target_utilization <= 1:
            errors.append("target_concurrency must be > 0 and target_utilization in (0, 1]")
        if not 0 < self.panic_window_s <= self.window_s:
            errors.append("need 0 < panic_window_s <= window_s")
        if self.panic_threshold <= 1 or self.scale_down_delay_s < 0 or self.startup_s < 0:
            errors.append("panic_threshold must be > 1, scale_down_delay_s and startup_s >= 0")
        if self.latency_objective_s is not None and self.latency_objective_s <= 0:
            errors.append("latency_objective_s must be > 0")
        if errors:
            raise ValueError("invalid autoscaling config: " + "; ".join(errors))

    @property
    def per_replica(self) -> float:
        """Concurrency one replica is planned to carry."""
        return self.target_concurrency * self.target_utilization


@dataclass(frozen=True)
class DeploymentMetrics:
    """One deployment's state as the control loop last collected it."""

    samples: Sequence[tuple[float, float]]  # (time, concurrency) oldest first, at least the last window
    ready: int = 0                          # replicas serving
    starting: int = 0                       # replicas asked for and not ready yet
    queued: int = 0                         # requests waiting in the activator (no replica could take them)
    startup_s: float | None = None          # measured startup time (scheduled -> ready), if any
    latency_p95_s: float | None = None      # the latency the objective speaks of, over the last window


@dataclass(frozen=True)
class ScaleDecision:
    desired: int      # total replicas wanted (ready + starting), within [min, max]
    reason: str       # "stable", "panic", "forecast", "latency", "from-zero", "hold", "bounds", "resumed"
    panic: bool = False


class AutoscalePolicy(Protocol):
    name: str

    def decide(self, m: DeploymentMetrics, now: float) -> ScaleDecision: ...


class ResumablePolicy(AutoscalePolicy, Protocol):
    """A policy the control loop can save and restore across a control-plane restart (still pure:
    the state and the time come in as arguments)."""

    def state(self) -> dict[str, Any]:
        """What it carries between decisions, JSON-able; times on the clock `decide` was given."""
        ...

    def resume(self, state: Mapping[str, Any], shift: float, adopted: int, covered_s: float, now: float) -> None:
        """Continue from a `state()`, whose times move by `shift` onto the current clock; hold
        `adopted` replicas (the count found running) until the history says otherwise;
        `covered_s`: how much of the stable window the restored samples cover."""
        ...


def window_mean(samples: Sequence[tuple[float, float]], now: float, window_s: float) -> float:
    """Mean concurrency over (now - window_s, now]; 0 when no sample falls in it."""
    values = [c for t, c in samples if now - window_s < t <= now]
    return sum(values) / len(values) if values else 0.0
