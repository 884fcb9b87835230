"""The gate every model route of a replica passes: is the replica able to serve (loaded, its
engine alive), and is there room (admission)?

Owns the replica's serving status as routes and health see it. The server builds one Gate and
hands it to the runtime's routes (the OpenAI API), so predict and the OpenAI endpoints share one
readiness rule and one Admission: one ticket per request, whatever the route.

Status, in order: `load_failed` (load() raised), `loading`, `engine_failed` (the runtime reports
a failure after it was ready: e.g. the LLM engine's thread died), else ready. Only `loading`
invites a retry here (Retry-After); the other two are final for this replica.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from headway.runtime.admission import Admission, Overloaded, Ticket


@dataclass(frozen=True)
class Refusal:
    """Why a request cannot be served now: HTTP status, error type, message, headers."""

    status: int
    kind: str            # model_loading | model_load_failed | engine_failed | overloaded
    message: str
    retry_after: int | None = None

    @property
    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None


class Refused(Exception):
    def __init__(self, refusal: Refusal):
        super().__init__(refusal.message)
        self.refusal = refusal


class Gate:
    def __init__(self, model: str, *, loaded: Callable[[], bool], load_error: Callable[[], str | None],
                 failure: Callable[[], str | None]):
        self.model = model
        self._loaded = loaded
        self._load_error = load_error
        self._failure = failure
        self.admission: Admission | None = None   # set when the server starts (it needs the event loop)

    def reason(self) -> tuple[str, str | None] | None:
        """None when serving; else (reason, error) with reason load_failed | loading | engine_failed."""
        if (error := self._load_error()) is not None:
            return "load_failed", error
        if not self._loaded():
            return "loading", None
        if (failure := self._failure()) is not None:
            return "engine_failed", failure
        return None

    def refusal(self) -> Refusal | None:
        """What a model route answers instead of serving, or None when it may serve."""
        why = self.reason()
        if why is None:
            return None
        reason, error = why
        if reason == "load_failed":
            return Refusal(503, "model_load_failed", f"model '{self.model}' failed to load: {error}")
        if reason == "loading":
            return Refusal(503, "model_loading", f"model '{self.model}' is still loading; retry shortly", 1)
        return Refusal(503, "engine_failed", f"model '{self.model}' is out of service on this replica: its "
                       f"engine failed ({error}); the control plane replaces the replica")

    async def check(self) -> None:
        """Raise Refused unless the replica can serve (a FastAPI dependency of the runtime's routes)."""
        if (refusal := self.refusal()) is not None:
            raise Refused(refusal)

    async def admit(self) -> Ticket:
        """A slot for one request (waits in the bounded queue); raises Refused (429 + Retry-After)
        past the queue. Release the ticket on every exit path; a stream holds it to its end."""
        assert self.admission is not None, "the server has not started"
        try:
            return await self.admission.acquire()
        except Overloaded as exc:
            raise Refused(Refusal(429, "overloaded", str(exc), exc.retry_after)) from None
