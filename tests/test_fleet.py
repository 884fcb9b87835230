"""Deployments under the control plane: spec validation, state, the activator, and real
`headway up` processes starting, draining, adopting and replacing real replica processes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from headway.infra.autoscale.controller import AutoscaleLoop, Observed
from headway.infra.fleet.manager import breakdown
from headway.infra.fleet.spec import load_spec, validate_spec
from headway.infra.fleet.store import ReplicaRow, Store
from headway.infra.router.activator import Activator, ActivatorFull, ActivatorTimeout, QueueLimits
from headway.package.load import PackageError
from tests.conftest import ROOT, free_port, write_package

# A replica that starts in about a second (no torch) and streams `n` items `delay` seconds apart.
STREAMER = '''
import os, time

class Model:
    def load(self):
        if os.environ.get("LOAD_FAIL"):
            raise RuntimeError("weights file is corrupt")

    def predict(self, inputs: dict):
        for i in range(int(inputs.get("n", 3))):
            time.sleep(float(inputs.get("delay", 0.01)))
            yield {"i": i, "pid": os.getpid()}
'''


def streamer(tmp_path: Path, concurrency: int = 8) -> Path:
    return write_package(tmp_path / "streamer", f"name: streamer\nruntime_options: {{predict_concurrency: {concurrency}}}\n",
                         STREAMER)


# ---- the spec ----------------------------------------------------------------------------------

def test_spec_reports_every_error_with_field_and_example() -> None:
    with pytest.raises(PackageError) as info:
        validate_spec({"name": "Chat", "package": "x", "replicas": {"min": -1}, "autoscaling": {"polcy": "x"},
                       "router_policy": "fastest"})
    text = str(info.value)
    assert "4 errors in the deployment spec" in text
    assert "name: 'Chat' is not a deployment name" in text
    assert "replicas.min" in text and "example: min: 0" in text
    assert "autoscaling.polcy: unknown field 'polcy'; did you mean 'policy'?" in text
    assert "router_policy: Value error" not in text and "unknown routing policy 'fastest'" in text
    with pytest.raises(PackageError, match=r"replicas.min \(3\) is above replicas.max \(2\)"):
        validate_spec({"name": "chat", "package": "x", "replicas": {"min": 3, "max": 2}})


def test_spec_file_resolves_a_relative_package_against_its_folder(tmp_path: Path) -> None:
    pkg = streamer(tmp_path)
    (tmp_path / "dep.yaml").write_text("name: s\npackage: ./streamer\nreplicas: {min: 0, max: 2}\n")
    spec = load_spec(tmp_path / "dep.yaml")
    assert spec.package == str(pkg.resolve())
    (tmp_path / "lib.yaml").write_text("name: s\npackage: smollm2-135m-instruct\n")
    assert load_spec(tmp_path / "lib.yaml").package == "smollm2-135m-instruct"
    cfg = spec.autoscale_config()
    assert (cfg.min_replicas, cfg.max_replicas) == (0, 2)
    with pytest.raises(PackageError, match="not valid YAML at line 2"):
        (tmp_path / "bad.yaml").write_text("name: [\n")
        load_spec(tmp_path / "bad.yaml")


# ---- state, activator, loop ------------------------------------------------------------------

def test_store_keeps_deployments_generations_and_replicas(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    spec = validate_spec({"name": "a", "package": "p"})
    assert store.put_deployment(spec, bump_generation=False).generation == 1
    assert store.put_deployment(spec, bump_generation=True).generation == 2
    store.set_manual("a", 3)
    r = ReplicaRow("a-1", "a", 2, "local", {"pid": 1}, "http://x", "starting", 100.0)
    store.put_replica(r)
    r.phase, r.ready_at, r.breakdown = "ready", 101.5, {"ready_s": 1.5}
    store.put_replica(r)
    store.close()
    again = Store(tmp_path / "s.db")   # what a restarted control plane reads
    row = again.deployment("a")
    assert row is not None and row.generation == 2 and row.manual == 3 and row.spec == spec
    [back] = again.replicas("a", live_only=True)
    assert (back.phase, back.ready_at, back.breakdown, back.handle) == ("ready", 101.5, {"ready_s": 1.5}, {"pid": 1})
    for i in range(30):
        again.put_replica(ReplicaRow(f"a-old{i}", "a", 1, "local", {}, None, "stopped", float(i)))
    again.prune("a", keep=5)
    assert len(again.replicas("a")) == 6   # 5 ended + the live one


async def test_activator_bounds_times_out_and_wakes_waiters() -> None:
    act = Activator()
    act.manage("d", QueueLimits(size=2, timeout_s=0.3))
    async with act.hold("d") as t1:
        async with act.hold("d"):
            assert act.queued("d") == 2
            with pytest.raises(ActivatorFull, match="already has 2 requests waiting"):
                async with act.hold("d"):
                    pass
        started = time.monotonic()
        waiter = asyncio.ensure_future(t1.wait())
        await asyncio.sleep(0.05)
        act.notify("d")
        await asyncio.wait_for(waiter, 1)
        assert time.monotonic() - started < 0.25
        with pytest.raises(ActivatorTimeout):
            await t1.wait()          # nobody notifies: the rest of the 0.3 s runs out
    assert act.queued("d") == 0


def test_autoscale_loop_samples_each_tick_and_decides_from_zero_at_once() -> None:
    now = [0.0]
    seen: dict[str, Observed] = {"d": Observed(0, 0, 0, 0, None, None)}
    applied: list[tuple[float, int, str]] = []
    loop = AutoscaleLoop(lambda n: seen[n], lambda n, d, r: applied.append((now[0], d, r)), clock=lambda: now[0])
    spec = validate_spec({"name": "d", "package": "p", "replicas": {"min": 0, "max": 5},
                          "autoscaling": {"tick_s": 1.0, "window_s": 10, "panic_window_s": 2}})
    loop.configure("d", "headway", "k", spec.autoscale_config(), 1.0, 10.0)
    for t in (0.0, 0.3, 0.6, 1.0, 1.2):
        now[0] = t
        loop.step()
    assert [a[0] for a in applied] == [0.0, 1.0]          # one decision per tick
    assert all(d == 0 for _, d, _ in applied)
    now[0] = 1.25
    seen["d"] = Observed(1, 0, 0, 1, None, None)           # a request waits, no replica: decide now
    loop.step()
    assert applied[-1][0] == 1.25 and applied[-1][1] >= 1
    track = loop.tracks["d"]
    assert [c for _, c in track.samples] == [0, 0, 1]
    loop.configure("d", "headway", "k", spec.autoscale_config(), 1.0, 10.0)
    assert loop.tracks["d"] is track                      # same settings: the policy keeps its state
    loop.configure("d", "knative-kpa", "k2", spec.autoscale_config(), 1.0, 10.0)
    assert loop.tracks["d"].policy.name == "knative-kpa"


def test_breakdown_is_cumulative_from_scheduling() -> None:
    b = breakdown(1000.0, {"process_s": 0.01}, {"server_started_unix": 1001.2, "fetched_s": 0.5, "loaded_s": 0.9,
                                                "warmed_s": 1.0, "ready_s": 1.0}, 1002.3)
    assert b == {"process_s": 0.01, "started_s": 1.2, "fetched_s": 1.7, "loaded_s": 2.1, "warmed_s": 2.2,
                 "ready_s": 2.3}


# ---- the control plane, for real ------------------------------------------------------------

class Plane:
    """`python -m headway up` as a real process, with its own state directory."""

    def __init__(self, state: Path, log: Path, port: int | None = None, extra: list[str] | None = None,
                 package_roots: list[Path] | None = None):
        roots = [state.parent] if package_roots is None else package_roots   # default: the test's tmp_path
        extra = [*(extra or []), *(a for r in roots for a in ("--package-root", str(r)))]
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state = state
        self._log = open(log, "ab")
        self.log_path = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "headway", "up", "--port", str(self.port), "--state-dir", str(state),
             "--health-interval", "0.2", *(extra or [])], stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            try:
                if httpx.get(self.url + "/health/live", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise TimeoutError(self.log())

    def log(self) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace")
        for f in sorted((self.state / "logs").glob("*.log")):
            text += f"\n--- {f.name}\n" + f.read_text(errors="replace")[-3000:]
        return text

    def api(self, method: str, path: str, body: object = None, status: int = 200) -> dict:
        r = httpx.request(method, f"{self.url}/headway/control{path}", json=body, timeout=30)
        assert r.status_code == status, r.text
        return r.json()

    def deploy(self, spec: dict) -> dict:
        return self.api("POST", "/deployments", spec, status=201)

    def status(self, name: str) -> dict:
        return self.api("GET", f"/deployments/{name}")

    def wait(self, predicate, timeout: float = 60.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}\n{self.log()}")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self, stop_replicas: bool = True) -> None:
        if self.proc.poll() is None:
            try:
                self.api("POST", "/shutdown", {"stop_replicas": stop_replicas}, status=202)
                self.proc.wait(30)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def stream(url: str, name: str, n: int, delay: float, timeout: float = 60) -> list[dict]:
    items = []
    with httpx.stream("POST", f"{url}/v1/models/{name}:predict", json={"n": n, "delay": delay}, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                items.append(json.loads(line[5:]))
    return items


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


@pytest.fixture
def plane(tmp_path: Path):
    p = Plane(tmp_path / "state", tmp_path / "plane.log")
    yield p
    p.stop()


def test_scale_from_zero_queues_then_drains_and_deletes(plane: Plane, tmp_path: Path) -> None:
    pkg = streamer(tmp_path)
    plane.deploy({"name": "s", "package": str(pkg), "replicas": {"min": 0, "max": 2},
                  "autoscaling": {"scale_down_delay_s": 1, "window_s": 4, "panic_window_s": 1},
                  "activator": {"timeout_s": 60}})
    assert plane.status("s")["replicas"] == []
    # three requests at zero replicas: they wait in the activator, none is lost
    results: list[list[dict]] = []
    threads = [threading.Thread(target=lambda: results.append(stream(plane.url, "s", 4, 0.01))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 3 and all([x["i"] for x in r] == [0, 1, 2, 3] for r in results), plane.log()
    st = plane.status("s")
    ready = [r for r in st["replicas"] if r["phase"] == "ready"]
    assert ready, st
    assert ready[0]["handle"]["standby"] is True        # became a replica from the pre-imported standby
    b = ready[0]["breakdown"]
    assert 0 <= b["process_s"] <= b["started_s"] <= b["ready_s"], b
    assert st["measured_startup_s"] is not None
    # a long stream in flight, then scale to zero: the replica drains, the stream completes
    plane.api("POST", "/deployments/s/scale", {"replicas": 1})
    plane.wait(lambda: plane.status("s")["ready"] == 1 and plane.status("s")["starting"] == 0, what="one replica")
    long: list[list[dict]] = []
    t = threading.Thread(target=lambda: long.append(stream(plane.url, "s", 20, 0.1)))
    t.start()
    plane.wait(lambda: plane.status("s")["in_flight"] == 1, what="the stream to start")
    plane.api("POST", "/deployments/s/scale", {"replicas": 0})
    plane.wait(lambda: any(r["phase"] == "draining" for r in plane.status("s")["replicas"]), what="draining")
    # while it drains, it takes no new request: a new one waits (and times out here)
    t.join(30)
    assert long and [x["i"] for x in long[0]] == list(range(20)), plane.log()
    plane.wait(lambda: all(r["phase"] in ("stopped", "failed") for r in plane.status("s")["replicas"]),
               what="every replica stopped")
    assert all(r["phase"] == "stopped" for r in plane.status("s")["replicas"]), plane.status("s")
    pids = {r["handle"]["pid"] for r in plane.status("s")["replicas"]}
    plane.wait(lambda: not any(alive(p) for p in pids), what="replica processes gone")
    plane.api("DELETE", "/deployments/s", status=202)
    plane.wait(lambda: plane.api("GET", "/deployments")["deployments"] == [], what="deletion")
    r = httpx.post(f"{plane.url}/v1/models/s:predict", json={"n": 1}, timeout=10)
    assert r.status_code == 404 and "not served here" in r.text


def test_restart_adopts_running_replicas(tmp_path: Path) -> None:
    pkg = streamer(tmp_path)
    first = Plane(tmp_path / "state", tmp_path / "plane1.log")
    try:
        first.deploy({"name": "s", "package": str(pkg), "replicas": {"min": 1, "max": 1}})
        first.wait(lambda: first.status("s")["ready"] == 1, what="a ready replica")
        [rep] = first.status("s")["replicas"]
        pid = stream(first.url, "s", 1, 0)[0]["pid"]
        assert pid == rep["handle"]["pid"]
        first.kill()              # SIGKILL: no chance to clean up
        assert alive(pid)
        second = Plane(tmp_path / "state", tmp_path / "plane2.log")
        try:
            st = second.status("s")
            assert [r["id"] for r in st["replicas"]] == [rep["id"]], st
            items = stream(second.url, "s", 2, 0)       # served at once by the adopted replica
            assert [x["pid"] for x in items] == [pid, pid]
            time.sleep(1.0)
            st = second.status("s")
            assert len(st["replicas"]) == 1 and st["replicas"][0]["phase"] == "ready", st
        finally:
            second.stop()
        assert not alive(pid)
    finally:
        first._log.close()


def test_failing_replicas_back_off_and_waiting_requests_get_a_clear_503(plane: Plane, tmp_path: Path) -> None:
    pkg = streamer(tmp_path)
    plane.deploy({"name": "bad", "package": str(pkg), "replicas": {"min": 0, "max": 1},
                  "env": {"LOAD_FAIL": "1"}, "activator": {"timeout_s": 4}})
    started = time.monotonic()
    r = httpx.post(f"{plane.url}/v1/models/bad:predict", json={"n": 1}, timeout=30)
    assert r.status_code == 503 and r.headers["retry-after"]
    assert 3.5 < time.monotonic() - started < 15
    msg = r.json()["error"]["message"]
    assert "within" in msg and "activator.timeout_s 4" in msg and "headway status bad" in msg
    st = plane.status("bad")
    failed = [x for x in st["replicas"] if x["phase"] == "failed"]
    assert failed and "weights file is corrupt" in failed[0]["error"], st
    assert failed[0]["handle"]["standby"] is False      # a spec with env gets a fresh interpreter
    assert any("next start in" in e["event"] for e in st["events"]), st["events"]
    assert plane.api("POST", "/deployments/bad/scale", {"replicas": 7}, status=400)["error"]["message"].startswith(
        "replicas must be between 0 and replicas.max (1)")
    bad = plane.api("POST", "/deployments", {"name": "x", "package": "p", "replicas": {"max": 0}}, status=400)
    assert "replicas.max" in bad["error"]["message"]


def test_burst_at_minimum_loses_no_request(plane: Plane, tmp_path: Path) -> None:
    """A 10x burst against one replica that takes 2 at a time: the rest wait in the activator
    while the autoscaler adds replicas; every request completes."""
    pkg = streamer(tmp_path, concurrency=2)
    plane.deploy({"name": "s", "package": str(pkg), "replicas": {"min": 1, "max": 3},
                  "autoscaling": {"target_concurrency": 2, "target_utilization": 1.0, "window_s": 6,
                                  "panic_window_s": 1, "tick_s": 0.2}})
    plane.wait(lambda: plane.status("s")["ready"] == 1, what="the minimum")
    results: list[list[dict]] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            results.append(stream(plane.url, "s", 10, 0.1))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 20, (errors, plane.log())
    assert all([x["i"] for x in r] == list(range(10)) for r in results)
    st = plane.status("s")
    assert len({x["pid"] for r in results for x in r}) >= 2, st   # the burst was spread over new replicas
    grew = [e["event"] for e in st["events"] if e["event"].startswith("autoscaler: 1 -> ")]
    assert grew, st["events"]                                     # the autoscaler, not a retry, added them


def test_committed_spec_schema_is_the_exported_one() -> None:
    """`python -m headway.infra.fleet.export_schema` rewrites it when the spec changes."""
    from headway.infra.fleet.export_schema import SCHEMA_PATH
    from headway.infra.fleet.spec import json_schema

    assert json.loads(SCHEMA_PATH.read_text()) == json.loads(json.dumps(json_schema()))


class RecordingProvider:
    """A provider whose replicas are bookkeeping only: for the manager's ordering rules, which the
    real-process tests above cannot force deterministically (they also run the real provider)."""

    name = "recording"

    def __init__(self) -> None:
        self.started: list[str] = []
        self.stopped: list[str] = []
        self.dead: set[str] = set()

    def start(self, launch):
        self.started.append(launch.replica_id)
        return {"id": launch.replica_id}

    def url(self, handle):
        return f"http://{handle['id']}:1"

    def alive(self, handle):
        return handle["id"] not in self.dead and handle["id"] not in self.stopped

    def stop(self, handle, grace_s):
        self.stopped.append(handle["id"])

    def log_tail(self, handle, lines=20):
        return ""

    def close(self) -> None:
        pass


async def _until(predicate, timeout: float = 10.0) -> bool:
    """Yield to the loop until `predicate()` holds: work the manager runs off the loop (stops) takes
    a thread hop, longer than any fixed sleep on a loaded 2-core machine."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def test_manager_removes_starting_replicas_first_and_replaces_generations(tmp_path: Path) -> None:
    from headway.infra.fleet.manager import ReplicaManager
    from headway.infra.router.proxy import RouterApp
    from headway.infra.router.replicas import ReplicaSet

    provider = RecordingProvider()
    router = RouterApp(ReplicaSet([]))
    m = ReplicaManager(Store(tmp_path / "s.db"), provider, router)
    spec = validate_spec({"name": "d", "package": "p", "replicas": {"min": 0, "max": 3}})
    m.apply(spec)
    m.scale("d", 3)
    m._reconcile(m.deployments["d"])
    assert len(provider.started) == 3 and m.counts("d") == (0, 3)
    first = m.live[provider.started[0]]
    m._became_ready(first, {"ready": True, "model": "d", "max_concurrency": 4})
    assert router.replicas.candidates("d")[0].url == first.url
    m.scale("d", 1)
    m._reconcile(m.deployments["d"])
    assert await _until(lambda: sorted(provider.stopped) == sorted(provider.started[1:]))   # the starting ones went
    assert await _until(lambda: m.counts("d") == (1, 0)), m.counts("d")   # stops run off the loop
    # a spec change that needs new replicas: a new generation starts; the old one serves until it is ready
    m.apply(spec.model_copy(update={"package": "p2"}))
    m._reconcile(m.deployments["d"])
    new_id = provider.started[-1]
    assert m.live[new_id].generation == 2 and first.phase == "ready"
    m._became_ready(m.live[new_id], {"ready": True, "model": "d"})
    m._reconcile(m.deployments["d"])
    assert first.phase == "draining" and router.replicas.find(first.url).draining
    routed = router.replicas.find(first.url)
    router.replicas.acquire(routed.url)            # a request still on the draining replica
    await m._watch(None, first)                    # draining with a request in flight: stays
    assert first.phase == "draining" and first.id not in provider.stopped
    router.replicas.release(routed, ok=True)
    await m._watch(None, first)
    assert await _until(lambda: first.id in provider.stopped and first.phase == "stopped")
    m.check()
    # a replica that dies is replaced
    provider.dead.add(new_id)
    await m._watch(None, m.live[new_id])
    assert await _until(lambda: new_id not in m.live)
    m.deployments["d"].next_start_at = 0
    m._reconcile(m.deployments["d"])
    assert provider.started[-1] != new_id and m.counts("d") == (0, 1)


def test_router_first_byte_p95_over_a_window() -> None:
    from headway.infra.router.proxy import RouterApp
    from headway.infra.router.replicas import ReplicaSet

    app = RouterApp(ReplicaSet([]))
    assert app.first_byte_p95("d", 60) is None
    now = time.monotonic()
    app.first_byte["d"] = __import__("collections").deque([(now - 120, 9.0)] + [(now, i / 100) for i in range(100)])
    assert app.first_byte_p95("d", 60) == 0.95       # the old 9 s sample is outside the window

