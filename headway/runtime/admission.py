"""Admission control for one replica: at most `concurrency` requests run, at most `queue_size`
wait; past that a request is refused with a Retry-After estimate.

Owns the in-flight and queued counts. Invariant: 0 <= running <= concurrency and
0 <= waiting <= queue_size at every await point.
"""

from __future__ import annotations

import asyncio
import math


class Overloaded(Exception):
    def __init__(self, retry_after: int, running: int, waiting: int):
        self.retry_after = retry_after
        super().__init__(f"replica is at capacity ({running} running, {waiting} waiting); "
                         f"retry after {retry_after} s")


class Admission:
    def __init__(self, concurrency: int, queue_size: int):
        self.concurrency = concurrency
        self.queue_size = queue_size
        self._sem = asyncio.Semaphore(concurrency)
        self.running = 0
        self.waiting = 0
        self._mean_s = 1.0  # exponentially weighted request duration, for Retry-After

    def retry_after(self) -> int:
        backlog = (self.running + self.waiting) / max(self.concurrency, 1)
        return max(1, math.ceil(backlog * self._mean_s))

    async def acquire(self) -> Ticket:
        """Wait for a slot; raise Overloaded at once if the wait queue is full."""
        if self.running >= self.concurrency and self.waiting >= self.queue_size:
            raise Overloaded(self.retry_after(), self.running, self.waiting)
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        return Ticket(self, asyncio.get_running_loop().time())

    def _release(self, started: float) -> None:
        self.running -= 1
        self._sem.release()
        took = asyncio.get_running_loop().time() - started
        self._mean_s = 0.8 * self._mean_s + 0.2 * took


class Ticket:
    """A held slot; `release()` is idempotent so every exit path may call it."""

    def __init__(self, owner: Admission, started: float):
        self._owner = owner
        self._started = started
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._owner._release(self._started)
