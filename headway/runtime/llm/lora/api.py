"""The adapter endpoints of an LLM replica (vLLM's names and bodies):

    POST /v1/load_lora_adapter    {"lora_name": "sql", "lora_path": "/adapters/sql"}
    POST /v1/unload_lora_adapter  {"lora_name": "sql"}

400 for a bad body or an adapter directory that does not fit the base model, 403 for a path
outside the server's adapter roots (or any path when it has none; see roots.py), 404 for
unloading an unknown name, 409 for loading a name that is already loaded. Errors have OpenAI's shape.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from headway.runtime.llm.errors import EngineError
from headway.runtime.llm.lora.adapter import AdapterError
from headway.runtime.llm.lora.roots import allowed_adapter_path
from headway.runtime.llm.openai_api import wire_error
from headway.runtime.llm.openai_types import OpenAIError


async def _body(request: Request, fields: tuple[str, ...]) -> dict[str, str]:
    example = {"lora_name": "sql", "lora_path": "/adapters/sql"}
    want = json.dumps({k: example[k] for k in fields})
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OpenAIError(f"the request body is not valid JSON ({exc}); expected {want}") from None
    if not isinstance(body, dict):
        raise OpenAIError(f"expected a JSON object like {want}")
    bad = [k for k in fields if not isinstance(body.get(k), str) or not body[k].strip()]
    if bad:
        raise OpenAIError(f"{', '.join(bad)} must be non-empty strings; expected a body like {want}", param=bad[0])
    return {k: body[k] for k in fields}


def lora_router(engine: Callable[[], Any], roots: Sequence[Path] = ()) -> APIRouter:
    """The load/unload routes over ``engine()`` (the LLMEngine, None while loading); adapters load
    only from under ``roots`` (resolved directories; none: loading from a path is refused)."""
    router = APIRouter()

    async def run(request: Request, fields: tuple[str, ...], action: str) -> JSONResponse:
        try:
            eng = engine()
            if eng is None:
                raise OpenAIError("the model is still loading; retry shortly", status=503, type="server_error")
            body = await _body(request, fields)
            name = body["lora_name"]
            if action == "load":
                await eng.load_adapter(name, allowed_adapter_path(body["lora_path"], roots))
            else:
                await eng.unload_adapter(name)
        except OpenAIError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        except EngineError as exc:  # not running, or failed
            err = wire_error(exc)
            return JSONResponse(err.body(), status_code=err.status)
        except AdapterError as exc:
            err = OpenAIError(str(exc), status=exc.status, param="lora_path" if exc.status in (400, 403) else "lora_name")
            return JSONResponse(err.body(), status_code=err.status)
        return JSONResponse({"object": "lora_adapter", "id": name, "status": "loaded" if action == "load" else "unloaded",
                             "adapters": list(eng.loras.names)})

    @router.post("/v1/load_lora_adapter")
    async def load(request: Request) -> JSONResponse:
        return await run(request, ("lora_name", "lora_path"), "load")

    @router.post("/v1/unload_lora_adapter")
    async def unload(request: Request) -> JSONResponse:
        return await run(request, ("lora_name",), "unload")

    return router
