"""What the replica manager asks of a provider: start a replica, find it, check it, stop it.

A provider returns a *handle* (a JSON-able dict) for each replica it starts; the control plane
stores it in SQLite, so after its own restart it can find the replicas again (`alive`, `url`)
instead of starting new ones.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any, Protocol

Handle = dict[str, Any]


@dataclass(frozen=True)
class Launch:
    replica_id: str
    deployment: str
    package: str                     # library name or package directory
    serve_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cpu: float = 1.0
    gpu: float = 0.0
    memory_gb: float | None = None
    custom: dict[str, float] = field(default_factory=dict)
    scheduled_at: float = 0.0        # unix time the manager asked for it


class Provider(Protocol):
    name: str

    def start(self, launch: Launch) -> Handle: ...
    def url(self, handle: Handle) -> str | None: ...
    def alive(self, handle: Handle) -> bool: ...
    def stop(self, handle: Handle, grace_s: float) -> None: ...
    def log_tail(self, handle: Handle, lines: int = 20) -> str: ...
    def close(self) -> None: ...


def replica_command(launch: Launch, host: str, port: int) -> list[str]:
    """`python -m headway serve ...` for one replica."""
    return [sys.executable, "-m", "headway", "serve", launch.package, "--host", host, "--port", str(port),
            "--name", launch.deployment, "--replica-id", launch.replica_id, *launch.serve_args]


def replica_env(launch: Launch) -> dict[str, str]:
    """The replica's environment additions: its threads sized from its CPU share (replicas sharing
    a machine must not each use every core), the spec's variables, and when it was scheduled."""
    threads = str(max(1, math.floor(launch.cpu)))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, **launch.env,
            "HEADWAY_SCHEDULED_AT": repr(launch.scheduled_at)}
