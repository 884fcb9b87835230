"""The replica server: one ASGI app around one runtime.

Owns the HTTP contract every runtime shares: predict and schema endpoints, health, Prometheus
metrics, the replica-state endpoint the infrastructure reads, admission (429 + Retry-After),
body limits (413), cancellation on disconnect, and errors inside streams as error events.
The runtime's own routes (the OpenAI API) pass the same Gate (gate.py): 503 with the reason
while the replica cannot serve, and one admission ticket per request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from headway.package.model_file import InputError
from headway.package.schema import RuntimeOptions
from headway.runtime.admission import Admission, Ticket
from headway.runtime.base import Runtime
from headway.runtime.gate import Gate, Refusal, Refused
from headway.server.body_limit import BodyLimitMiddleware, BodyTooLarge
from headway.server.faults import install_test_faults
from headway.server.metrics import ServerMetrics
from headway.server.redact import failure
from headway.wire import ClientGone, cancel_on_disconnect, error_body, sse_event

log = logging.getLogger("headway.server")


@dataclass
class Lifecycle:
    """Load progress of this replica; `ready` only after load() returned."""

    started_at: float = field(default_factory=time.monotonic)
    started_unix: float = field(default_factory=time.time)
    ready: bool = False
    error: str | None = None
    phases: dict[str, float] = field(default_factory=dict)   # seconds since the server started, per phase

    def since_start(self) -> float:
        return round(time.monotonic() - self.started_at, 3)

    def mark(self, phase: str) -> None:
        self.phases[phase] = self.since_start()


def _error(kind: str, message: str, code: int, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse(error_body(kind, message, code, **extra), status_code=code, headers=headers)


def _jsonable(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    return dump(mode="json") if callable(dump) else value


def create_app(runtime: Runtime, options: RuntimeOptions | None = None, replica_id: str | None = None) -> FastAPI:
    options = options or RuntimeOptions()
    life = Lifecycle()
    metrics = ServerMetrics(runtime.name)
    admission: Admission | None = None
    runtime.mark_phase = life.mark
    gate = Gate(runtime.name, loaded=lambda: life.ready, load_error=lambda: life.error, failure=runtime.failure)

    async def load_in_background() -> None:
        try:
            await runtime.load()
        except Exception as exc:  # one clear log entry; readiness reports the reason
            life.error = f"{type(exc).__name__}: {exc}"
            log.error("model '%s' failed to load: %s", runtime.name, life.error)
            return
        life.phases.setdefault("loaded_s", life.since_start())
        life.ready = True
        metrics.ready.set(1)
        life.mark("ready_s")
        log.info("model '%s' is ready (%.2f s)", runtime.name, life.phases["ready_s"])

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal admission
        admission = gate.admission = Admission(runtime.max_concurrency, options.queue_size)
        app.state.admission = admission
        install_test_faults(runtime)
        task = asyncio.create_task(load_in_background())
        try:
            yield
        finally:
            task.cancel()
            await runtime.shutdown()

    app = FastAPI(title=f"Headway replica: {runtime.name}", lifespan=lifespan)
    app.state.lifecycle = life
    app.state.metrics = metrics
    app.state.runtime = runtime
    app.add_middleware(BodyLimitMiddleware, max_bytes=options.max_request_body)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return _error("request_too_large", f"request body exceeds the limit of {options.max_request_body} "
                      "bytes (runtime_options.max_request_body in headway.yaml)", 413)

    def refused(refusal: Refusal) -> JSONResponse:
        # OpenAI's error shape (message, type, param, code) plus the HTTP status as `code`
        return _error(refusal.kind, refusal.message, refusal.status, refusal.headers, param=None)

    @app.exception_handler(Refused)
    async def _refused(request: Request, exc: Refused) -> JSONResponse:
        return refused(exc.refusal)

    @app.get("/health/live")
    async def live() -> dict[str, Any]:
        return {"live": True}

    @app.get("/health/ready")
    async def ready() -> Response:
        why = gate.reason()
        if why is None:
            return JSONResponse({"ready": True, "model": runtime.name})
        body = {"ready": False, "model": runtime.name, "reason": why[0]}
        if why[1] is not None:
            body["error"] = why[1]
        return JSONResponse(body, status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        if admission is not None:
            metrics.in_flight.set(admission.running)
            metrics.queued.set(admission.waiting)
        metrics.ready.set(1 if gate.reason() is None else 0)
        return Response(metrics.render() + runtime.metrics_text(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/headway/state")
    async def state() -> dict[str, Any]:
        why = gate.reason()
        body: dict[str, Any] = {
            "ready": why is None, "runtime": runtime.kind, "model": runtime.name,
            "max_concurrency": runtime.max_concurrency,
            "startup": {**life.phases, **runtime.startup, "server_started_unix": round(life.started_unix, 3)},
        }
        if replica_id:
            body["replica_id"] = replica_id
        if why is not None:
            body["reason"] = why[0]
            if why[1] is not None:
                body["error"] = why[1]
        if life.ready:
            body.update(runtime.state())
        # requests (every route: predict and the runtime's own) running and waiting for a slot;
        # the server's count, never a runtime's (the router and autoscaler read these two)
        body["in_flight"] = admission.running if admission else 0
        body["queued"] = admission.waiting if admission else 0
        return body

    def check_name(name: str) -> JSONResponse | None:
        if name != runtime.name:
            return _error("model_not_found", f"model '{name}' is not served here; this replica serves "
                          f"'{runtime.name}'", 404)
        return None

    @app.get("/v1/models/{name}/schema")
    async def schema(name: str) -> Response:
        if (bad := check_name(name)) is not None:
            return bad
        if (refusal := gate.refusal()) is not None:
            return refused(refusal)
        return JSONResponse({"model": runtime.name, "input": runtime.input_schema()})

    @app.post("/v1/models/{name}:predict")
    async def predict(name: str, request: Request) -> Response:
        started = time.perf_counter()
        response = await _predict(name, request)
        if not isinstance(response, StreamingResponse):
            metrics.observe("predict", response.status_code, time.perf_counter() - started)
        return response

    async def _predict(name: str, request: Request) -> Response:
        if (bad := check_name(name)) is not None:
            return bad
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else {}
        except json.JSONDecodeError as exc:
            return _error("invalid_json", f"request body is not valid JSON: {exc}", 400)
        if (refusal := gate.refusal()) is not None:
            return refused(refusal)
        try:
            inputs = runtime.parse(body)
        except InputError as exc:
            return _error("invalid_input", f"input does not match the model's schema: {exc}", 422,
                          details=exc.errors)
        try:
            ticket = await gate.admit()
        except Refused as exc:
            return refused(exc.refusal)
        if runtime.streams(inputs):
            return _stream_response(inputs, ticket, request)
        try:
            return await _run_unary(inputs, request)
        finally:
            ticket.release()

    async def _run_unary(inputs: Any, request: Request) -> Response:
        try:
            result = await cancel_on_disconnect(runtime.predict(inputs), request)
        except ClientGone:
            log.info("client disconnected; cancelled its request")
            return Response(status_code=499)
        except Exception as exc:
            if (refusal := gate.refusal()) is not None:  # the runtime failed under this request
                return refused(refusal)
            log.error("predict failed: %s (the message went to the caller only)", failure(exc))
            return _error("model_error", f"{type(exc).__name__}: {exc}", 500)
        return JSONResponse(_jsonable(result))

    def _stream_response(inputs: Any, ticket: Ticket, request: Request) -> StreamingResponse:
        started = time.perf_counter()
        status = {"code": 200}

        async def events() -> AsyncIterator[bytes]:
            stream = runtime.stream(inputs)
            try:
                while True:
                    try:
                        item = await asyncio.wait_for(anext(stream), options.streaming_read_timeout)
                    except StopAsyncIteration:
                        break
                    yield sse_event(_jsonable(item), default=str)
                yield b"data: [DONE]\n\n"
            except asyncio.TimeoutError:
                status["code"] = 504
                yield sse_event(error_body("stream_timeout", f"the model produced nothing for "
                                           f"{options.streaming_read_timeout} s", 504), event="error", default=str)
            except asyncio.CancelledError:
                status["code"] = 499
                raise
            except Exception as exc:
                status["code"] = 500
                log.error("stream failed: %s (the message went to the caller only)", failure(exc))
                yield sse_event(error_body("model_error", f"{type(exc).__name__}: {exc}", 500), event="error", default=str)
            finally:
                ticket.release()
                await stream.aclose()  # type: ignore[attr-defined]
                metrics.observe("predict", status["code"], time.perf_counter() - started)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 # a stream cancelled before it started never runs its finally
                                 background=BackgroundTask(ticket.release))

    extra = runtime.router(gate)
    if extra is not None:  # every runtime route answers 503 with the reason while it cannot serve
        app.include_router(extra, dependencies=[Depends(gate.check)])
    return app
