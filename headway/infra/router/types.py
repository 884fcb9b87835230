"""The values policies see and return: requests, replica views, events (no I/O in here)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

ReplicaId = str

EventKind = Literal["started", "first_byte", "finished", "failed"]


@dataclass(frozen=True)
class RouteRequest:
    """What a policy may know about a request, extracted by the proxy before it decides."""

    deployment: str
    request_id: int = 0
    prompt: str = ""                          # text of the prompt (chat messages concatenated), for prefix affinity
    token_ids: tuple[int, ...] | None = None  # token ids, when the client sent them (completions prompt as ints)
    adapter: str | None = None                # LoRA adapter the request names, if any
    region: str | None = None                 # the client's region (X-Headway-Region header)


@dataclass(frozen=True)
class ReplicaView:
    """A replica as the router knows it at decision time. Only eligible replicas reach a policy."""

    id: ReplicaId
    in_flight: int = 0                         # the router's own count of requests it has on this replica
    queued: int = 0                            # the replica's last published queue depth
    published_in_flight: int = 0               # the replica's last published in_flight (all its clients)
    max_concurrency: int = 1
    adapters: frozenset[str] = frozenset()
    region: str | None = None
    latency_s: float | None = None             # measured round trip of health checks (EWMA)
    digest: frozenset[str] | None = None       # published prefix_digest hashes, if any
    digest_block_tokens: int = 64
    digest_roots: tuple[tuple[str, str], ...] = ()  # (adapter, root hash its digest chain starts from)
    kv_free_tokens: int | None = None
    prefill_tokens_per_s: float | None = None  # the replica's measured prefill rate, if it publishes one

    @property
    def load(self) -> int:
        """Requests on the replica: this router's own count is fresh, the published one also
        holds other clients' requests but is as old as the last health check. The larger of
        the two, so a request this router sent is never counted twice."""
        return max(self.in_flight, self.published_in_flight)


@dataclass(frozen=True)
class RouteEvent:
    """What happened to a routed request: started, first_byte, finished or failed, at time `at`."""

    kind: EventKind
    replica: ReplicaId
    at: float
    request: RouteRequest
    duration_s: float = 0.0                    # since `started` (for first_byte, finished, failed)


@dataclass
class DecisionStats:
    """Why a policy chose as it did, counted by reason (read by the proxy's metrics)."""

    reasons: dict[str, int] = field(default_factory=dict)
    last_reason: str = ""

    def note(self, reason: str) -> None:
        self.last_reason = reason
        self.reasons[reason] = self.reasons.get(reason, 0) + 1


class RoutingPolicy(Protocol):
    """State and time in, decision out; no I/O, no clock reads, seeded randomness."""

    name: str
    stats: DecisionStats

    def choose(self, req: RouteRequest, replicas: Sequence[ReplicaView], now: float) -> ReplicaId: ...

    def observe(self, event: RouteEvent) -> None: ...

    def forget(self, replica: ReplicaId) -> None:
        """`replica` left the router's replica set (its prefixes must not attract requests)."""


class NoReplica(Exception):
    """choose() was called with no candidates; the proxy answers 503 before that happens."""


def require(replicas: Sequence[ReplicaView]) -> None:
    if not replicas:
        raise NoReplica("no eligible replica to choose from")
