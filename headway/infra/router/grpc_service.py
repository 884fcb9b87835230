"""The router's gRPC service (proto/router.proto): unary Predict and server-streaming Generate.

Both go through the same Forwarder as HTTP (same policies, leases, retries before the first
byte). The request's path, when given, must be one of the public POST endpoints of allow.PUBLIC
(a client cannot reach a replica's admin paths through gRPC either). Generate turns the replica's
server-sent events into one GenerateChunk each; a stream that breaks after it started ends with
an "error" chunk, as HTTP streams end with an error event.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import grpc
from multidict import CIMultiDict

from headway.infra.router import allow
from headway.infra.router.proto import router_pb2, router_pb2_grpc
from headway.infra.router.upstream import NoCapacity, Opened
from headway.tls import ServerTLS

if TYPE_CHECKING:
    from headway.infra.router.proxy import RouterApp

    # grpc.aio's context is generic in the request and response messages
    _PredictContext = grpc.aio.ServicerContext[router_pb2.PredictRequest, router_pb2.PredictReply]
    _GenerateContext = grpc.aio.ServicerContext[router_pb2.PredictRequest, router_pb2.GenerateChunk]

_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.INVALID_ARGUMENT,
          422: grpc.StatusCode.INVALID_ARGUMENT, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
          503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}


class RouterService(router_pb2_grpc.RouterServicer):
    def __init__(self, app: RouterApp):
        self.app = app

    async def _open(self, request: router_pb2.PredictRequest, context: _PredictContext | _GenerateContext,
                    accept: str) -> Opened:
        if not request.model:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "PredictRequest.model is required: the "
                                "deployment (or adapter) name")
        verdict = allow.check("POST", request.path or f"/v1/models/{request.model}:predict")
        if verdict.status != 200:
            code = grpc.StatusCode.PERMISSION_DENIED if verdict.status == 403 else grpc.StatusCode.INVALID_ARGUMENT
            await context.abort(code, f"PredictRequest.path: {verdict.message}")
        if verdict.name is not None and verdict.name != request.model:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"PredictRequest.path names model "
                                f"'{verdict.name}' but PredictRequest.model is '{request.model}'; leave path empty "
                                "for /v1/models/{model}:predict")
        path = verdict.path
        headers = [(b"x-headway-region", request.region.encode())] if request.region else []
        req = self.app.route_request(path, request.body, headers, name=request.model)
        if isinstance(req, str):
            await context.abort(grpc.StatusCode.NOT_FOUND, req)
        assert not isinstance(req, str)
        try:
            return await self.app.open(req, "POST", path, CIMultiDict({"content-type": "application/json",
                                                                       "accept": accept}), request.body)
        except NoCapacity as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            raise  # abort raises; this line is for type checkers

    async def Predict(self, request: router_pb2.PredictRequest,  # noqa: N802 (gRPC method name)
                      context: _PredictContext) -> router_pb2.PredictReply:
        opened = await self._open(request, context, "application/json")
        chunks = [opened.first]
        ok = False
        try:
            while chunk := await opened.resp.content.readany():
                chunks.append(chunk)
            ok = True
        except (aiohttp.ClientError, OSError) as exc:
            self.app.replicas.failed(opened.replica, f"body broke: {type(exc).__name__}: {exc}", down=False)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"replica {opened.replica.url} failed mid-response: {exc}")
        finally:
            self.app.forwarder.finish(opened, ok)
        return router_pb2.PredictReply(status=opened.resp.status, body=b"".join(chunks), replica=opened.replica.url)

    async def Generate(self, request: router_pb2.PredictRequest,  # noqa: N802
                       context: _GenerateContext) -> AsyncIterator[router_pb2.GenerateChunk]:
        opened = await self._open(request, context, "text/event-stream")
        resp = opened.resp
        if resp.status >= 400 or resp.content_type != "text/event-stream":
            try:
                body = opened.first + await resp.content.read()
            finally:  # the lease goes back whatever happens reading the body
                self.app.forwarder.finish(opened, True)
            await context.abort(_CODES.get(resp.status, grpc.StatusCode.INTERNAL) if resp.status >= 400
                                else grpc.StatusCode.FAILED_PRECONDITION,
                                f"replica answered {resp.status} {resp.content_type}, not an event stream: "
                                f"{body[:500].decode(errors='replace')}")
        ok = False
        buffer = opened.first
        try:
            while True:
                while b"\n\n" in buffer:
                    raw, buffer = buffer.split(b"\n\n", 1)
                    event, data = _parse_event(raw)
                    if data == b"[DONE]":
                        continue
                    yield router_pb2.GenerateChunk(event=event, data=data)
                chunk = await resp.content.readany()
                if not chunk:
                    ok = True
                    return
                buffer += chunk
        except (aiohttp.ClientError, OSError) as exc:
            self.app.metrics.stream_errors.labels(opened.req.deployment).inc()
            self.app.replicas.failed(opened.replica, f"stream broke: {type(exc).__name__}: {exc}", down=False)
            message = {"error": {"type": "replica_stream_broken", "code": 502, "message":
                                 f"the replica failed mid-stream ({type(exc).__name__}); the response is incomplete"}}
            yield router_pb2.GenerateChunk(event="error", data=json.dumps(message).encode())
        finally:
            self.app.forwarder.finish(opened, ok)


def _parse_event(raw: bytes) -> tuple[str, bytes]:
    event, data = "", []
    for line in raw.split(b"\n"):
        if line.startswith(b"event:"):
            event = line[6:].strip().decode()
        elif line.startswith(b"data:"):
            data.append(line[5:].lstrip(b" "))
    return event, b"\n".join(data)


async def start_grpc(app: RouterApp, host: str, port: int, tls: ServerTLS | None = None) -> grpc.aio.Server:
    server = grpc.aio.server()
    router_pb2_grpc.add_RouterServicer_to_server(RouterService(app), server)
    if tls is None:
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        creds = grpc.ssl_server_credentials([(Path(tls.key).read_bytes(), Path(tls.cert).read_bytes())])
        bound = server.add_secure_port(f"{host}:{port}", creds)
    if bound == 0:
        raise OSError(f"could not bind the gRPC port {host}:{port}")
    await server.start()
    return server
