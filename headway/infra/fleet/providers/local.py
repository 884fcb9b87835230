"""Replicas as processes on this machine (the embedded default).

Each replica is `headway serve` in its own session, so it outlives a control plane that restarts;
its handle records pid, port and the process's start time, and `alive` checks the pid still runs
*that* process, not one that reused the pid.

A standby process (headway/server/standby.py) that has already imported torch and the server is kept ready
and becomes the next replica, so a cold start does not pay the imports; a deployment whose spec
sets environment variables gets a fresh interpreter instead (some libraries read their variables
only at import).

The standby is the control plane's own process (unlike replicas): it dies with it (see
standby.py), and its pid and start time are kept in LOG_DIR/standby.json, so a control plane
restarted after a crash kills a standby its predecessor left behind (checked to still be that
process, and still a standby, not a replica it became).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from headway.infra.fleet.providers.base import Handle, Launch, replica_command, replica_env

log = logging.getLogger("headway.fleet")
STANDBY_MODULE = "headway.server.standby"


def _stat(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return []


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (with the pid, it names one process)."""
    fields = _stat(pid)
    return int(fields[19]) if len(fields) > 19 else None


def _zombie(pid: int) -> bool:
    fields = _stat(pid)
    return not fields or fields[0] == "Z"


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalProvider:
    name = "local"

    def __init__(self, log_dir: Path, host: str = "127.0.0.1", *, standby: bool = True,
                 standby_delay_s: float = 5.0):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.standby = standby
        # a new standby importing torch takes a core for a second or two: it starts this long after
        # the previous one became a replica, not while that replica loads (measured: 1.3 s vs 0.2 s load)
        self.standby_delay_s = standby_delay_s
        self._procs: dict[int, subprocess.Popen[bytes]] = {}   # the ones this process started (reaped here)
        self._spare: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._closing = threading.Event()
        self._requests: queue.Queue[float | None] = queue.Queue()   # delays before the next standby
        self._spawned = threading.Event()
        self.record = self.log_dir / "standby.json"
        kill_leftover_standby(self.record, self.log_dir / "standby.log")
        if standby:
            # one long-lived thread starts every standby: a parent-death signal fires when the
            # *thread* that forked the child ends, so a short-lived timer thread would kill it
            threading.Thread(target=self._keep, daemon=True, name="headway-standby-keeper").start()
            self._requests.put(0.0)
            self._spawned.wait(30)

    def _keep(self) -> None:
        while True:
            delay = self._requests.get()
            if delay is None or (delay and self._closing.wait(delay)):
                return
            with self._lock:
                if not self._closed and (self._spare is None or self._spare.poll() is not None):
                    self._spare = self._new_spare()
            self._spawned.set()

    def _respawn_later(self) -> None:
        self._requests.put(self.standby_delay_s)

    def _new_spare(self) -> subprocess.Popen[bytes]:
        with open(self.log_dir / "standby.log", "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", STANDBY_MODULE, str(os.getpid())],
                                    stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        _write_json(self.record, {"pid": proc.pid, "started": _start_time(proc.pid)})
        return proc

    def start(self, launch: Launch) -> Handle:
        port = _free_port(self.host)
        log_path = self.log_dir / f"{launch.replica_id}.log"
        cmd = replica_command(launch, self.host, port)
        with self._lock:
            spare = self._spare
            use_spare = spare is not None and spare.poll() is None and not launch.env
            if use_spare:
                self._spare = None
                self.record.unlink(missing_ok=True)    # from now on it is a replica, not a standby
        if use_spare:
            assert spare is not None and spare.stdin is not None
            order = {"argv": cmd[3:], "env": replica_env(launch), "log": str(log_path)}   # cmd[:3]: python -m headway
            spare.stdin.write((json.dumps(order) + "\n").encode())
            spare.stdin.close()
            proc = spare
        else:
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env={**os.environ, **replica_env(launch)}, start_new_session=True)
        if self.standby:
            self._respawn_later()
        self._procs[proc.pid] = proc
        return {"pid": proc.pid, "started": _start_time(proc.pid), "port": port, "host": self.host,
                "log": str(log_path), "replica_id": launch.replica_id, "standby": use_spare}

    def close(self) -> None:
        """Let the standby go (it exits when its stdin closes)."""
        with self._lock:
            self._closed = True
        self._closing.set()
        self._requests.put(None)
        if self._spare is not None and self._spare.stdin is not None:
            self._spare.stdin.close()
            try:
                self._spare.wait(10)
            except subprocess.TimeoutExpired:
                self._spare.kill()
            self._spare = None
        self.record.unlink(missing_ok=True)

    def url(self, handle: Handle) -> str | None:
        return f"http://{handle['host']}:{handle['port']}"

    def alive(self, handle: Handle) -> bool:
        pid = int(handle["pid"])
        proc = self._procs.get(pid)
        if proc is not None:
            return proc.poll() is None
        # adopted after a restart: not our child; the pid must still be the process we started
        return _start_time(pid) == handle.get("started") and not _zombie(pid)

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


def _write_json(path: Path, data: dict[str, object]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def kill_leftover_standby(record: Path, standby_log: Path) -> int | None:
    """Kill the standby a crashed control plane left (named in `record` by pid and start time);
    only if that pid is still that process and still a standby (its output still goes to
    `standby_log`: one that became a replica writes to its own log and is left alone).
    Returns the pid killed, if any."""
    try:
        data = json.loads(record.read_text())
        pid, started = int(data["pid"]), data["started"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    record.unlink(missing_ok=True)
    if _start_time(pid) != started or _zombie(pid):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        out = os.readlink(f"/proc/{pid}/fd/1")
    except OSError:
        return None
    if STANDBY_MODULE.encode() not in cmdline or Path(out) != standby_log.resolve():
        return None
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return None
    log.warning("killed standby process %d left by a control plane that did not stop cleanly", pid)
    return pid
