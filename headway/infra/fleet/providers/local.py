"""Replicas as processes on this machine (the embedded default).

Each replica is `python -m headway serve` in its own session, so it outlives a control plane that
restarts; its handle records pid, port and the replica id, and `alive` checks the pid still runs
*that* replica (its command line carries the id), not a process that reused the pid.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from headway.infra.fleet.providers.base import Handle, Launch, replica_command, replica_env


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalProvider:
    name = "local"

    def __init__(self, log_dir: Path, host: str = "127.0.0.1"):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self._procs: dict[int, subprocess.Popen[bytes]] = {}   # the ones this process started (reaped here)

    def start(self, launch: Launch) -> Handle:
        port = _free_port(self.host)
        log_path = self.log_dir / f"{launch.replica_id}.log"
        env = {**os.environ, **replica_env(launch)}
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(replica_command(launch, self.host, port), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self._procs[proc.pid] = proc
        return {"pid": proc.pid, "port": port, "host": self.host, "log": str(log_path), "replica_id": launch.replica_id}

    def url(self, handle: Handle) -> str | None:
        return f"http://{handle['host']}:{handle['port']}"

    def alive(self, handle: Handle) -> bool:
        pid = int(handle["pid"])
        proc = self._procs.get(pid)
        if proc is not None:
            return proc.poll() is None
        try:   # adopted after a restart: not our child; check the pid runs this replica
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return handle["replica_id"].encode() in cmdline and stat.rsplit(")", 1)[-1].split()[0] != "Z"

    def stop(self, handle: Handle, grace_s: float) -> None:
        """SIGTERM, then SIGKILL after `grace_s` (the replica finishes what it has on SIGTERM)."""
        pid = int(handle["pid"])
        if not self.alive(handle):
            self._reap(pid)
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and self.alive(handle):
            time.sleep(0.05)
        if self.alive(handle):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._reap(pid)

    def _reap(self, pid: int) -> None:
        proc = self._procs.pop(pid, None)
        if proc is not None:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass

    def log_tail(self, handle: Handle, lines: int = 20) -> str:
        try:
            text = Path(handle["log"]).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])
