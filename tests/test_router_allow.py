"""The router forwards only the public model API (allow.py): admin paths of the replicas are
refused over HTTP, WebSocket and gRPC, however the path is spelled."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import grpc
import httpx
import pytest
import websockets

from headway.infra.router import allow
from headway.infra.router.proto import router_pb2, router_pb2_grpc
from tests.conftest import ROOT, free_port
from tests.test_router_support import Proc, router

# A replica that answers every path: admin paths say "leaked", so a test sees any that got through.
OPEN_REPLICA = '''
import sys
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute

STATE = {"ready": True, "runtime": "custom", "model": "open", "in_flight": 0, "queued": 0, "max_concurrency": 8}

async def state(request):
    return JSONResponse({**STATE, "leaked": request.headers.get("x-probe") is not None})

async def anything(request):
    return JSONResponse({"path": request.url.path, "leaked": not request.url.path.startswith("/v1/models/open")
                         and request.url.path not in ("/v1/chat/completions", "/v1/completions")})

async def echo(ws):
    await ws.accept()
    await ws.send_text("hello from " + ws.url.path)
    await ws.close()

app = Starlette(routes=[Route("/headway/state", state), Route("/health/ready", state),
                        WebSocketRoute("/v1/models/open/ws", echo), WebSocketRoute("/headway/ws", echo),
                        Route("/{p:path}", anything, methods=["GET", "POST", "DELETE", "PUT"])])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
'''

ATTACKS = ["/v1/load_lora_adapter", "//v1/load_lora_adapter", "/v1/unload_lora_adapter", "/headway/state",
           "/headway/tokenizer", "/v1/%2e%2e/headway/state", "/v1/%2E%2E/headway/tokenizer", "/./headway/state",
           "/v1/models/open/../../headway/state", "/v1/models/open%2f..%2f..%2fheadway%2fstate",
           "/v1/%252e%252e/headway/state", "/v1//../v1/load_lora_adapter", "/v1/chat/completions/../../headway/state"]


def test_normalize_resolves_encodings_slashes_and_dot_segments() -> None:
    assert allow.normalize("/v1/%2e%2e/headway/state") == "/headway/state"
    assert allow.normalize("//v1//load_lora_adapter") == "/v1/load_lora_adapter"
    assert allow.normalize("/v1/./chat/completions") == "/v1/chat/completions"
    assert allow.normalize("/../../etc/passwd") == "/etc/passwd"
    assert allow.normalize("/v1/%252e%252e/headway/state") == "/headway/state"
    with pytest.raises(allow.BadPath):
        allow.normalize("/v1/chat/completions%00")
    with pytest.raises(allow.BadPath):
        allow.normalize("/v1\\..\\headway/state")


@pytest.mark.parametrize("path", ATTACKS)
def test_check_refuses_admin_paths_however_spelled(path: str) -> None:
    for method in ("GET", "POST", "WS"):
        verdict = allow.check(method, path)
        assert verdict.status in (403, 404), (method, path, verdict)
        assert not verdict.path.startswith("/v1/models/open") and verdict.path != "/v1/chat/completions"


def test_check_allows_the_public_api_and_names_what_it_serves() -> None:
    for method, path in [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/embeddings"), ("POST", "/embed"),
                         ("POST", "/v1/audio/transcriptions"), ("POST", "/v1/audio/translations"),
                         ("POST", "/v1/audio/speech"), ("POST", "/v1/models/smollm2-135m-instruct:predict"),
                         ("GET", "/v1/models/text-classifier/schema"), ("WS", "/v1/models/echo-ws/ws")]:
        assert allow.check(method, path).status == 200, (method, path)
    assert allow.check("POST", "/v1/models/a.b_c-1:predict").name == "a.b_c-1"
    wrong = allow.check("GET", "/v1/chat/completions")
    assert wrong.status == 405 and wrong.allow == ("POST",)
    admin = allow.check("POST", "/v1/load_lora_adapter")
    assert admin.status == 403 and "admin" in admin.message and "replica itself" in admin.message
    unknown = allow.check("GET", "/v2/anything")
    assert unknown.status == 404 and "POST /v1/chat/completions" in unknown.message and "/v1/models/{name}:predict" in unknown.message
    assert allow.check("WS", "/v1/chat/completions").status == 404
    assert allow.check("POST", "/v1/models/..:predict").status == 404   # '..' resolves away: no name
    assert allow.check("POST", "/v1/models/-x:predict").status == 404   # a name starts with a letter or digit


def raw_request(port: int, method: str, path: str) -> tuple[int, bytes]:
    """One HTTP/1.1 request with the path exactly as given (clients would normalise it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Probe: 1\r\n"
                  f"Content-Length: 2\r\nConnection: close\r\n\r\n{{}}".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, Proc, int]]:
    tmp = tmp_path_factory.mktemp("allow")
    script = tmp / "open_replica.py"
    script.write_text(OPEN_REPLICA)
    rep = Proc([str(script), "{port}"], tmp / "open-replica.log")
    grpc_port = free_port()
    fr: Proc | None = None
    try:
        rep.wait()
        fr = router([rep], tmp, grpc_port=grpc_port)
        fr.wait()
        yield rep, fr, grpc_port
    finally:
        if fr is not None:
            fr.stop()
        rep.stop()


def test_http_admin_paths_are_refused_and_public_ones_pass(front: tuple[Proc, Proc, int]) -> None:
    rep, fr, _ = front
    assert raw_request(rep.port, "POST", "/v1/load_lora_adapter")[0] == 200   # the replica itself answers
    for path in ATTACKS:
        for method in ("GET", "POST"):
            status, body = raw_request(fr.port, method, path)
            assert status in (403, 404), (method, path, status, body)
            assert b"leaked" not in body and b'"ready"' not in body, (method, path, body)
    status, body = raw_request(fr.port, "POST", "/v1/load_lora_adapter")
    assert status == 403 and "replica itself" in json.loads(body)["error"]["message"]
    status, body = raw_request(fr.port, "GET", "/v1/debug")
    assert status == 404 and "/v1/chat/completions" in json.loads(body)["error"]["message"]
    # public paths, however spelled, reach the replica as their normalised selves
    for path in ("/v1/models/open:predict", "//v1/models/open:predict", "/v1/./models/x/../open:predict"):
        status, body = raw_request(fr.port, "POST", path)
        assert status == 200 and json.loads(body) == {"path": "/v1/models/open:predict", "leaked": False}, (path, body)
    r = httpx.get(fr.url + "/v1/models/open/schema")
    assert r.status_code == 200 and r.json()["path"] == "/v1/models/open/schema"
    # `headway predict` without --model finds the router's only model through /v1/models
    done = subprocess.run([sys.executable, "-m", "headway", "predict", "--url", fr.url, "-d", "{}"], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert json.loads(done.stdout) == {"path": "/v1/models/open:predict", "leaked": False}, done.stderr
    # the router's own endpoints still answer
    assert httpx.get(fr.url + "/headway/router").status_code == 200
    assert {m["id"] for m in httpx.get(fr.url + "/v1/models").json()["data"]} == {"open"}


def test_websocket_only_on_public_paths(front: tuple[Proc, Proc, int]) -> None:
    _, fr, _ = front
    base = fr.url.replace("http", "ws")

    async def hello(path: str) -> str:
        async with websockets.connect(base + path, open_timeout=10) as ws:
            return str(await ws.recv())

    assert asyncio.run(hello("/v1/models/open/ws")) == "hello from /v1/models/open/ws"
    assert asyncio.run(hello("/v1/models/x/../open/ws")) == "hello from /v1/models/open/ws"
    for path, status in (("/headway/ws", 403), ("/v1/%2e%2e/headway/ws", 403), ("/v1/chat/completions", 404)):
        with pytest.raises(websockets.InvalidStatus) as info:
            asyncio.run(hello(path))
        assert info.value.response.status_code == status, path
        assert b"error" in info.value.response.body


def test_grpc_path_is_limited_to_the_public_api(front: tuple[Proc, Proc, int]) -> None:
    _, _, grpc_port = front
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        ok = stub.Predict(router_pb2.PredictRequest(model="open", body=b"{}"), timeout=10)
        assert ok.status == 200 and json.loads(ok.body)["path"] == "/v1/models/open:predict"
        chat = stub.Predict(router_pb2.PredictRequest(model="open", path="/v1/chat/completions", body=b"{}"), timeout=10)
        assert json.loads(chat.body) == {"path": "/v1/chat/completions", "leaked": False}
        for path, code in (("/v1/load_lora_adapter", grpc.StatusCode.PERMISSION_DENIED),
                           ("/v1/%2e%2e/headway/state", grpc.StatusCode.PERMISSION_DENIED),
                           ("//headway/tokenizer", grpc.StatusCode.PERMISSION_DENIED),
                           ("/v1/anything", grpc.StatusCode.INVALID_ARGUMENT),
                           ("/v1/models/other:predict", grpc.StatusCode.INVALID_ARGUMENT)):
            with pytest.raises(grpc.RpcError) as err:
                stub.Predict(router_pb2.PredictRequest(model="open", path=path, body=b"{}"), timeout=10)
            assert err.value.code() == code, (path, err.value.details())
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(router_pb2.PredictRequest(model="open", path=path, body=b"{}"), timeout=10))
            assert err.value.code() == code, path
