"""The HTTP API of an embeddings replica: OpenAI's POST /v1/embeddings, GET /v1/models, and
POST /embed (Hugging Face TEI's shape: a bare list of vectors, with truncate and normalize).

Owns the translation between the wire formats and `EmbedEngine.embed`: validation (inputs.py),
tokenization in the request's coroutine, pooling's post-processing (normalization as the model's
sentence-transformers pipeline says; `dimensions` keeps the first N and renormalizes), float or
base64 encoding, one admission ticket per request from the server's gate (taken after the input
is validated and tokenized, released on every exit), and cancellation when the client goes away
(499, its work dropped from the engine).
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from headway.runtime.embed.engine import EmbedEngine
from headway.runtime.embed.inputs import (
    ApiError,
    Query,
    Tokenize,
    parse_embed,
    parse_openai,
)
from headway.runtime.gate import Gate, Refused
from headway.wire import ClientGone, cancel_on_disconnect

LARGE_BODY = 64 * 1024     # bytes of request body parsed in a worker thread
LARGE_RESPONSE = 16        # vectors past which a response is serialized in a worker thread


def finish(vectors: np.ndarray, q: Query) -> np.ndarray:
    """Truncate to `dimensions` and L2-normalize (when asked, or after truncation)."""
    if q.dimensions is not None:
        vectors = vectors[:, :q.dimensions]
    if q.normalize or q.dimensions is not None:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
    return vectors.astype(np.float32, copy=False)


def _encode(vec: np.ndarray, fmt: str) -> Any:
    if fmt == "base64":
        return base64.b64encode(vec.astype("<f4").tobytes()).decode("ascii")
    return vec.tolist()


async def _respond(render: Callable[[], bytes], count: int) -> Response:
    """A JSON response; many vectors are serialized off the event loop (hundreds of ms for
    thousands of float vectors), so single-sentence requests are not held behind them."""
    body = render() if count <= LARGE_RESPONSE else await asyncio.to_thread(render)
    return Response(body, media_type="application/json")


def _refused(exc: Refused) -> JSONResponse:
    r = exc.refusal
    return JSONResponse({"error": {"message": r.message, "type": r.kind, "param": None, "code": r.kind}},
                        status_code=r.status, headers=r.headers)


class EmbeddingsAPI:
    def __init__(self, names: list[str], engine: Callable[[], EmbedEngine | None],
                 tokenize: Callable[[], Tokenize | None], gate: Gate | None = None):
        self.names = names
        self.engine = engine
        self.tokenize = tokenize
        self.gate = gate   # the server's readiness and admission (one ticket per request); None: no limit

    def _ready(self) -> tuple[EmbedEngine, Tokenize]:
        engine, tokenize = self.engine(), self.tokenize()
        if engine is None or tokenize is None:
            raise ApiError("the model is still loading; retry shortly", status=503, type="server_error")
        return engine, tokenize

    async def _body(self, request: Request) -> Any:
        raw = await request.body()
        try:   # a large body is parsed off the event loop, so small requests keep flowing
            return json.loads(raw) if len(raw) <= LARGE_BODY else await asyncio.to_thread(json.loads, raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(f"the request body is not valid JSON: {exc}") from None

    async def vectors(self, q: Query, param: str, request: Request) -> tuple[np.ndarray, int]:
        """(finished vectors, tokens embedded) for a validated query, under one admission ticket
        taken after tokenizing (a too-long input is refused before it waits for a slot)."""
        engine, tokenize = self._ready()
        ids = await tokenize(q, param)
        ticket = await cancel_on_disconnect(self.gate.admit(), request) if self.gate else None
        try:
            raw = await cancel_on_disconnect(engine.embed(ids), request)
        finally:
            if ticket is not None:
                ticket.release()
        return finish(raw, q), sum(len(s) for s in ids)

    def router(self) -> APIRouter:
        router = APIRouter()

        @router.get("/v1/models")
        async def models() -> dict[str, Any]:
            engine = self.engine()
            extra = {"dimensions": engine.spec.dimensions, "max_input_tokens": engine.spec.max_tokens} if engine else {}
            return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "headway", **extra}
                                               for n in self.names]}

        @router.post("/v1/embeddings")
        async def embeddings(request: Request) -> Response:
            try:
                body = await self._body(request)
                engine, _ = self._ready()
                q = parse_openai(body, engine.spec.dimensions, engine.spec.normalize)
                model = body.get("model", self.names[0])
                if model not in self.names:
                    raise ApiError(f"The model '{model}' does not exist; this server serves "
                                   f"{', '.join(repr(n) for n in self.names)}", status=404, param="model",
                                   code="model_not_found")
                vecs, tokens = await self.vectors(q, "input", request)
            except ApiError as exc:
                return JSONResponse(exc.body(), status_code=exc.status)
            except Refused as exc:
                return _refused(exc)
            except ClientGone:
                return Response(status_code=499)
            def render() -> bytes:
                data = [{"object": "embedding", "index": i, "embedding": _encode(v, q.encoding_format)}
                        for i, v in enumerate(vecs)]
                return json.dumps({"object": "list", "data": data, "model": model,
                                   "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}).encode()

            return await _respond(render, len(vecs))

        @router.post("/embed")
        async def embed(request: Request) -> Response:
            try:
                body = await self._body(request)
                engine, _ = self._ready()
                q = parse_embed(body, engine.spec.dimensions)
                vecs, _ = await self.vectors(q, "inputs", request)
            except ApiError as exc:
                return JSONResponse(exc.body(), status_code=exc.status)
            except Refused as exc:
                return _refused(exc)
            except ClientGone:
                return Response(status_code=499)
            return await _respond(lambda: json.dumps(vecs.tolist()).encode(), len(vecs))

        return router
