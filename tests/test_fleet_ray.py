"""The Ray provider on a real multi-node `ray.cluster_utils.Cluster`: replicas placed on nodes by
their resources, a node killed under load, its replica replaced on a node still alive, and no
request lost that had not received its first byte."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.test_fleet import Plane, streamer

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

pytestmark = pytest.mark.slow


def ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[1])


def node_of(cluster: Cluster, pid: int):
    """The cluster node whose raylet is an ancestor of this process."""
    raylets = {n.all_processes["raylet"][0].process.pid: n for n in cluster.worker_nodes}
    while pid > 1:
        if pid in raylets:
            return raylets[pid]
        pid = ppid(pid)
    raise AssertionError("process is not under any worker node's raylet")


@dataclass
class Outcome:
    first_byte: bool = False
    items: int = 0
    ok: bool = False
    error: str = ""


def one_request(url: str, n: int, delay: float) -> Outcome:
    out = Outcome()
    try:
        with httpx.stream("POST", f"{url}/v1/models/s:predict", json={"n": n, "delay": delay}, timeout=60) as r:
            if r.status_code != 200:
                out.error = f"{r.status_code}: {r.read()[:200]!r}"
                return out
            event = None
            for line in r.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    out.first_byte = True
                    if event == "error":
                        out.error = line
                        return out
                    if line[5:].strip() != "[DONE]":
                        json.loads(line[5:])
                        out.items += 1
        out.ok = out.items == n
        if not out.ok:
            out.error = f"stream ended after {out.items} of {n} items"
    except httpx.HTTPError as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    return out


def test_node_killed_under_load_loses_no_request_before_first_byte(tmp_path: Path) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3}})
    plane = None
    try:
        for _ in range(3):
            cluster.add_node(num_cpus=1, resources={"zone-a": 1}, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        plane = Plane(tmp_path / "state", tmp_path / "plane.log", extra=["--ray", cluster.address])
        pkg = streamer(tmp_path)
        plane.deploy({"name": "s", "package": str(pkg), "replicas": {"min": 2, "max": 2},
                      "resources": {"cpu": 1, "custom": {"zone-a": 1}}})
        plane.wait(lambda: plane.status("s")["ready"] == 2, timeout=120, what="two replicas on the cluster")
        assert all(one_request(plane.url, 1, 0).ok for _ in range(2))
        victim_url = plane.status("s")["replicas"][0]["url"]
        # the victim: the node running the first replica (found through its process tree)
        r = httpx.post(f"{victim_url}/v1/models/s:predict", json={"n": 1, "delay": 0}, timeout=10)
        replica_pid = next(json.loads(line[5:])["pid"] for line in r.text.splitlines()
                           if line.startswith("data:") and line[5:].strip() != "[DONE]")
        victim = node_of(cluster, replica_pid)

        outcomes: list[Outcome] = []
        lock = threading.Lock()
        stop_at = time.monotonic() + 25

        def worker() -> None:
            for _ in range(40):
                if time.monotonic() > stop_at:
                    return
                o = one_request(plane.url, 8, 0.05)
                with lock:
                    outcomes.append(o)

        threads = [threading.Thread(target=worker) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(3)
        cluster.remove_node(victim, allow_graceful=False)
        killed_at = len(outcomes)
        for t in threads:
            t.join(60)
        lost = [o for o in outcomes if not o.ok and not o.first_byte]
        print(f"requests: {len(outcomes)}, at kill: {killed_at}, ok: {sum(o.ok for o in outcomes)}, cut mid-stream: "
              f"{sum(1 for o in outcomes if not o.ok and o.first_byte)}")
        broken = [o for o in outcomes if not o.ok and o.first_byte]
        assert not lost, (lost, plane.log())
        assert sum(o.ok for o in outcomes) > killed_at, "load went on after the kill"
        for o in broken:       # cut mid-stream by the kill: each one ended with an error event, not silence
            assert "replica_stream_broken" in o.error or "stream ended" in o.error or "RemoteProtocolError" in o.error, o
        # the dead node's replica is replaced on the node still free
        plane.wait(lambda: plane.status("s")["ready"] == 2 and
                   any(x["phase"] == "failed" for x in plane.status("s")["replicas"]), timeout=90,
                   what="a replacement replica")
        assert one_request(plane.url, 2, 0).ok
        urls = {x["url"] for x in plane.status("s")["replicas"] if x["phase"] == "ready"}
        assert victim_url not in urls
    finally:
        if plane is not None:
            plane.stop()
        cluster.shutdown()
