"""The router's ASGI app: local endpoints, then the public model API (allow.py) proxied to a replica.

Bytes stream through as they arrive (no buffering of responses). A stream that breaks after its
first byte ends with an SSE error event (for text/event-stream) or a cut body; a request no
replica can take gets 503 with Retry-After. With a gate (keys), every route but /health/* is
checked first: model traffic needs an invoke or admin key (for its deployment, within its rate
limits), /metrics and /headway/router a deploy or admin key; the key is not forwarded.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
from aiohttp.typedefs import LooseHeaders
from multidict import CIMultiDict

from headway.infra.fleet.auth import error_json, estimate_tokens, rejection_headers, usage_tokens
from headway.infra.fleet.keys import KeyRecord, Rejection, authorize
from headway.infra.router import allow
from headway.infra.router.activator import Activator, ActivatorFull, ActivatorTimeout
from headway.infra.router.extract import model_from_form, model_from_path, parse_body, prompt_of
from headway.infra.router.metrics import RouterMetrics
from headway.infra.router.replicas import ReplicaSet
from headway.infra.router.tokenize import prompt_token_ids
from headway.infra.router.tokenizer_fetch import TokenizerFetcher
from headway.infra.router.types import RouteRequest
from headway.infra.router.upstream import Forwarder, NoCapacity, Opened, RouterConfig
from headway.wire import ClientGone, error_bytes

if TYPE_CHECKING:
    from headway.infra.fleet.auth import AuthGate

log = logging.getLogger("headway.router")
T = TypeVar("T")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

HOP_REQUEST = frozenset({b"host", b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade",
                         b"proxy-connection", b"proxy-authorization", b"content-length", b"trailer"})
HOP_RESPONSE = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade", b"trailer",
                          b"proxy-connection"})
MAX_BODY = 64 * 1024 * 1024
NEEDS_PROMPT = frozenset({"cache-aware", "predicted-latency"})
OPS_PATHS = frozenset({"/metrics", "/headway/router"})   # with a gate: admin or deploy keys only
DENIED = {400: "bad_request", 403: "admin_endpoint", 404: "not_found", 405: "method_not_allowed"}


def sse_error(kind: str, message: str, code: int) -> bytes:
    return b"event: error\ndata: " + error_bytes(kind, message, code) + b"\n\n"


async def respond(send: Send, status: int, body: bytes, content_type: bytes = b"application/json",
                  headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


async def deny(send: Send, refused: Rejection) -> None:
    await respond(send, refused.status, error_json(refused), headers=rejection_headers(refused))


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone (its body was read already, so only a disconnect is left)."""
    while (await receive())["type"] not in ("http.disconnect", "websocket.disconnect"):
        pass


async def _close_on_disconnect(receive: Receive, resp: aiohttp.ClientResponse) -> None:
    await _disconnected(receive)
    resp.close()


class RouterApp:
    def __init__(self, replicas: ReplicaSet, config: RouterConfig | None = None,
                 on_startup: Callable[[RouterApp], Awaitable[None]] | None = None,
                 on_shutdown: Callable[[RouterApp], Awaitable[None]] | None = None, gate: AuthGate | None = None):
        self.replicas = replicas
        self.gate = gate     # keys and rate limits; None: every request is let through (no keys configured)
        self.hop_request = HOP_REQUEST | {b"authorization"} if gate is not None else HOP_REQUEST   # keys stay here
        self.config = config or RouterConfig()
        self.metrics = RouterMetrics()
        self.activator = Activator()
        self.first_byte: dict[str, deque[tuple[float, float]]] = {}   # per deployment: (when, seconds), newest last
        self.forwarder = Forwarder(replicas, self.metrics, self.config, on_release=self.activator.notify)
        self.tokenizer_fetch = TokenizerFetcher(self.config, replicas)
        self._checks: asyncio.Task[None] | None = None
        self._on_startup = on_startup
        self._on_shutdown = on_shutdown

    # --- lifespan -------------------------------------------------------------------------------
    async def startup(self) -> None:
        session = self.forwarder.start()
        await self.replicas.check_all(session)
        self._checks = asyncio.create_task(self.replicas.run_checks(session))
        if self._on_startup is not None:
            await self._on_startup(self)
        gc.collect()
        gc.freeze()   # startup objects leave the collector's view: full collections stay short (tail latency)

    async def shutdown(self) -> None:
        if self._on_shutdown is not None:
            await self._on_shutdown(self)
        if self._checks is not None:
            self._checks.cancel()
        self.tokenizer_fetch.close()
        await self.forwarder.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self.http(scope, receive, send)
        elif kind == "websocket":
            from headway.infra.router.websocket import proxy_websocket
            await proxy_websocket(self, scope, receive, send)
        elif kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    try:
                        await self.startup()
                    except Exception as exc:
                        await send({"type": "lifespan.startup.failed", "message": str(exc)})
                        return
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.shutdown()
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    # --- local endpoints ------------------------------------------------------------------------
    async def local(self, method: str, path: str, send: Send) -> bool:
        if method != "GET":
            return False
        if path == "/health/live":
            await respond(send, 200, b'{"live": true}')
        elif path == "/health/ready":
            ready = any(r.usable() for r in self.replicas.replicas)
            await respond(send, 200 if ready else 503, json.dumps({"ready": ready}).encode())
        elif path == "/metrics":
            await respond(send, 200, self.metrics.render(self.replicas, self.forwarder.policies),
                          b"text/plain; version=0.0.4; charset=utf-8")
        elif path == "/headway/router":
            body = {"replicas": self.replicas.snapshot(),
                    "policies": {d: {"policy": p.name, "reasons": p.stats.reasons}
                                 for d, p in self.forwarder.policies.items()},
                    "tokenizers": dict(self.tokenizer_fetch.sources)}   # deployment -> where it came from
            await respond(send, 200, json.dumps(body).encode())
        elif path == "/v1/models":
            names = sorted({n for r in self.replicas.replicas if r.key for n in (r.key, *r.aliases, *r.adapters)}
                           | self.replicas.managed)
            data = [{"id": n, "object": "model", "created": 0, "owned_by": "headway"} for n in names]
            await respond(send, 200, json.dumps({"object": "list", "data": data}).encode())
        else:
            return False
        return True

    # --- proxy ----------------------------------------------------------------------------------
    def route_request(self, path: str, body: bytes, headers: list[tuple[bytes, bytes]],
                      name: str | None = None) -> RouteRequest | str:
        """The request as a policy sees it, or an error message when no deployment matches."""
        name = name or model_from_path(path)
        parsed: dict[str, Any] | None = None
        if name is None:
            parsed = parse_body(body)
            model = parsed.get("model") if parsed else model_from_form(body, headers)
            name = model if isinstance(model, str) else None
        deployments = self.replicas.deployments()
        if name is None:
            if len(deployments) == 1:
                name = next(iter(deployments))
            else:
                return (f"say which model: put it in the path (/v1/models/NAME:predict) or in the body's "
                        f"'model' field; this router serves: {', '.join(sorted(deployments)) or 'none yet'}")
        resolved = self.replicas.resolve(name)
        if resolved is None:
            return f"model '{name}' is not served here; this router serves: {', '.join(sorted(deployments)) or 'none yet'}"
        deployment, adapter = resolved
        region = None
        for k, v in headers:
            if k == b"x-headway-region":
                region = v.decode("latin-1")
        prompt, token_ids = "", None
        if self.forwarder.policy_for(deployment).name in NEEDS_PROMPT:
            parsed = parsed if parsed is not None else parse_body(body)
            prompt, token_ids = prompt_of(parsed)
            tokenizer = (self.config.tokenizers or {}).get(deployment)
            if tokenizer is None:
                self.tokenizer_fetch.want(deployment, self.forwarder.session)
            elif token_ids is None:
                token_ids = prompt_token_ids(tokenizer, parsed)
        return RouteRequest(deployment, self.forwarder.next_id(), prompt, token_ids, adapter, region)

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        arrived = time.perf_counter()
        method: str = scope["method"]
        verdict = allow.check(method, scope["path"])
        path = verdict.path
        gate = self.gate
        caller: KeyRecord | None = None
        if gate is not None and not path.startswith("/health/"):
            checked = gate.check(scope, "deploy" if path in OPS_PATHS else "invoke")
            if not isinstance(checked, KeyRecord):
                await deny(send, checked)
                return
            caller = checked
        if await self.local(method, path, send):
            return
        if verdict.status != 200:
            extra = [(b"allow", ", ".join(verdict.allow).encode())] if verdict.allow else []
            await respond(send, verdict.status, error_bytes(DENIED[verdict.status], verdict.message, verdict.status),
                          headers=extra)
            return
        body = b""
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_BODY:
                await respond(send, 413, error_bytes("request_too_large", f"request body exceeds the router's "
                                                    f"limit of {MAX_BODY} bytes", 413))
                return
        raw_headers: list[tuple[bytes, bytes]] = scope["headers"]
        req = self.route_request(path, body, raw_headers)
        if isinstance(req, str):
            await respond(send, 404, error_bytes("model_not_found", req, 404))
            return
        if gate is not None and caller is not None:
            refused = authorize(caller, "invoke", req.deployment) or gate.admit(caller)
            if refused is not None:
                await deny(send, refused)
                return
        hop = self.hop_request
        headers = CIMultiDict((k.decode("latin-1"), v.decode("latin-1")) for k, v in raw_headers if k not in hop)
        qs: bytes = scope.get("query_string", b"")
        path_qs = path + ("?" + qs.decode("latin-1") if qs else "")   # the normalised path: what was allowed
        try:
            opened = await self.open(req, method, path_qs, headers, body, receive)
        except ClientGone:
            self.metrics.count_request(req.deployment, "client_gone")
            return
        except NoCapacity as exc:
            self.metrics.count_request(req.deployment, "503")
            self.metrics.rejected.labels(req.deployment).inc()
            retry = str(self.config.retry_after_s).encode()
            await respond(send, 503, error_bytes("no_replica_available", str(exc), 503), headers=[(b"retry-after", retry)])
            return
        resp = opened.resp
        ok = complete = False
        try:   # whatever happens from here on, the lease is released exactly once
            out_headers = [(k, v) for k, v in resp.raw_headers if k.lower() not in HOP_RESPONSE]
            out_headers.append((b"x-headway-replica", opened.replica.url.encode()))
            is_sse = resp.content_type == "text/event-stream"
            await send({"type": "http.response.start", "status": resp.status, "headers": out_headers})
            complete = resp.content.at_eof()   # small answers arrive whole: one write, no pump
            await send({"type": "http.response.body", "body": opened.first, "more_body": not complete})
            now = time.perf_counter()
            self.metrics.added.observe(max(0.0, now - arrived - opened.upstream_s))
            seen = self.first_byte.setdefault(req.deployment, deque(maxlen=2048))
            seen.append((time.monotonic(), now - arrived))
            ok = True if complete else await self._pump(opened, receive, send, is_sse)
        finally:
            self.forwarder.finish(opened, ok)
            self.metrics.count_request(req.deployment, str(resp.status) if ok else "stream_error")
            if gate is not None and caller is not None and caller.tpm:   # tokens: the answer's usage, else an estimate
                gate.charge(caller, (complete and usage_tokens(opened.first)) or estimate_tokens(body))

    def first_byte_p95(self, deployment: str, window_s: float) -> float | None:
        """p95 of the time to first byte clients saw (activator wait included) over the last window."""
        since = time.monotonic() - window_s
        values = sorted(s for t, s in self.first_byte.get(deployment, ()) if t >= since)
        return values[min(len(values) - 1, int(0.95 * len(values)))] if values else None

    async def open(self, req: RouteRequest, method: str, path_qs: str, headers: LooseHeaders, body: bytes,
                   receive: Receive | None = None) -> Opened:
        """Open the request on a replica; for a deployment the control plane manages, wait in the
        activator while no replica can take it (scaling from zero, or all at their limit).
        With the client's `receive`, a client that disconnects while waiting leaves the queue
        at once (`ClientGone`)."""
        return await self.with_capacity(req.deployment, lambda: self.forwarder.open(req, method, path_qs, headers, body),
                                        receive)

    async def with_capacity(self, dep: str, attempt: Callable[[], Awaitable[T]], receive: Receive | None = None) -> T:
        """`attempt()` (which raises NoCapacity when no replica can take the request); for a
        managed deployment, retried from the activator queue each time capacity may have appeared."""
        try:
            return await attempt()
        except NoCapacity:
            if not self.activator.manages(dep):
                raise
        started = time.monotonic()
        gone = asyncio.ensure_future(_disconnected(receive)) if receive is not None else None
        try:
            async with self.activator.hold(dep) as ticket:
                self.metrics.queued.labels(dep).set(self.activator.queued(dep))
                while True:
                    try:
                        opened = await attempt()
                    except NoCapacity:
                        await ticket.wait(gone)
                        continue
                    self.metrics.activated.labels(dep, "released").inc()
                    return opened
        except ClientGone:
            self.metrics.activated.labels(dep, "client_gone").inc()
            raise
        except ActivatorFull as exc:
            self.metrics.activated.labels(dep, "full").inc()
            raise NoCapacity(str(exc)) from None
        except ActivatorTimeout:
            self.metrics.activated.labels(dep, "timeout").inc()
            raise NoCapacity(f"no replica of '{dep}' could take the request within {time.monotonic() - started:.1f} s "
                             f"of waiting (activator.timeout_s {self.activator.limits[dep].timeout_s:g}); "
                             f"the deployment may be scaling up or failing to start: see `headway status {dep}`") from None
        finally:
            if gone is not None:
                gone.cancel()
            self.metrics.queued.labels(dep).set(self.activator.queued(dep))

    async def _pump(self, opened: Opened, receive: Receive, send: Send, is_sse: bool) -> bool:
        """Copy the rest of the replica's body to the client as it arrives; False if it broke.

        For event streams, a client that goes away closes the upstream connection at once (the
        replica sees the disconnect and cancels the request) and frees the lease.
        """
        content = opened.resp.content
        gone: asyncio.Task[None] | None = None
        if is_sse:
            gone = asyncio.ensure_future(_close_on_disconnect(receive, opened.resp))
        try:
            while True:
                chunk = await content.readany()
                if gone is not None and gone.done():
                    return False
                if not chunk:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    return True
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            if gone is not None and gone.done():
                return False
            dep = opened.req.deployment
            self.metrics.stream_errors.labels(dep).inc()
            self.replicas.failed(opened.replica, f"stream broke: {type(exc).__name__}: {exc}", down=False)
            log.warning("stream from %s broke after its first byte: %s", opened.replica.url, str(exc) or type(exc).__name__)
            if is_sse:
                tail = sse_error("replica_stream_broken", f"the replica serving '{dep}' failed mid-stream "
                                 f"({type(exc).__name__}); the response is incomplete", 502)
                await send({"type": "http.response.body", "body": tail, "more_body": False})
            # any other body is left incomplete: the server closes the connection, so the client sees the cut
            return False
        finally:
            if gone is not None and not gone.done():
                gone.cancel()
