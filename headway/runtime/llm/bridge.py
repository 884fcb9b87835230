"""The bridge between the engine thread and asyncio callers.

Owns the two directions of traffic and nothing else:

- in: typed commands (`AddRequest`, `Abort`, `CallOnLoop`, `InjectFault`, `Wake`) on one
  thread-safe queue, put by any thread and taken only by the engine thread;
- out: one `RequestChannel` per request. The engine thread `send`s a request's output into its
  channel during a step; `flush()` then hands the step's output of every request to each event
  loop in ONE callback per loop (waking a loop once per step, not once per request, keeps the
  GIL with the step loop). The asyncio side reads its channel with `next()`.

Failure: `fail_queued()` answers every command still queued (a request with the error, a call
with the error) so no caller waits forever; the engine sets its `failure` before calling it,
and `generate()` checks `failure` after it queues, so nothing slips in between.
"""

from __future__ import annotations

import asyncio
import enum
import queue
import uuid
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass

from headway.runtime.llm.outputs import ChoiceDelta
from headway.runtime.llm.sequence import SamplingParams


class _End(enum.Enum):
    DONE = "done"  # the request's last choice finished: its stream is over


DONE = _End.DONE

# What a channel carries: one step's deltas, the error that ends the request, or DONE.
Output = list[ChoiceDelta] | BaseException | _End


class RequestChannel:
    """One request's output, from the engine thread to the event loop that asked for it."""

    __slots__ = ("request_id", "loop", "_queue", "_outbox", "_pending", "closed")

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, pending: list[RequestChannel]) -> None:
        self.request_id = request_id
        self.loop = loop
        self._queue: asyncio.Queue[Output] = asyncio.Queue()
        self._outbox: list[Output] = []  # sent this step, not yet flushed (engine thread only)
        self._pending = pending  # the bridge's channels with output to hand over
        self.closed = False  # the asyncio side saw DONE or an error (asyncio side only)

    def send(self, item: Output) -> None:
        """Queue output for the next flush (engine thread only)."""
        if not self._outbox:
            self._pending.append(self)
        self._outbox.append(item)

    async def next(self) -> list[ChoiceDelta] | None:
        """The next step's deltas; None once the request is done; raises the error that ended it."""
        item = await self._queue.get()
        if item is DONE:
            self.closed = True
            return None
        if isinstance(item, BaseException):
            self.closed = True
            raise item
        return item


@dataclass(slots=True)
class AddRequest:
    channel: RequestChannel
    prompt_ids: list[int]
    params: SamplingParams
    cache_key: Hashable
    adapter: str | None  # a registered LoRA adapter's name; None: the base model


@dataclass(slots=True)
class Abort:
    request_id: str  # the caller left early (disconnect, cancellation): free its KV at once


@dataclass(slots=True)
class CallOnLoop:
    """Run ``fn`` on the engine thread (adapter load/unload) and settle ``future`` with its result."""

    fn: Callable[[], object]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[object]

    def settle(self, result: object, error: BaseException | None) -> None:
        self.loop.call_soon_threadsafe(_settle, self.future, result, error)


@dataclass(slots=True)
class InjectFault:
    """Make the engine thread raise outside a step, as a real bug would (tests only)."""


@dataclass(slots=True)
class Wake:
    """Nothing to do but look again (stop() puts one so a blocked loop sees it is stopping)."""


Command = AddRequest | Abort | CallOnLoop | InjectFault | Wake


def _settle(fut: asyncio.Future[object], result: object, error: BaseException | None) -> None:
    if fut.cancelled():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


def _deliver(items: list[tuple[asyncio.Queue[Output], Output]]) -> None:
    for q, item in items:
        q.put_nowait(item)


class Bridge:
    def __init__(self) -> None:
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._pending: list[RequestChannel] = []  # touched only by the engine thread

    # ---- any thread -------------------------------------------------------------------------

    def put(self, cmd: Command) -> None:
        self._commands.put(cmd)

    def open(self) -> RequestChannel:
        """A channel for a new request, delivering to the running event loop (asyncio side)."""
        return RequestChannel(uuid.uuid4().hex, asyncio.get_running_loop(), self._pending)

    # ---- the engine thread ------------------------------------------------------------------

    def commands(self, block: bool) -> Iterator[Command]:
        """The queued commands, one at a time (blocking up to 0.5 s for the first when ``block``);
        a command not yet taken when the caller stops (e.g. raises) stays queued."""
        try:
            cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            yield cmd
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def fail_queued(self, error: BaseException) -> None:
        """Answer every queued command with ``error`` (the engine thread is ending)."""
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(cmd, AddRequest):
                cmd.channel.send(error)
            elif isinstance(cmd, CallOnLoop):
                cmd.settle(None, error)

    def flush(self) -> None:
        """Hand this step's output to the event loop(s), in one callback per loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Output], Output]]] = {}
        for ch in self._pending:
            by_loop.setdefault(ch.loop, []).extend((ch._queue, item) for item in ch._outbox)
            ch._outbox = []
        self._pending.clear()
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop closed (server shutting down)
                pass
