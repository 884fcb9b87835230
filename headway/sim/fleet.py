"""The simulated deployment: replicas by phase, what each has in flight, and the eligible set.

A replica is STARTING from the moment it is asked for until `ready_at`, then READY, then
DRAINING once the autoscaler lets it go (no new requests; it finishes what it holds), then GONE.
A READY replica decodes its requests together (see `service.ServiceModel`): `v` counts the
tokens each of its requests has decoded since it came up; a request admitted at v0 needing
w steps finishes when v reaches v0 + w, and v grows at 1 / ITL(n) per second while it holds n.

Invariants (kept by `Fleet`, checked by `check()` in tests):
- `views` holds exactly the READY replicas with n < max_concurrency, and `slot[id]` is the
  index of a replica's view in it;
- `in_flight == sum(r.n for r in replicas)`, and each replica's n == len(r.fin);
- `ready`, `starting` and `draining` partition the replicas that are not GONE.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

from headway.infra.router.types import ReplicaView
from headway.sim.service import ServiceModel

STARTING, READY, DRAINING, GONE = "starting", "ready", "draining", "gone"


class Replica:
    __slots__ = ("id", "phase", "scheduled_at", "ready_at", "gone_at", "v", "v_at", "n", "fin", "version", "views")

    def __init__(self, rid: str, scheduled_at: float, ready_at: float):
        self.id = rid
        self.phase = STARTING
        self.scheduled_at = scheduled_at
        self.ready_at = ready_at
        self.gone_at: float | None = None
        self.v = 0.0                              # decode steps every held request has advanced since ready
        self.v_at = ready_at                      # when v was last brought up to date
        self.n = 0                                # requests held
        self.fin: list[tuple[float, int]] = []    # (v at which it finishes, request index), a heap
        self.version = 0                          # bumps when its next completion moves (stale events skip)
        self.views: dict[int, ReplicaView] = {}   # its view at each load, made once (views are immutable)


class Fleet:
    def __init__(self, model: ServiceModel, max_concurrency: int, schedule: Callable[[float, Replica], None]):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.model = model
        self.cap = max_concurrency
        self._schedule = schedule        # (time, replica): the loop calls complete(replica) then
        self.by_id: dict[str, Replica] = {}
        self.starting: dict[str, Replica] = {}   # insertion order = order asked for
        self.ready: dict[str, Replica] = {}
        self.draining: dict[str, Replica] = {}
        self.views: list[ReplicaView] = []
        self.slot: dict[str, int] = {}
        self.in_flight = 0
        self.all: list[Replica] = []
        self._next_id = 0

    # ---- phases -------------------------------------------------------------------------------

    def start(self, now: float, startup_s: float) -> Replica:
        r = Replica(f"r{self._next_id}", now, now + startup_s)
        self._next_id += 1
        self.by_id[r.id] = r
        self.starting[r.id] = r
        self.all.append(r)
        return r

    def mark_ready(self, r: Replica, now: float) -> bool:
        """A started replica came up; False if it was cancelled while starting."""
        if r.phase != STARTING:
            return False
        del self.starting[r.id]
        r.phase, r.v_at = READY, now
        self.ready[r.id] = r
        self._refresh(r)
        return True

    def remove(self, count: int, now: float) -> int:
        """Let `count` replicas go: starting ones first (newest first), then drain the ready
        ones holding the fewest requests. Returns how many went."""
        gone = 0
        while gone < count and self.starting:
            r = self.starting.pop(next(reversed(self.starting)))
            self._gone(r, now)
            gone += 1
        if gone < count and self.ready:
            for r in heapq.nsmallest(count - gone, self.ready.values(), key=lambda x: x.n):
                del self.ready[r.id]
                self._drop_view(r)
                gone += 1
                if r.n == 0:
                    self._gone(r, now)
                else:
                    r.phase = DRAINING
                    self.draining[r.id] = r
        return gone

    def _gone(self, r: Replica, now: float) -> None:
        r.phase, r.gone_at = GONE, now
        r.version += 1

    # ---- requests -----------------------------------------------------------------------------

    def _advance(self, r: Replica, now: float) -> None:
        if r.n:
            r.v += (now - r.v_at) / self.model.itl(r.n)
        r.v_at = now

    def _reschedule(self, r: Replica, now: float) -> None:
        r.version += 1
        if r.fin:
            self._schedule(now + max(0.0, r.fin[0][0] - r.v) * self.model.itl(r.n), r)

    def admit(self, r: Replica, request: int, prompt_tokens: int, output_tokens: int, now: float) -> float:
        """Put a request on a READY replica with room; returns its time to first token from now.
        (The hottest path of a run: `_advance` and `_reschedule` written out.)"""
        model = self.model
        a, b = model.itl_base_s, model.itl_per_seq_s
        n = r.n
        if n:
            r.v += (now - r.v_at) / (a + b * n)
        r.v_at = now
        n = r.n = n + 1
        self.in_flight += 1
        itl = a + b * n
        prefill = model.prefill_base_s + prompt_tokens / model.prefill_tokens_per_s
        # the prefill counted as steps at today's batch: one event per request, not two
        fin = r.fin
        heapq.heappush(fin, (r.v + prefill / itl + output_tokens, request))
        r.version += 1
        self._schedule(now + max(0.0, fin[0][0] - r.v) * itl, r)
        self._refresh(r)
        return prefill + itl

    def complete(self, r: Replica, now: float) -> list[int]:
        """The replica's next completion came due: the requests that finished."""
        self._advance(r, now)
        done = []
        while r.fin and r.fin[0][0] <= r.v + 1e-9:
            done.append(heapq.heappop(r.fin)[1])
        r.n -= len(done)
        self.in_flight -= len(done)
        self._reschedule(r, now)
        if r.phase == DRAINING and r.n == 0:
            del self.draining[r.id]
            self._gone(r, now)
        elif r.phase == READY:
            self._refresh(r)
        return done

    # ---- the eligible set (what the router policy sees) ---------------------------------------

    def _refresh(self, r: Replica) -> None:
        if r.n >= self.cap:
            self._drop_view(r)
            return
        view = r.views.get(r.n)
        if view is None:
            view = r.views[r.n] = ReplicaView(r.id, in_flight=r.n, published_in_flight=r.n, max_concurrency=self.cap)
        i = self.slot.get(r.id)
        if i is None:
            self.slot[r.id] = len(self.views)
            self.views.append(view)
        else:
            self.views[i] = view

    def _drop_view(self, r: Replica) -> None:
        i = self.slot.pop(r.id, None)
        if i is None:
            return
        last = self.views.pop()
        if i < len(self.views):
            self.views[i] = last
            self.slot[last.id] = i

    def check(self) -> None:
        """Assert the invariants in the module docstring (tests)."""
        eligible = {r.id for r in self.ready.values() if r.n < self.cap}
        assert {v.id for v in self.views} == eligible == set(self.slot)
        assert all(self.views[i].id == rid for rid, i in self.slot.items())
        live = [r for r in self.all if r.phase != GONE]
        assert self.in_flight == sum(r.n for r in live) and all(r.n == len(r.fin) for r in live)
        assert len(live) == len(self.ready) + len(self.starting) + len(self.draining)
