"""What the replica server asks of a runtime (custom model, LLM engine, embeddings, ...).

A runtime owns its model: loading it, answering the generic predict endpoint, adding its own
routes (the LLM runtime adds the OpenAI API), and reporting its part of /headway/state.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter


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

    def router(self) -> APIRouter | None:
        """Extra routes (e.g. /v1/chat/completions)."""
        return None

    def state(self) -> dict[str, Any]:
        """Runtime-specific fields merged into /headway/state (kv, prefix_digest, adapters...)."""
        return {}

    def metrics_text(self) -> bytes:
        """Extra Prometheus exposition appended to /metrics."""
        return b""
