"""Replicas on a Ray cluster: each one a detached Ray actor that runs `headway serve` on its node.

Ray places the actor on a node with the resources the deployment asks for (CPUs, GPUs, memory,
custom resources such as a region label) and the router reaches the replica over HTTP at the
node's address. The actor is detached and named after the replica, so a restarted control plane
finds it again. The replica process dies with its actor (parent-death signal), so a node that
dies takes its replicas with it; the manager sees the actor gone and starts a replacement, which
Ray places on a node still alive. Ray's own actor restarts are off: a replacement is the manager's
decision (it may not be wanted any more).

Actor calls are remote, so nothing here blocks the control plane's loop: a background thread
polls every actor (url, liveness) and `url()` / `alive()` read what it last saw.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from headway.infra.fleet.providers.base import Handle, Launch, replica_command, replica_env

log = logging.getLogger("headway.fleet.ray")
NAMESPACE = "headway"


class _ReplicaHost:
    """Runs on the replica's node, inside its Ray actor."""

    def __init__(self, launch: Launch, log_dir: str) -> None:
        import ctypes
        import os
        import signal
        import socket
        import subprocess
        import sys

        import ray

        self.ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((self.ip, 0))
            self.port = int(s.getsockname()[1])
        libc = ctypes.CDLL(None, use_errno=True)

        def die_with_actor() -> None:
            libc.prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG: the replica dies when its actor does
            os.setsid()

        self.log = Path(log_dir) / f"{launch.replica_id}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        cmd = replica_command(launch, self.ip, self.port)
        cmd[0] = sys.executable
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **replica_env(launch)}, preexec_fn=die_with_actor)

    def info(self) -> dict[str, Any]:
        return {"url": f"http://{self.ip}:{self.port}", "alive": self.proc.poll() is None, "pid": self.proc.pid}

    def stop(self, grace_s: float) -> None:
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, lines: int) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class RayProvider:
    name = "ray"

    def __init__(self, address: str, log_dir: Path, *, poll_s: float = 0.25):
        import ray

        self._ray = ray
        if not ray.is_initialized():
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, ignore_reinit_error=True)
        self._actor_cls = ray.remote(_ReplicaHost)
        self.log_dir = Path(log_dir)
        self.poll_s = poll_s
        self._seen: dict[str, dict[str, Any]] = {}       # actor name -> last info (or {"alive": False, ...})
        self._actors: dict[str, Any] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._poll_forever, name="headway-ray-poll", daemon=True).start()

    def start(self, launch: Launch) -> Handle:
        opts: dict[str, Any] = {"name": launch.replica_id, "namespace": NAMESPACE, "lifetime": "detached",
                                "max_restarts": 0, "num_cpus": launch.cpu, "num_gpus": launch.gpu}
        if launch.memory_gb:
            opts["memory"] = int(launch.memory_gb * 2**30)
        if launch.custom:
            opts["resources"] = dict(launch.custom)
        actor = self._actor_cls.options(**opts).remote(launch, str(self.log_dir.resolve()))
        with self._lock:
            self._actors[launch.replica_id] = actor
            self._seen[launch.replica_id] = {"alive": True, "url": None, "pending": True, "since": time.monotonic()}
        return {"actor": launch.replica_id, "namespace": NAMESPACE}

    def _actor(self, name: str) -> Any:
        with self._lock:
            actor = self._actors.get(name)
        if actor is None:                     # after a control plane restart: find the detached actor
            try:
                actor = self._ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:
                return None
            with self._lock:
                self._actors[name] = actor
                self._seen.setdefault(name, {"alive": True, "url": None, "pending": True, "since": time.monotonic()})
        return actor

    def url(self, handle: Handle) -> str | None:
        self._actor(handle["actor"])
        with self._lock:
            return self._seen.get(handle["actor"], {}).get("url")

    def alive(self, handle: Handle) -> bool:
        if self._actor(handle["actor"]) is None:
            return False
        with self._lock:
            return bool(self._seen.get(handle["actor"], {}).get("alive", False))

    def stop(self, handle: Handle, grace_s: float) -> None:
        actor = self._actor(handle["actor"])
        if actor is None:
            return
        try:
            self._ray.get(actor.stop.remote(grace_s), timeout=grace_s + 10)
        except Exception as exc:  # noqa: BLE001 - a dead actor or node: nothing left to stop
            log.info("stopping %s: %s", handle["actor"], exc)
        try:
            self._ray.kill(actor)
        except Exception:  # noqa: BLE001 - already gone
            pass
        with self._lock:
            self._actors.pop(handle["actor"], None)
            self._seen[handle["actor"]] = {"alive": False, "url": None}

    def log_tail(self, handle: Handle, lines: int = 20) -> str:
        path = self.log_dir / f"{handle['actor']}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return f"(the replica's log is on its node, {path})"

    def close(self) -> None:
        """Replicas are detached actors: they stay for the next control plane to adopt."""

    def _poll_forever(self) -> None:
        outstanding: dict[str, Any] = {}     # actor name -> its info() call not answered yet
        while True:
            with self._lock:
                actors = dict(self._actors)
            for name in list(outstanding):
                if name not in actors:
                    del outstanding[name]
            for name, actor in actors.items():
                if name not in outstanding:
                    outstanding[name] = actor.info.remote()
            by_ref = {ref: name for name, ref in outstanding.items()}
            done, _ = self._ray.wait(list(by_ref), num_returns=len(by_ref), timeout=1.0) if by_ref else ([], [])
            for ref in done:     # the rest: not placed yet (waiting for resources) or still starting
                name = by_ref[ref]
                del outstanding[name]
                try:
                    info = self._ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - the actor died (its node, or its process)
                    info = {"alive": False, "url": None, "error": f"{type(exc).__name__}: {exc}"}
                with self._lock:
                    if name in self._actors:
                        self._seen[name] = info
            time.sleep(self.poll_s)
