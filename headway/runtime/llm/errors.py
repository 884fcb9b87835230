"""The engine's own errors: what a caller of `LLMEngine` may be told, in the engine's words.

No wire format here: `openai_api.py` turns these into OpenAI's error body (`wire_error`), and any
other front end may turn them into its own. `status` is the HTTP status they map to, a hint for
those front ends. A LoRA adapter that cannot serve a request raises `lora.AdapterError` (with its
own status), not one of these.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of the engine's errors; ``status`` is the HTTP status a server should answer with."""

    status: int = 500
    code: str | None = None  # a stable machine-readable name, where clients act on it

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class EngineUnavailable(EngineError):
    """The engine takes no requests: it is not running, or it is shutting down (503)."""

    status = 503


class EngineFailed(EngineUnavailable):
    """The engine thread died; this replica is out of service until it is replaced (503,
    code ``engine_failed``). ``failure`` says why (the exception's type and message)."""

    code = "engine_failed"

    def __init__(self, failure: str) -> None:
        super().__init__(f"the engine failed and this replica is out of service: {failure}")
        self.failure = failure


class InvalidRequest(EngineError, ValueError):
    """The engine refused a request it was handed (400); ``param`` names the offending part."""

    status = 400

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
