"""The router when replicas die: retries before the first byte, error events after it, passive
ejection, recovery through active health checks, 503 + Retry-After when nothing is left."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from headway.infra.router.proto import router_pb2, router_pb2_grpc
from tests.conftest import free_port

from tests.test_router_support import Proc, replica, router, sse_events

pytestmark = pytest.mark.slow
STORY = "/v1/models/streaming-story:predict"


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Proc]]:
    tmp = tmp_path_factory.mktemp("replicas")
    procs = [replica("streaming-story", tmp) for _ in range(3)]
    try:
        for p in procs:
            p.wait()
        yield procs
    finally:
        for p in procs:
            p.stop()


def revive(procs: list[Proc]) -> None:
    """Restart (on the same port) any replica a previous test killed."""
    for p in procs:
        assert p.proc is not None
        if p.proc.poll() is not None:
            p.start()
    for p in procs:
        p.wait()


def replica_state(router_url: str, url: str) -> dict[str, object]:
    return next(r for r in httpx.get(router_url + "/headway/router").json()["replicas"] if r["url"] == url)


def wait_until(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_sigkill_under_load_loses_no_request_before_its_first_byte(replicas: list[Proc], tmp_path: Path) -> None:
    revive(replicas)
    front = router(replicas, tmp_path)
    try:
        front.wait()
        outcomes: list[str] = []

        async def one(client: httpx.AsyncClient) -> None:
            first_seen = False
            try:
                async with client.stream("POST", front.url + STORY, json={"words": 4, "delay_ms": 40}) as r:
                    if r.status_code != 200:
                        outcomes.append(f"status {r.status_code}")
                        return
                    body = ""
                    async for text in r.aiter_text():
                        first_seen = first_seen or bool(text)
                        body += text
                events = sse_events(body)
                outcomes.append("ok" if events and events[-1] == ("", "[DONE]")
                                else "error_event" if events and events[-1][0] == "error" else f"cut: {body[-80:]!r}")
            except httpx.HTTPError as exc:
                outcomes.append(f"{'after' if first_seen else 'before'} first byte: {exc!r}")

        async def load() -> None:
            async with httpx.AsyncClient(timeout=30) as client:
                queue = list(range(90))
                mid_load = asyncio.Event()

                async def worker() -> None:
                    while queue:
                        queue.pop()
                        await one(client)
                        if len(outcomes) == 20:
                            mid_load.set()

                async def killer() -> None:
                    """Mid-load, at a moment the router has streams in flight on the victim."""
                    await mid_load.wait()
                    deadline = time.monotonic() + 10
                    while time.monotonic() < deadline:
                        state = (await client.get(front.url + "/headway/router")).json()
                        victim = next(r for r in state["replicas"] if r["url"] == replicas[0].url)
                        if victim["in_flight"] >= 1:
                            break
                        await asyncio.sleep(0.005)
                    replicas[0].kill()

                await asyncio.gather(killer(), *(worker() for _ in range(6)))

        asyncio.run(load())
        assert replicas[0].proc is not None and replicas[0].proc.poll() is not None, "the replica was not killed"
        assert len(outcomes) == 90
        lost = [o for o in outcomes if o not in ("ok", "error_event")]
        assert lost == [], lost          # none failed before its first byte; broken streams ended with an error event
        assert outcomes.count("ok") >= 80
        metrics = httpx.get(front.url + "/metrics").text
        retried = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                      if line.startswith("headway_router_retries_total{"))
        # the kill was felt: streams in flight on it broke, or attempts on it were retried elsewhere
        assert retried + outcomes.count("error_event") >= 1, (retried, outcomes)
        print(f"outcomes: ok={outcomes.count('ok')} error_event={outcomes.count('error_event')} retried={retried}")
    finally:
        front.stop()


def test_broken_stream_ends_with_an_error_event(replicas: list[Proc], tmp_path: Path) -> None:
    revive(replicas)
    front = router(replicas, tmp_path)
    try:
        front.wait()
        with httpx.stream("POST", front.url + STORY, json={"words": 60, "delay_ms": 50}, timeout=30) as r:
            victim = next(p for p in replicas if p.url == r.headers["x-headway-replica"])
            chunks = r.iter_text()
            head = next(chunks)
            victim.kill()
            body = head + "".join(chunks)
        events = sse_events(body)
        assert events[0][0] == "" and events[-1][0] == "error"
        assert "replica_stream_broken" in events[-1][1] and len(events) < 60
        assert 'headway_router_stream_errors_total{deployment="streaming-story"} 1.0' in httpx.get(front.url + "/metrics").text
    finally:
        front.stop()


def test_grpc_stream_broken_by_a_dying_replica(replicas: list[Proc], tmp_path: Path) -> None:
    """gRPC Generate: a replica killed mid-stream ends the stream with an error chunk, and the
    break counts against that replica (its last error says so)."""
    revive(replicas)
    grpc_port = free_port()
    front = router(replicas, tmp_path, "--health-interval", "1000", grpc_port=grpc_port)
    try:
        front.wait()
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            stream = stub.Generate(router_pb2.PredictRequest(model="streaming-story",
                                                             body=b'{"words": 60, "delay_ms": 50}'), timeout=30)
            first = next(stream)
            assert first.event == ""
            victims = [p for p in replicas if replica_state(front.url, p.url)["in_flight"] == 1]
            assert len(victims) == 1
            victims[0].kill()
            rest = list(stream)
        assert rest[-1].event == "error" and b"replica_stream_broken" in rest[-1].data and len(rest) < 59
        assert "stream broke" in str(replica_state(front.url, victims[0].url)["last_error"])
    finally:
        front.stop()


def test_passive_ejection_then_recovery_through_health_checks(replicas: list[Proc], tmp_path: Path) -> None:
    revive(replicas)
    passive = router(replicas, tmp_path, "--health-interval", "1000", "--policy", "round-robin")  # no active checks
    active = router(replicas, tmp_path)
    try:
        passive.wait()
        active.wait()
        dead = replicas[1]
        dead.kill()
        served = [httpx.post(passive.url + STORY, json={"words": 1, "delay_ms": 0}) for _ in range(6)]
        assert all(r.status_code == 200 for r in served)       # the refused attempt was retried elsewhere
        assert {r.headers["x-headway-replica"] for r in served} == {replicas[0].url, replicas[2].url}
        state = replica_state(passive.url, dead.url)
        assert state["ejected"] is True and "Connect" in str(state["last_error"])
        wait_until(lambda: replica_state(active.url, dead.url)["healthy"] is False)
        dead.start()
        dead.wait()
        wait_until(lambda: replica_state(active.url, dead.url)["healthy"] is True)
        seen = {httpx.post(active.url + STORY, json={"words": 1, "delay_ms": 0}).headers["x-headway-replica"]
                for _ in range(30)}
        assert dead.url in seen
    finally:
        passive.stop()
        active.stop()


def test_503_with_retry_after_when_every_replica_is_down(replicas: list[Proc], tmp_path: Path) -> None:
    revive(replicas)
    grpc_port = free_port()
    front = router(replicas, tmp_path, grpc_port=grpc_port)
    try:
        front.wait()
        for p in replicas:
            p.kill()
        r = httpx.post(front.url + STORY, json={"words": 1})
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert "streaming-story" in r.json()["error"]["message"]
        wait_until(lambda: httpx.get(front.url + "/health/ready").status_code == 503)
        r = httpx.post(front.url + STORY, json={"words": 1})
        assert r.status_code == 503 and "healthy" in r.json()["error"]["message"]
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            with pytest.raises(grpc.RpcError) as err:
                router_pb2_grpc.RouterStub(channel).Predict(router_pb2.PredictRequest(model="streaming-story"), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "streaming-story" in err.value.details()
    finally:
        front.stop()


# A replica that is ready and healthy by its endpoints but answers 500 to every request.
FAILING_REPLICA = '''
import sys
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

async def state(request):
    return JSONResponse({"ready": True, "runtime": "custom", "model": "streaming-story", "in_flight": 0,
                         "queued": 0, "max_concurrency": 4})

async def predict(request):
    return JSONResponse({"error": {"message": "boom"}}, status_code=500)

app = Starlette(routes=[Route("/headway/state", state), Route("/health/ready", state),
                        Route("/v1/models/streaming-story:predict", predict, methods=["POST"])])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
'''


def test_replica_answering_500_is_ejected_passively(replicas: list[Proc], tmp_path: Path) -> None:
    revive(replicas)
    script = tmp_path / "failing_replica.py"
    script.write_text(FAILING_REPLICA)
    bad = Proc([str(script), "{port}"], tmp_path / "failing-replica.log")
    bad.wait()
    front = router([replicas[0], bad], tmp_path, "--health-interval", "1000", "--policy", "round-robin",
                   "--eject-after", "3")
    try:
        front.wait()
        answers = [httpx.post(front.url + STORY, json={"words": 1, "delay_ms": 0}) for _ in range(12)]
        failed = [r for r in answers if r.status_code == 500]
        assert len(failed) == 3 and all(r.headers["x-headway-replica"] == bad.url for r in failed)
        state = replica_state(front.url, bad.url)
        assert state["ejected"] is True and "500" in str(state["last_error"])
        assert all(r.status_code == 200 for r in answers[6:])  # after the third 500, only the good one
    finally:
        front.stop()
        bad.stop()
