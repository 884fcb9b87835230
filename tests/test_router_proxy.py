"""The router end to end: real replica processes behind a real router process on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import websockets

from headway.infra.router.proto import router_pb2, router_pb2_grpc
from tests.conftest import free_port
from tests.test_router_support import Proc, replica, router, sse_events, ws_replica

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Proc]]:
    tmp = tmp_path_factory.mktemp("router")
    procs = {"story1": replica("streaming-story", tmp), "story2": replica("streaming-story", tmp),
             "clf": replica("text-classifier", tmp), "ws": ws_replica(tmp)}
    try:
        for p in procs.values():
            p.wait()
        grpc_port = free_port()
        procs["router"] = router([procs["story1"], procs["story2"], procs["clf"], procs["ws"]], tmp, grpc_port=grpc_port)
        procs["router"].wait()
        procs["router"].grpc_port = grpc_port  # type: ignore[attr-defined]
        yield procs
    finally:
        for p in procs.values():
            p.stop()


def test_json_predict_by_path(fleet: dict[str, Proc]) -> None:
    r = httpx.post(fleet["router"].url + "/v1/models/text-classifier:predict", json={"texts": ["I love this", "awful"]})
    assert r.status_code == 200, r.text
    labels = [p["label"] for p in r.json()["predictions"]]
    assert labels == ["positive", "negative"]
    assert r.headers["x-headway-replica"] == fleet["clf"].url
    bad = httpx.post(fleet["router"].url + "/v1/models/text-classifier:predict", json={"text": "x"})
    assert bad.status_code == 422 and "texts" in bad.json()["error"]["message"]   # the replica's own error, passed through


def test_model_field_and_unknown_models(fleet: dict[str, Proc]) -> None:
    url = fleet["router"].url
    # the OpenAI API reaches a deployment by its body's `model` field (this custom replica has no such route: 404 from it)
    r = httpx.post(url + "/v1/chat/completions", json={"model": "text-classifier", "messages": []})
    assert r.headers["x-headway-replica"] == fleet["clf"].url
    unknown = httpx.post(url + "/v1/chat/completions", json={"model": "gpt-9", "messages": []})
    assert unknown.status_code == 404
    message = unknown.json()["error"]["message"]
    assert "gpt-9" in message and "streaming-story" in message and "text-classifier" in message
    models = httpx.get(url + "/v1/models").json()["data"]
    assert {m["id"] for m in models} == {"streaming-story", "text-classifier", "echo-ws"}


def test_sse_passes_through_unbuffered_and_spreads(fleet: dict[str, Proc]) -> None:
    url = fleet["router"].url + "/v1/models/streaming-story:predict"
    started = time.monotonic()
    with httpx.stream("POST", url, json={"words": 8, "delay_ms": 250}, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        chunks = r.iter_text()
        first = next(chunks)
        first_at = time.monotonic() - started
        rest = "".join(chunks)
    total = time.monotonic() - started
    assert first.startswith("data: ") and first_at < 1.0 and total >= 1.75, (first_at, total)
    events = sse_events(first + rest)
    assert len(events) == 9 and events[-1] == ("", "[DONE]")
    seen = {httpx.post(url, json={"words": 1, "delay_ms": 0}).headers["x-headway-replica"] for _ in range(30)}
    assert seen == {fleet["story1"].url, fleet["story2"].url}


def test_replica_error_event_passes_through(fleet: dict[str, Proc]) -> None:
    r = httpx.post(fleet["router"].url + "/v1/models/streaming-story:predict", json={"words": 5, "fail_after": 2,
                                                                                   "delay_ms": 0})
    events = sse_events(r.text)
    assert events[-1][0] == "error" and "lost the plot" in events[-1][1]


def test_websocket_pass_through(fleet: dict[str, Proc]) -> None:
    async def talk() -> list[str | bytes]:
        uri = fleet["router"].url.replace("http", "ws") + "/v1/models/echo-ws/ws"
        async with websockets.connect(uri) as ws:
            await ws.send("hello")
            a = await ws.recv()
            await ws.send(b"\x00\x01")
            b = await ws.recv()
            await ws.send("close")
            with pytest.raises(websockets.ConnectionClosedOK):
                await ws.recv()
            return [a, b]

    assert asyncio.run(talk()) == ["echo:hello", b"echo:\x00\x01"]

    async def unknown() -> None:
        async with websockets.connect(fleet["router"].url.replace("http", "ws") + "/v1/models/nope/ws"):
            pass

    with pytest.raises(websockets.InvalidStatus):   # refused before the handshake completes
        asyncio.run(unknown())


def test_grpc_unary_and_streaming(fleet: dict[str, Proc]) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{fleet['router'].grpc_port}") as channel:  # type: ignore[attr-defined]
        stub = router_pb2_grpc.RouterStub(channel)
        reply = stub.Predict(router_pb2.PredictRequest(model="text-classifier", body=b'{"texts": ["great"]}'), timeout=10)
        assert reply.status == 200 and json.loads(reply.body)["predictions"][0]["label"] == "positive"
        assert reply.replica == fleet["clf"].url
        chunks = list(stub.Generate(router_pb2.PredictRequest(model="streaming-story", body=b'{"words": 4, "delay_ms": 0}'),
                                    timeout=10))
        assert [json.loads(c.data) for c in chunks] == ["Once ", "upon ", "a ", "time "]
        failing = list(stub.Generate(router_pb2.PredictRequest(
            model="streaming-story", body=b'{"words": 4, "fail_after": 1, "delay_ms": 0}'), timeout=10))
        assert failing[-1].event == "error"
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(router_pb2.PredictRequest(model="nope"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "text-classifier" in err.value.details()


def test_metrics(fleet: dict[str, Proc]) -> None:
    text = httpx.get(fleet["router"].url + "/metrics").text
    for name in ("headway_router_decisions_total", "headway_router_requests_total",
                 "headway_router_added_latency_seconds_bucket", "headway_router_replica_in_flight",
                 "headway_router_replica_healthy", "headway_router_retries_total"):
        assert name in text, name
    assert 'policy="least-load"' in text and f'headway_router_replica_healthy{{replica="{fleet["clf"].url}"}} 1.0' in text


def test_503_with_retry_after_at_the_concurrency_limit(fleet: dict[str, Proc], tmp_path: Path) -> None:
    limited = router([fleet["story1"]], tmp_path, "--max-in-flight", "1")
    try:
        limited.wait()
        url = limited.url + "/v1/models/streaming-story:predict"
        with httpx.stream("POST", url, json={"words": 6, "delay_ms": 200}, timeout=30) as held:
            chunks = held.iter_text()   # keep the iterator: dropping it closes the response
            next(chunks)
            busy = httpx.post(url, json={"words": 1})
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert "concurrency limit" in busy.json()["error"]["message"]
            state = httpx.get(limited.url + "/headway/router").json()["replicas"][0]
            assert state["in_flight"] == 1 and state["limit"] == 1
        # the client that left freed its slot: the router closed the upstream stream at once
        deadline = time.monotonic() + 2
        while (code := httpx.post(url, json={"words": 1, "delay_ms": 0}).status_code) != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert code == 200
    finally:
        limited.stop()


def test_cache_aware_keeps_a_shared_prefix_on_one_replica(fleet: dict[str, Proc], tmp_path: Path) -> None:
    front = router([fleet["story1"], fleet["story2"]], tmp_path, "--policy", "cache-aware")
    try:
        front.wait()
        url = front.url + "/v1/models/streaming-story:predict"
        system = "You are the support bot of a bakery; answer briefly and kindly. " * 8
        owners = {httpx.post(url, json={"prompt": system + f"question {i}", "words": 1, "delay_ms": 0})
                  .headers["x-headway-replica"] for i in range(8)}
        assert len(owners) == 1
        text = httpx.get(front.url + "/metrics").text
        assert 'headway_router_decisions_total{deployment="streaming-story",policy="cache-aware",reason="affinity"} 7.0' in text
        assert 'headway_router_cache_affinity_rate{deployment="streaming-story",policy="cache-aware"} 0.875' in text
    finally:
        front.stop()
