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
from headway.infra.fleet.providers.local import LocalProvider, _start_time
from headway.infra.fleet.spec import validate_spec
from headway.infra.fleet.store import Store
from tests.conftest import ROOT
from tests.test_fleet import Plane, alive

STANDBY_MODULE = "headway.server.standby"


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


def test_new_autoscaling_settings_keep_the_samples_and_hold_the_last_decision() -> None:
    spec = validate_spec({"name": "d", "package": "p", "replicas": {"min": 0, "max": 4},
                          "autoscaling": {"tick_s": 1.0, "window_s": 10, "panic_window_s": 2, "scale_down_delay_s": 30,
                                          "target_concurrency": 1, "target_utilization": 1.0}})
    seen = {"d": Observed(3, 3, 0, 0, None, None)}
    applied: list[int] = []
    now = [0.0]
    loop = AutoscaleLoop(lambda n: seen[n], lambda n, d, r: applied.append(d), clock=lambda: now[0])
    loop.configure("d", "headway", "k1", spec.autoscale_config(), 1.0, 10.0)
    for _ in range(5):
        loop.step()
        now[0] += 1
    assert applied[-1] == 3
    bigger = spec.model_copy(update={"autoscaling": spec.autoscaling.model_copy(update={"target_concurrency": 3})})
    loop.configure("d", "headway", "k2", bigger.autoscale_config(), 1.0, 10.0)   # now 1 replica would do
    assert len(loop.tracks["d"].samples) == 5
    for _ in range(10):
        loop.step()
        now[0] += 1
    assert set(applied[5:]) == {3}          # not dropped at once because the settings changed


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
    from headway.infra.fleet.providers.local import kill_leftover_standby

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


# ---- the whole thing, for real -----------------------------------------------------------------

class ChatLoad:
    """`workers` clients sending chat requests back to back until stopped. A connection error
    (the control plane is down) is retried, as the OpenAI SDK does; anything else is a loss."""

    def __init__(self, url: str, model: str, workers: int = 2):
        self.url, self.model = url, model
        self.done: list[float] = []                        # when each request completed (200)
        self.retried: list[tuple[float, str]] = []         # connection errors, retried
        self.lost: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        body = {"model": self.model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8,
                "temperature": 0}
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                while True:
                    try:
                        r = client.post(self.url + "/v1/chat/completions", json=body)
                    except httpx.TransportError as exc:
                        self.retried.append((time.monotonic(), type(exc).__name__))
                        time.sleep(0.05)
                        continue
                    if r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None:
                        self.done.append(time.monotonic())
                    else:
                        self.lost.append(f"{r.status_code}: {r.text[:300]}")
                    break

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


def _standby_pids(plane_pid: int, replica_pids: set[int]) -> list[int]:
    import psutil

    kids = psutil.Process(plane_pid).children()
    return [k.pid for k in kids if STANDBY_MODULE in k.cmdline() and k.pid not in replica_pids]


@pytest.mark.slow
def test_sigkilled_control_plane_restarts_without_touching_its_replicas_under_load(tmp_path: Path) -> None:
    """Two replicas carry a steady chat load (min 1: the autoscaler holds 2); the control plane
    is SIGKILLed and restarted on the same state and port. The adopted replicas keep serving
    (same processes), nothing is started or drained because of the restart, every request
    completes (the client retries connection errors, which happen only while no control plane
    listens or to the requests in flight through the killed one), and the old control plane's
    standby is gone within seconds."""
    spec = {"name": "chat", "package": "smollm2-135m-instruct", "replicas": {"min": 1, "max": 2},
            "autoscaling": {"target_concurrency": 1, "target_utilization": 0.5, "window_s": 10,
                            "panic_window_s": 2, "scale_down_delay_s": 30, "tick_s": 0.5},
            "activator": {"timeout_s": 120}}
    first = Plane(tmp_path / "state", tmp_path / "plane1.log")
    second: Plane | None = None
    load: ChatLoad | None = None
    replicas: dict[str, int] = {}
    try:
        first.deploy(spec)
        first.wait(lambda: first.status("chat")["ready"] == 1, timeout=180, what="the first replica")
        load = ChatLoad(first.url, "chat")
        first.wait(lambda: first.status("chat")["ready"] == 2, timeout=180, what="the load to hold two replicas")
        before = first.status("chat")
        replicas = {r["id"]: r["handle"]["pid"] for r in before["replicas"] if r["phase"] == "ready"}
        assert len(replicas) == 2, before
        first.wait(lambda: len(_standby_pids(first.proc.pid, set(replicas.values()))) == 1, timeout=60,
                   what="a standby")
        [standby] = _standby_pids(first.proc.pid, set(replicas.values()))
        time.sleep(3)
        killed_at = time.monotonic()
        first.kill()                                       # SIGKILL: no cleanup at all
        assert _gone(standby, 5.0), "the killed control plane's standby is still running"
        second = Plane(tmp_path / "state", tmp_path / "plane2.log", port=first.port)
        up_at = time.monotonic()
        watched_until = up_at + 10
        while time.monotonic() < watched_until:            # nothing started or drained because of the restart
            st = second.status("chat")
            live = {r["id"]: r["phase"] for r in st["replicas"] if r["phase"] in ("starting", "ready", "draining")}
            assert live == {rid: "ready" for rid in replicas}, (st, second.log())
            assert st["autoscaler"]["desired"] == 2, st["autoscaler"]
            time.sleep(0.5)
        assert all(alive(pid) for pid in replicas.values())
        events = [e["event"] for e in second.status("chat")["events"]]
        assert not [e for e in events if "draining" in e or "starting replica" in e], events
        assert sum(t > up_at for t in load.done) >= 3, "the adopted replicas did not keep serving"
        load.stop()
        assert not load.lost, load.lost
        assert all(killed_at - 0.5 <= t <= up_at + 1 for t, _ in load.retried), (killed_at, up_at, load.retried)
        assert len(_standby_pids(second.proc.pid, set(replicas.values()))) <= 1
    finally:
        if load is not None:
            load.stop()
        first.stop()
        if second is not None:
            second.stop()
        for pid in replicas.values():                      # left by a plane that did not stop them
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
