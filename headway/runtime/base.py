"""What the replica server asks of a runtime (custom model, LLM engine, embeddings, ...).

A runtime owns its model: loading it, answering the generic predict endpoint, adding its own
routes (the LLM runtime adds the OpenAI API), and reporting its part of /headway/state.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter

if TYPE_CHECKING:
    from headway.runtime.gate import Gate


class Runtime:
    kind: str = "custom"

    def __init__(self, name: str, max_concurrency: int):
        self.name = name
        self.max_concurrency = max_concurrency
        # load() may report startup phases on the server's clock (the server binds mark_phase to
        # its lifecycle) and facts (e.g. the weight fetch); both land in /headway/state "startup".
        self.mark_phase: Callable[[str], None] = lambda phase: None
        self.startup: dict[str, Any] = {}

    async def load(self) -> None:
        """Load the model. Called once, in the background, after the server starts listening."""

    async def shutdown(self) -> None:
        """Release what load() took (engine threads, files)."""

    def input_schema(self) -> dict[str, Any]:
        return {"type": "object"}

    def parse(self, body: Any) -> Any:
        """Validate a predict body; raise headway.package.model_file.InputError on bad input."""
        return body

    def streams(self, inputs: Any) -> bool:
        return False

    async def predict(self, inputs: Any) -> Any:
        raise NotImplementedError

    def stream(self, inputs: Any) -> AsyncIterator[Any]:
        raise NotImplementedError

    def router(self, gate: Gate) -> APIRouter | None:
        """Extra routes (e.g. /v1/chat/completions). The server refuses them while the replica
        cannot serve (loading, failed); a route that runs a model takes a ticket from
        `gate.admit()` per request, as predict does."""
        return None

    def failure(self) -> str | None:
        """Why the loaded model can no longer serve (e.g. its engine thread died), else None.
        The server then reports not ready and refuses every model route with 503."""
        return None

    def inject_fault(self) -> bool:
        """Break the runtime as a real bug would (tests only; HEADWAY_TEST_FAULTS=1 + SIGUSR1).
        False when this runtime has nothing to break."""
        return False

    def state(self) -> dict[str, Any]:
        """Runtime-specific fields merged into /headway/state (kv, prefix_digest, adapters...)."""
        return {}

    def metrics_text(self) -> bytes:
        """Extra Prometheus exposition appended to /metrics."""
        return b""


class EngineRuntime(Runtime):
    """A runtime whose model runs on an engine thread it owns (`self.engine`, set by load()):
    the engine's `stop()`, `failure` and `inject_fault()` are the runtime's shutdown, failure and
    fault hook."""

    engine: Any = None

    async def shutdown(self) -> None:
        if self.engine is not None:
            await asyncio.to_thread(self.engine.stop)

    def failure(self) -> str | None:
        return self.engine.failure if self.engine is not None else None

    def inject_fault(self) -> bool:
        if self.engine is None:
            return False
        self.engine.inject_fault()
        return True
