"""A control plane killed (SIGKILL) and restarted on the same state: its autoscalers resume
instead of deciding from no history, its standby process does not outlive it, and the replicas
it adopted keep serving with nothing started or drained because of the restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest

from headway.infra.autoscale.controller import AutoscaleLoop, Observed
from headway.infra.fleet.providers.local import STANDBY_MODULE, LocalProvider, _start_time, kill_leftover_standby
from headway.infra.fleet.spec import validate_spec
from headway.infra.fleet.store import Store
from tests.conftest import ROOT
from tests.test_fleet import Plane, alive


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


# ---- the autoscaler loop resumes from the store ------------------------------------------------

def test_autoscale_loop_saves_each_decision_and_resumes_on_a_new_clock(tmp_path: Path) -> None:
    spec = validate_spec({"name": "d", "package": "p", "replicas": {"min": 0, "max": 4},
                          "autoscaling": {"tick_s": 1.0, "window_s": 10, "panic_window_s": 2, "scale_down_delay_s": 30,
                                          "target_concurrency": 1, "target_utilization": 1.0}})
    seen = {"d": Observed(3, 3, 0, 0, None, None)}
    applied: list[tuple[int, str]] = []
    now, wall = [100.0], [5000.0]
    store = Store(tmp_path / "s.db")
    loop = AutoscaleLoop(lambda n: seen[n], lambda n, d, r: applied.append((d, r)), clock=lambda: now[0],
                         wall=lambda: wall[0], memory=store)
    loop.configure("d", "headway", "k", spec.autoscale_config(), 1.0, 10.0)
    for _ in range(12):
        loop.step()
        now[0] += 1
        wall[0] += 1
    assert applied[-1][0] == 3
    store.close()
    # killed; a new process (monotonic clock elsewhere) starts 5 s later and adopts the 3 replicas
    store = Store(tmp_path / "s.db")
    saved = store.autoscaler_state("d")
    assert saved is not None and saved["desired"] == 3 and len(saved["samples"]) >= 10
    now2, wall2 = [7.0], [wall[0] + 5]
    applied.clear()
    seen["d"] = Observed(0, 3, 0, 0, None, None)          # the clients are still reconnecting
    again = AutoscaleLoop(lambda n: seen[n], lambda n, d, r: applied.append((d, r)), clock=lambda: now2[0],
                          wall=lambda: wall2[0], memory=store)
    again.configure("d", "headway", "k", spec.autoscale_config(), 1.0, 10.0)
    resumed = again.resume("d", 3)
    assert resumed is not None and resumed.desired == 3
    restored = list(again.tracks["d"].samples)
    assert restored and all(7.0 - 11.0 <= t <= 7.0 for t, _ in restored) and restored[-1][0] == pytest.approx(1.0)   # 6 s before, as on the wall clock
    for _ in range(29):                                   # 29 s of nothing: the delay has not passed
        again.step()
        now2[0] += 1
        wall2[0] += 1
    assert {d for d, _ in applied} == {3}, applied
    for _ in range(3):
        again.step()
        now2[0] += 1
    assert applied[-1][0] == 0                            # a whole scale-down delay without load: now it goes
    store.drop_deployment("d")
    assert store.autoscaler_state("d") is None


# ---- the standby dies with its control plane ---------------------------------------------------

HOLDER = textwrap.dedent('''
    import subprocess, sys, time
    from pathlib import Path
    from headway.infra.fleet.providers.local import LocalProvider

    p = LocalProvider(Path(sys.argv[1]), standby_delay_s=0.1)
    spare = p._spare
    # something else (a tool this process forked) holds the standby's stdin open: EOF never comes
    leak = subprocess.Popen(["sleep", "60"], pass_fds=(spare.stdin.fileno(),))
    print(spare.pid, leak.pid, flush=True)
    time.sleep(120)
''')


def test_standby_dies_with_its_control_plane_even_when_its_stdin_stays_open(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "logs")], stdout=subprocess.PIPE,
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert holder.stdout is not None
    spare, leak = (int(x) for x in holder.stdout.readline().split())
    try:
        time.sleep(0.5)
        assert alive(spare)
        holder.kill()                 # SIGKILL: no close(), no cleanup
        holder.wait()
        assert _gone(spare, 5.0), "the standby outlived the control plane that started it"
    finally:
        for pid in (spare, leak):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def _standby_like(log: Path, out_name: str) -> subprocess.Popen[bytes]:
    """A process that looks like a standby (its command line) with its output in `out_name`; a
    child of the test, which stays alive, so it does not die by itself."""
    with open(log.parent / out_name, "ab") as out:
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", STANDBY_MODULE],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def test_restarted_provider_kills_the_standby_its_predecessor_left_but_never_a_replica(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    record = logs / "standby.json"
    leftover = _standby_like(logs / "standby.log", "standby.log")
    replica = _standby_like(logs / "standby.log", "r-1.log")     # a standby that became a replica
    try:
        time.sleep(0.2)
        record.write_text(f'{{"pid": {replica.pid}, "started": {_start_time(replica.pid)}}}')
        assert kill_leftover_standby(record, logs / "standby.log") is None and replica.poll() is None
        record.write_text(f'{{"pid": {leftover.pid}, "started": {_start_time(leftover.pid)} }}')
        stale = (logs / "other.json")
        stale.write_text(f'{{"pid": {leftover.pid}, "started": 12345}}')   # the pid, reused by another process
        assert kill_leftover_standby(stale, logs / "standby.log") is None and leftover.poll() is None
        provider = LocalProvider(logs, standby=False)      # what `headway up` does when it restarts
        assert leftover.wait(5) == -signal.SIGKILL
        assert replica.poll() is None and not record.exists()
        provider.close()
    finally:
        for proc in (leftover, replica):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
