"""HTTP wire helpers shared by the replica server, the runtimes' APIs and the router (neutral:
imports nothing of headway's layers): the error body, one server-sent event, and running a
request's work until it finishes or its client goes away, whichever comes first."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected; its work was cancelled (or its request left the router's queue)."""


def error_body(kind: str, message: str, code: int, **extra: Any) -> dict[str, Any]:
    """Headway's error object: `{"error": {"type", "message", "code", ...}}`."""
    return {"error": {"type": kind, "message": message, "code": code, **extra}}


def error_bytes(kind: str, message: str, code: int) -> bytes:
    """`error_body` serialised as the router sends it."""
    return json.dumps(error_body(kind, message, code)).encode()


def sse_event(data: Any, event: str | None = None, *, ascii_only: bool = True,
              default: Callable[[Any], Any] | None = None) -> bytes:
    """One server-sent event: an optional `event:` line, then `data:` with `data` as JSON.
    `ascii_only=False` keeps non-ASCII text as UTF-8 (the OpenAI-style streams do)."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=ascii_only, default=default)}\n\n".encode()


class _Request(Protocol):
    async def is_disconnected(self) -> bool: ...


async def cancel_on_disconnect(work: Awaitable[T], request: _Request, poll_s: float = 0.25) -> T:
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if not done and await request.is_disconnected():
                task.cancel()
                raise ClientGone()
        return task.result()
    except asyncio.CancelledError:
        task.cancel()
        raise
