"""The activator queue behind every protocol: HTTP, WebSocket and gRPC requests for a managed
deployment with no replica wait instead of failing, are all served once a replica is added, and
a client that goes away while waiting leaves the queue at once (not at its timeout).

A real router (RouterApp under uvicorn, gRPC on its own port) in a thread of this process, so the
test can add the replica the way the control plane's manager does; the replica is a real process.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import uvicorn
import websockets

from headway.infra.router.activator import QueueLimits
from headway.infra.router.grpc_service import start_grpc
from headway.infra.router.proto import router_pb2, router_pb2_grpc
from headway.infra.router.proxy import RouterApp
from headway.infra.router.replicas import Replica, ReplicaSet
from headway.infra.router.upstream import RouterConfig
from tests.conftest import free_port
from tests.test_router_support import Proc, ws_replica

DEP = "echo-ws"


class ThreadRouter:
    """A managed deployment with no replica behind a router served from a background thread."""

    def __init__(self, timeout_s: float = 30.0):
        self.port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop: asyncio.AbstractEventLoop | None = None
        self.grpc: Any = None
        self.app = RouterApp(ReplicaSet([], managed={DEP}, check_interval_s=0.2), RouterConfig(),
                             on_startup=self._up, on_shutdown=self._down)
        self.app.activator.manage(DEP, QueueLimits(size=10, timeout_s=timeout_s))
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    ws="websockets-sansio", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    async def _up(self, app: RouterApp) -> None:
        self.loop = asyncio.get_running_loop()
        self.grpc = await start_grpc(app, "127.0.0.1", self.grpc_port)

    async def _down(self, app: RouterApp) -> None:
        await self.grpc.stop(grace=0.5)

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "router did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def queued(self) -> int:
        return self.app.activator.queued(DEP)

    def wait_queued(self, n: int, timeout: float = 10.0) -> float:
        started = time.monotonic()
        while self.queued() != n:
            assert time.monotonic() - started < timeout, f"{self.queued()} waiting, expected {n}"
            time.sleep(0.02)
        return time.monotonic() - started

    def add_replica(self, url: str, limit: int | None = None) -> None:
        """What the manager does when a replica says it is ready: add it, read its state, wake the queue."""
        async def add() -> None:
            rep = self.app.replicas.add(Replica(url, deployment=DEP, limit_override=limit))
            assert self.app.forwarder.session is not None
            await self.app.replicas.check_all(self.app.forwarder.session)
            assert rep.usable(), rep.last_error
            self.app.activator.notify(DEP)

        assert self.loop is not None
        asyncio.run_coroutine_threadsafe(add(), self.loop).result(10)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[ThreadRouter, Proc]]:
    replica = ws_replica(tmp_path)
    router = ThreadRouter()
    try:
        router.start()
        replica.wait()
        yield router, replica
    finally:
        router.stop()
        replica.stop()


def test_every_protocol_waits_for_a_replica_and_a_gone_client_leaves(setup: tuple[ThreadRouter, Proc]) -> None:
    router, replica = setup
    # an HTTP client that gives up while waiting leaves the queue at once, not after the 30 s timeout
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(router.url + f"/v1/models/{DEP}:predict", json={"x": 0}, timeout=0.5)
    assert router.wait_queued(0, timeout=3.0) < 3.0
    assert 'outcome="client_gone"' in httpx.get(router.url + "/metrics").text

    async def ws_talk() -> str:
        async with websockets.connect(router.url.replace("http", "ws") + f"/v1/models/{DEP}/ws", open_timeout=20) as ws:
            await ws.send("hi")
            return str(await ws.recv())

    def grpc_predict() -> Any:
        with grpc.insecure_channel(f"127.0.0.1:{router.grpc_port}") as channel:
            return router_pb2_grpc.RouterStub(channel).Predict(
                router_pb2.PredictRequest(model=DEP, body=b'{"via": "grpc"}'), timeout=20)

    with ThreadPoolExecutor(3) as pool:
        ws = pool.submit(lambda: asyncio.run(ws_talk()))
        rpc = pool.submit(grpc_predict)
        http = pool.submit(lambda: httpx.post(router.url + f"/v1/models/{DEP}:predict", json={"via": "http"}, timeout=20))
        router.wait_queued(3)            # all three wait: none got an immediate 503 / close / UNAVAILABLE
        time.sleep(0.3)
        assert not (ws.done() or rpc.done() or http.done())
        router.add_replica(replica.url)
        assert ws.result(20) == "echo:hi"
        reply = rpc.result(20)
        assert reply.status == 200 and json.loads(reply.body) == {"echo": {"via": "grpc"}} and reply.replica == replica.url
        r = http.result(20)
        assert r.status_code == 200 and r.json() == {"echo": {"via": "http"}}
    assert router.queued() == 0
    metrics = httpx.get(router.url + "/metrics").text
    released = [line for line in metrics.splitlines() if "activator_released_total" in line and 'outcome="released"' in line]
    assert released and float(released[0].rsplit(" ", 1)[1]) == 3.0, released


def test_a_websocket_refused_when_the_wait_times_out(tmp_path: Path) -> None:
    router = ThreadRouter(timeout_s=0.5)
    try:
        router.start()

        async def connect() -> None:
            async with websockets.connect(router.url.replace("http", "ws") + f"/v1/models/{DEP}/ws", open_timeout=10):
                pass

        started = time.monotonic()
        with pytest.raises(websockets.InvalidStatus):   # refused before the handshake, after the wait
            asyncio.run(connect())
        assert 0.4 < time.monotonic() - started < 5
        assert router.queued() == 0
    finally:
        router.stop()


def test_a_websocket_that_ends_wakes_a_request_waiting_for_its_replica(setup: tuple[ThreadRouter, Proc]) -> None:
    """One replica that takes one request at a time, held by a WebSocket: an HTTP request waits in
    the activator, and is served as soon as the socket closes (its lease release wakes the queue)."""
    router, replica = setup
    router.add_replica(replica.url, limit=1)

    async def scenario() -> tuple[int, float]:
        async with httpx.AsyncClient(timeout=25) as client:
            async with websockets.connect(router.url.replace("http", "ws") + f"/v1/models/{DEP}/ws") as ws:
                await ws.send("hold")
                assert await ws.recv() == "echo:hold"
                waiting = asyncio.ensure_future(client.post(router.url + f"/v1/models/{DEP}:predict", json={"x": 1}))
                while router.queued() != 1:
                    assert not waiting.done()
                    await asyncio.sleep(0.02)
                closed = time.monotonic()
            r = await waiting
            return r.status_code, time.monotonic() - closed

    status, after_close = asyncio.run(scenario())
    assert status == 200 and after_close < 5.0      # not the 30 s activator timeout
