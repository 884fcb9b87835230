"""WebSocket pass-through: the client's socket joined to a socket on a chosen replica.

Only the WebSocket paths of allow.PUBLIC are joined; any other is refused before the handshake
with an HTTP answer (404, or 403 for an admin path). The deployment comes from the path
(`/v1/models/NAME/...`), a `model` query parameter, or the router's only deployment. The
upstream socket is opened first (retried on another replica if it fails), then the client's is
accepted; frames are copied both ways until either side closes.
For a deployment the control plane manages, a connection no replica can take waits in the
activator (scaling from zero, or every replica at its limit), like an HTTP request. Otherwise,
or when that wait ends without a replica, it is refused before acceptance (close code 1013,
"try again later").
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import aiohttp

from headway.infra.fleet.keys import Rejection
from headway.infra.router import allow
from headway.infra.router.extract import model_from_path
from headway.infra.router.types import RouteEvent, RouteRequest
from headway.infra.router.upstream import NoCapacity
from headway.wire import ClientGone

if TYPE_CHECKING:
    from headway.infra.router.proxy import Receive, RouterApp, Scope, Send


def _deployment(app: RouterApp, scope: Scope) -> tuple[str, str | None] | None:
    name = model_from_path(scope["path"])
    if name is None:
        values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("model")
        name = values[0] if values else None
    if name is None:
        deployments = app.replicas.deployments()
        name = next(iter(deployments)) if len(deployments) == 1 else None
    return app.replicas.resolve(name) if name else None


async def _deny(scope: Scope, send: Send, status: int, message: str) -> None:
    """Refuse the handshake with an HTTP answer the client can read (ASGI denial response), or a
    plain close (403) where the server does not support one."""
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
        return
    body = json.dumps({"error": {"type": "not_found" if status == 404 else "admin_endpoint" if status == 403
                                 else "bad_request", "message": message, "code": status}}).encode()
    await send({"type": "websocket.http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "websocket.http.response.body", "body": body})


async def proxy_websocket(app: RouterApp, scope: Scope, receive: Receive, send: Send) -> None:
    first = await receive()
    if first["type"] != "websocket.connect":
        return
    verdict = allow.check("WS", scope["path"])
    if verdict.status != 200:
        await _deny(scope, send, verdict.status, verdict.message)
        return
    scope = {**scope, "path": verdict.path}
    resolved = _deployment(app, scope)
    if resolved is None:
        await send({"type": "websocket.close", "code": 1008, "reason": "unknown model"})
        return
    deployment, adapter = resolved
    if app.gate is not None:   # keys: an invoke (or admin) key for this deployment; refused before acceptance
        checked = app.gate.check(scope, "invoke", deployment)
        if isinstance(checked, Rejection):
            await send({"type": "websocket.close", "code": 1008, "reason": f"{checked.status} {checked.kind}"})
            return
    req = RouteRequest(deployment, app.forwarder.next_id(), adapter=adapter)
    policy = app.forwarder.policy_for(deployment)
    qs = scope.get("query_string", b"").decode("latin-1")
    path_qs = scope["path"] + ("?" + qs if qs else "")
    protocols = list(scope.get("subprotocols") or ())
    fw = app.forwarder
    session = fw.session
    assert session is not None

    async def connect() -> tuple[Any, aiohttp.ClientWebSocketResponse, float]:
        """A leased replica and its upstream socket; NoCapacity when no replica could take it."""
        tried: set[str] = set()
        for _ in range(app.config.max_attempts):
            picked = fw.pick(req, policy, tried)
            if picked is None:
                break
            rep, now = picked
            try:
                upstream = await session.ws_connect(rep.url.replace("http", "ws", 1) + path_qs, protocols=protocols,
                                                    autoclose=False, autoping=True)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                app.replicas.failed(rep, f"websocket: {type(exc).__name__}: {exc}",
                                    down=isinstance(exc, aiohttp.ClientConnectorError))
                fw.failed(rep, req, policy, now, "websocket_connect")
                continue
            return rep, upstream, now
        raise NoCapacity(f"no replica of '{deployment}' could take the connection")

    try:
        rep, upstream, now = await app.with_capacity(deployment, connect, receive)
    except ClientGone:
        return
    except NoCapacity:
        app.metrics.rejected.labels(deployment).inc()
        await send({"type": "websocket.close", "code": 1013, "reason": "no replica available"})
        return
    ok = False
    try:
        await send({"type": "websocket.accept", "subprotocol": upstream.protocol})
        ok = await _join(upstream, receive, send)
    finally:
        fw.release(rep, ok=ok)   # wakes requests waiting in the activator for this deployment
        policy.observe(RouteEvent("finished" if ok else "failed", rep.url, time.monotonic(), req,
                                  time.monotonic() - now))
        if not upstream.closed:
            await upstream.close()


async def _join(upstream: aiohttp.ClientWebSocketResponse, receive: Receive, send: Send) -> bool:
    async def client_to_upstream() -> None:
        while True:
            message: dict[str, Any] = await receive()
            if message["type"] == "websocket.disconnect":
                await upstream.close(code=message.get("code", 1000))
                return
            if message.get("text") is not None:
                await upstream.send_str(message["text"])
            elif message.get("bytes") is not None:
                await upstream.send_bytes(message["bytes"])

    async def upstream_to_client() -> bool:
        async for msg in upstream:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await send({"type": "websocket.send", "text": msg.data})
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await send({"type": "websocket.send", "bytes": msg.data})
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                break
            elif msg.type == aiohttp.WSMsgType.ERROR:
                await send({"type": "websocket.close", "code": 1011, "reason": "replica failed"})
                return False
        code = upstream.close_code or 1000
        await send({"type": "websocket.close", "code": code if code < 5000 else 1011})
        return code in (1000, 1001)

    down = asyncio.ensure_future(upstream_to_client())
    up = asyncio.ensure_future(client_to_upstream())
    done, _ = await asyncio.wait({down, up}, return_when=asyncio.FIRST_COMPLETED)
    if up in done:
        try:
            return bool(await asyncio.wait_for(down, 5))
        except (asyncio.TimeoutError, Exception):
            return True
    up.cancel()
    try:
        return bool(down.result())
    except Exception:
        return False
