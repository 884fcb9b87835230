"""The activator queue: requests that find no replica able to take them wait here, not in an error.

A deployment scaling from zero, or whose replicas are all at their concurrency limit, holds its
requests in a bounded queue until capacity appears (a replica becomes ready, a lease is released)
or the request's wait times out (503 with a message saying how long it waited and why). The
number waiting is what the autoscaler adds to in-flight concurrency, so a queue at zero replicas
is what makes the deployment scale from zero.

Invariant: `queued(d)` equals the number of `hold(d)` contexts entered and not yet left, never
above the deployment's queue size.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any  # a future whose result is never read (only done())
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from headway.wire import ClientGone


class ActivatorFull(Exception):
    """The deployment's queue already holds its maximum of waiting requests."""


class ActivatorTimeout(Exception):
    """The request waited its whole timeout without a replica taking it."""


@dataclass(frozen=True)
class QueueLimits:
    size: int = 1000
    timeout_s: float = 120.0


class Ticket:
    """One waiting request: `wait()` returns when capacity may have appeared."""

    def __init__(self, activator: Activator, deployment: str, deadline: float):
        self._activator = activator
        self.deployment = deployment
        self.deadline = deadline
        self.waited = False

    async def wait(self, gone: asyncio.Future[Any] | None = None) -> None:
        """Until capacity may have appeared; `ClientGone` as soon as `gone` (the client's
        disconnect) is done, `ActivatorTimeout` at the deadline."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise ActivatorTimeout(self.deployment)
        if gone is not None and gone.done():
            raise ClientGone(self.deployment)
        self.waited = True
        woken = asyncio.ensure_future(self._activator._event(self.deployment).wait())
        try:
            waiters: set[asyncio.Future[Any]] = {woken} if gone is None else {woken, gone}
            await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
        if woken.done() and not woken.cancelled():
            return
        if gone is not None and gone.done():
            raise ClientGone(self.deployment)
        raise ActivatorTimeout(self.deployment)


class Activator:
    def __init__(self) -> None:
        self.limits: dict[str, QueueLimits] = {}
        self._queued: dict[str, int] = {}
        self._events: dict[str, asyncio.Event] = {}

    def manage(self, deployment: str, limits: QueueLimits) -> None:
        self.limits[deployment] = limits

    def forget(self, deployment: str) -> None:
        self.limits.pop(deployment, None)
        self.notify(deployment)

    def manages(self, deployment: str) -> bool:
        return deployment in self.limits

    def queued(self, deployment: str) -> int:
        return self._queued.get(deployment, 0)

    def _event(self, deployment: str) -> asyncio.Event:
        event = self._events.get(deployment)
        if event is None:
            event = self._events[deployment] = asyncio.Event()
        return event

    def notify(self, deployment: str) -> None:
        """Capacity for `deployment` may have appeared: wake every waiter to try again."""
        event = self._events.pop(deployment, None)
        if event is not None:
            event.set()

    @asynccontextmanager
    async def hold(self, deployment: str) -> AsyncIterator[Ticket]:
        limits = self.limits.get(deployment, QueueLimits())
        n = self._queued.get(deployment, 0)
        if n >= limits.size:
            raise ActivatorFull(f"'{deployment}' already has {n} requests waiting for a replica "
                                f"(activator.queue_size {limits.size})")
        self._queued[deployment] = n + 1
        try:
            yield Ticket(self, deployment, time.monotonic() + limits.timeout_s)
        finally:
            self._queued[deployment] -= 1
            assert self._queued[deployment] >= 0
