"""Run a request's work until it finishes or its client goes away, whichever comes first."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Protocol, TypeVar

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected; its work was cancelled."""


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
