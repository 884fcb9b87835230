"""The control API under /headway/control: a FastAPI app (pydantic bodies, an OpenAPI schema).

Every route depends on one auth check (`AuthGate`, scope per route); bodies must be JSON (415) and at
most MAX_BODY bytes (413); every error is `{"error": {"message", "type", "code"}}`, which the CLI
reads. Model traffic does not come here: the control plane sends it through the raw-ASGI router.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import TYPE_CHECKING, Any, Literal

from fastapi import Body, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from headway.infra.fleet.auth import error_json, redact, rejection_headers
from headway.infra.fleet.keys import KeyRecord, Rejection, new_key, parse_expires
from headway.infra.fleet.spec import validate_spec
from headway.package.load import PackageError

if TYPE_CHECKING:
    from headway.infra.fleet.control import ControlPlane

PREFIX = "/headway/control"
MAX_BODY = 1024 * 1024
ASGI = ASGIApp


class ScaleBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    replicas: StrictInt | None = Field(None, description="A replica count; null hands it back to the autoscaler.")


class ShutdownBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stop_replicas: bool = True


class KeyCreateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scope: Literal["admin", "deploy", "invoke"]
    name: str = Field("", max_length=200)
    deployments: list[str] = Field(default_factory=list, description="invoke keys: only these deployments.")
    expires: str | None = Field(None, description="A duration (30d, 12h) or an ISO date.", max_length=64)
    rpm: StrictInt | None = Field(None, ge=1, description="Requests per minute on model routes.")
    tpm: StrictInt | None = Field(None, ge=1, description="Tokens per minute on model routes.")


def _error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": kind}}, status)


def build_control_api(plane: ControlPlane) -> FastAPI:
    app = FastAPI(title="Headway control API", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    m = plane.manager

    def need(scope: str) -> Any:
        async def check(request: Request) -> KeyRecord:
            checked = plane.gate.check(request.scope, scope)
            if isinstance(checked, Rejection):
                raise Refused(checked)
            return checked
        return Depends(check)

    def shown(status: dict[str, Any], caller: KeyRecord) -> dict[str, Any]:
        return {**status, "spec": redact(status["spec"], caller.scope == "admin")}

    async def _errors(_: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, Refused):
            r = exc.rejection
            return JSONResponse(json.loads(error_json(r)), r.status,
                                {k.decode(): v.decode() for k, v in rejection_headers(r)})
        if isinstance(exc, KeyError):
            return _error(404, "not_found", str(exc.args[0]))
        if isinstance(exc, (ValueError, PackageError)):
            return _error(400, "invalid_request", str(exc))
        raise exc

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, "not_found" if exc.status_code == 404 else "http_error",
                      f"{exc.detail}: no such control endpoint; see `headway --help`" if exc.status_code in (404, 405)
                      else str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        return _error(400, "invalid_request", f"invalid request: {problems}")

    for exc_type in (Refused, KeyError, ValueError, PackageError):
        app.add_exception_handler(exc_type, _errors)

    @app.get(PREFIX + "/openapi.json", include_in_schema=False)
    async def openapi(_: KeyRecord = need("deploy")) -> dict[str, Any]:
        return app.openapi()

    @app.get(PREFIX + "/deployments")
    async def list_deployments(caller: KeyRecord = need("deploy")) -> dict[str, Any]:
        return {"deployments": [shown(m.status(n), caller) for n in sorted(m.deployments)]}

    @app.post(PREFIX + "/deployments", status_code=201)
    async def put_deployment(body: dict[str, Any] = Body(..., description="A deployment spec (see the spec's JSON schema)."),
                       caller: KeyRecord = need("deploy")) -> JSONResponse:
        spec = validate_spec(body, "deployment spec")
        if spec.package.startswith(("./", "../")):
            raise ValueError(f"package '{spec.package}' is relative; send an absolute directory or a library "
                             "name (`headway deploy` resolves a relative one against the spec's folder)")
        created = spec.name not in m.deployments
        m.apply(spec)
        plane.sync_autoscaler()
        return JSONResponse(shown(m.status(spec.name), caller), 201 if created else 200)

    @app.get(PREFIX + "/deployments/{name}")
    async def get_deployment(name: str, caller: KeyRecord = need("deploy")) -> dict[str, Any]:
        return shown(m.status(name), caller)

    @app.delete(PREFIX + "/deployments/{name}", status_code=202)
    async def delete_deployment(name: str, caller: KeyRecord = need("deploy")) -> dict[str, Any]:
        m.delete(name)
        return shown(m.status(name), caller)

    @app.post(PREFIX + "/deployments/{name}/scale")
    async def scale_deployment(name: str, body: ScaleBody, caller: KeyRecord = need("deploy")) -> dict[str, Any]:
        m.scale(name, body.replicas)
        return shown(m.status(name), caller)

    @app.post(PREFIX + "/shutdown", status_code=202)
    async def shutdown(body: ShutdownBody | None = None, _: KeyRecord = need("admin")) -> dict[str, Any]:
        plane.stop_replicas_on_exit = (body or ShutdownBody()).stop_replicas
        asyncio.get_running_loop().call_later(0.1, os.kill, os.getpid(), signal.SIGTERM)
        return {"stopping": True, "stop_replicas": plane.stop_replicas_on_exit}

    @app.get(PREFIX + "/keys")
    async def list_keys(_: KeyRecord = need("admin")) -> dict[str, Any]:
        return {"keys": [k.public() for k in plane.store.keys()]}

    @app.post(PREFIX + "/keys", status_code=201)
    async def create_key(body: KeyCreateBody, _: KeyRecord = need("admin")) -> dict[str, Any]:
        now = time.time()
        expires = parse_expires(body.expires, now) if body.expires else None
        key, record = new_key(body.name, body.scope, now, deployments=tuple(body.deployments), expires=expires,
                              rpm=body.rpm, tpm=body.tpm)
        plane.store.put_key(record)
        plane.ring.add(record)
        return {**record.public(), "key": key}

    @app.delete(PREFIX + "/keys/{key_id}")
    async def revoke_key(key_id: str, _: KeyRecord = need("admin")) -> dict[str, Any]:
        if not plane.store.revoke_key(key_id, time.time()):
            raise KeyError(f"no key '{key_id}'; `headway keys list` shows them")
        plane.reload_keys()
        return {"id": key_id, "revoked": True}

    return app


class Refused(Exception):
    def __init__(self, rejection: Rejection):
        super().__init__(rejection.message)
        self.rejection = rejection


def body_limits(app: ASGI, max_body: int = MAX_BODY) -> ASGI:
    """Refuse a body that is not JSON (415) or larger than `max_body` bytes (413) before the app reads it."""
    async def limited(scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        has_body = (length not in (None, b"0")) or b"transfer-encoding" in headers
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if has_body and ctype != b"application/json":
            r = _error(415, "unsupported_media_type", f"the body must be JSON (Content-Type: application/json), "
                       f"got {ctype.decode('latin-1') or 'no Content-Type'}")
            await r(scope, receive, send)
            return
        too_big = _error(413, "request_too_large", f"the body exceeds the control API's limit of {max_body} bytes")
        if length is not None and length.isdigit() and int(length) > max_body:
            await too_big(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > max_body:
                raise BodyTooLarge
            return message

        try:
            await app(scope, counted, send)
        except BodyTooLarge:
            await too_big(scope, receive, send)
    return limited


class BodyTooLarge(Exception):
    pass
