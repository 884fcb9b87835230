"""The replicas behind the router and what it knows of them. Owns the in-flight counts.

Invariant (asserted in release() and check()): for every replica, `in_flight` equals the number
of leases taken on it and not yet released, and is never negative; a replica is eligible for a
deployment only while it is ready, healthy, not ejected, not draining and `in_flight < limit`.

The set is fixed for `headway route`; under the control plane replicas are added as they become
ready and removed after they drain, and the deployments it manages are known here even while they
have no replica (their requests wait in the activator instead of getting a 404).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from headway.infra.router.types import ReplicaView

log = logging.getLogger("headway.router")


@dataclass
class Replica:
    url: str
    region: str | None = None
    limit_override: int | None = None
    deployment: str | None = None           # set by the control plane; else the model the replica reports
    # from the last successful /headway/state
    model: str | None = None
    runtime: str = "custom"
    ready: bool = False
    max_concurrency: int = 1
    queued: int = 0
    published_in_flight: int = 0
    adapters: frozenset[str] = frozenset()
    aliases: frozenset[str] = frozenset()   # other names the replica answers to (optional state field)
    digest: frozenset[str] | None = None
    digest_block_tokens: int = 64
    digest_roots: tuple[tuple[str, str], ...] = ()
    kv_free_tokens: int | None = None
    prefill_tokens_per_s: float | None = None
    latency_s: float | None = None
    # health
    healthy: bool = False
    ejected: bool = False
    consecutive_failures: int = 0
    last_error: str = ""
    # owned by the router
    in_flight: int = 0
    served: int = 0
    draining: bool = False                  # takes no new request; finishes those it has

    @property
    def id(self) -> str:
        return self.url

    @property
    def key(self) -> str | None:
        """The deployment this replica serves."""
        return self.deployment or self.model or None

    @property
    def limit(self) -> int:
        return self.limit_override if self.limit_override is not None else max(1, self.max_concurrency)

    def usable(self) -> bool:
        return self.ready and self.healthy and not self.ejected and not self.draining

    def view(self) -> ReplicaView:
        return ReplicaView(id=self.url, in_flight=self.in_flight, queued=self.queued,
                           published_in_flight=self.published_in_flight,
                           max_concurrency=self.limit, adapters=self.adapters, region=self.region,
                           latency_s=self.latency_s, digest=self.digest,
                           digest_block_tokens=self.digest_block_tokens, digest_roots=self.digest_roots, kv_free_tokens=self.kv_free_tokens,
                           prefill_tokens_per_s=self.prefill_tokens_per_s)

    def apply_state(self, body: dict[str, Any], latency_s: float) -> None:
        self.model = str(body.get("model") or self.model or "")
        self.runtime = str(body.get("runtime", self.runtime))
        self.ready = bool(body.get("ready", False))
        self.max_concurrency = int(body.get("max_concurrency") or 1)
        self.queued = int(body.get("queued") or 0)
        self.published_in_flight = int(body.get("in_flight") or 0)
        self.adapters = frozenset(str(a) for a in body.get("adapters") or ())
        self.aliases = frozenset(str(a) for a in body.get("aliases") or ())
        if self.region is None and body.get("region"):
            self.region = str(body["region"])   # a region given on the command line wins
        digest = body.get("prefix_digest")
        if isinstance(digest, dict) and isinstance(digest.get("hashes"), list):
            self.digest = frozenset(str(h) for h in digest["hashes"])
            self.digest_block_tokens = int(digest.get("block_tokens") or 64)
            roots = digest.get("roots")
            self.digest_roots = tuple(sorted((str(a), str(h)) for a, h in roots.items())) if isinstance(roots, dict) else ()
        kv = body.get("kv")
        if isinstance(kv, dict) and "total_tokens" in kv:
            self.kv_free_tokens = int(kv["total_tokens"]) - int(kv.get("used_tokens", 0)) + int(kv.get("evictable_tokens", 0))
        rate = body.get("prefill_tokens_per_s")
        self.prefill_tokens_per_s = float(rate) if isinstance(rate, (int, float)) and rate > 0 else None
        self.latency_s = latency_s if self.latency_s is None else 0.7 * self.latency_s + 0.3 * latency_s


@dataclass
class ReplicaSet:
    """All replicas; eligibility, leases (in-flight counts), passive ejection, active checks."""

    replicas: list[Replica]
    eject_after: int = 3                 # consecutive failed responses (5xx) that eject a replica
    check_interval_s: float = 1.0
    check_timeout_s: float = 1.0
    managed: set[str] = field(default_factory=set)   # deployments known even with no replica
    on_remove: list[Callable[[str], None]] = field(default_factory=list)   # told the id of each replica removed
    _by_id: dict[str, Replica] = field(default_factory=dict)

    def __post_init__(self) -> None:
        urls = [r.url for r in self.replicas]
        if len(set(urls)) != len(urls):
            raise ValueError(f"each replica URL may be given once; got {urls}")
        self._by_id = {r.url: r for r in self.replicas}

    def get(self, rid: str) -> Replica:
        return self._by_id[rid]

    def find(self, rid: str) -> Replica | None:
        return self._by_id.get(rid)

    def add(self, replica: Replica) -> Replica:
        """Put a replica behind the router (the control plane, once it is ready)."""
        if replica.url in self._by_id:
            raise ValueError(f"replica {replica.url} is already routed to")
        self.replicas.append(replica)
        self._by_id[replica.url] = replica
        return replica

    def remove(self, rid: str) -> Replica | None:
        """Take a replica out of the set; its leases still in flight release harmlessly."""
        r = self._by_id.pop(rid, None)
        if r is not None:
            self.replicas.remove(r)
            for listener in self.on_remove:
                listener(rid)
        return r

    def deployments(self) -> dict[str, list[Replica]]:
        out: dict[str, list[Replica]] = {d: [] for d in self.managed}
        for r in self.replicas:
            if r.key:
                out.setdefault(r.key, []).append(r)
        return out

    def resolve(self, name: str) -> tuple[str, str | None] | None:
        """A model name to (deployment, adapter): a deployment's own name, or an adapter it serves."""
        if name in self.managed:
            return name, None
        for r in self.replicas:
            if r.key == name:
                return name, None
        for r in self.replicas:
            if r.key and name in r.aliases:
                return r.key, None
        for r in self.replicas:
            if r.key and name in r.adapters:
                return r.key, name
        return None

    def candidates(self, deployment: str) -> list[Replica]:
        return [r for r in self.replicas if r.key == deployment and r.usable()]

    def eligible(self, deployment: str, exclude: set[str], adapter: str | None = None) -> list[Replica]:
        """Replicas that may take a request now. A request naming an adapter goes only to the
        replicas that publish it, once any replica of the deployment does (a replica serves an
        adapter only after loading it), whatever the policy."""
        out = [r for r in self.replicas if r.key == deployment and r.usable()
               and r.in_flight < r.limit and r.url not in exclude]
        if adapter is not None and any(adapter in r.adapters for r in self.candidates(deployment)):
            out = [r for r in out if adapter in r.adapters]
        return out

    def in_flight(self, deployment: str) -> int:
        return sum(r.in_flight for r in self.replicas if r.key == deployment)

    def acquire(self, rid: str) -> Replica:
        r = self._by_id[rid]
        r.in_flight += 1
        return r

    def release(self, r: Replica, ok: bool) -> None:
        r.in_flight -= 1
        assert r.in_flight >= 0, f"in-flight count of {r.url} went negative"
        if ok:
            r.served += 1
            r.consecutive_failures = 0

    def failed(self, r: Replica, reason: str, *, down: bool) -> None:
        """Passive health: a connection that failed ejects at once (`down`); 5xx after `eject_after`."""
        r.consecutive_failures += 1
        r.last_error = reason
        if (down or r.consecutive_failures >= self.eject_after) and not r.ejected:
            r.ejected = True
            log.warning("ejected replica %s: %s", r.url, reason)

    def check(self) -> None:
        for r in self.replicas:
            assert r.in_flight >= 0, f"in-flight count of {r.url} is negative"

    async def check_all(self, session: aiohttp.ClientSession) -> None:
        await asyncio.gather(*(self._check_one(session, r) for r in self.replicas))

    async def run_checks(self, session: aiohttp.ClientSession) -> None:
        while True:
            await asyncio.sleep(self.check_interval_s)
            await self.check_all(session)

    async def _check_one(self, session: aiohttp.ClientSession, r: Replica) -> None:
        started = time.perf_counter()
        try:
            async with session.get(r.url + "/headway/state",
                                   timeout=aiohttp.ClientTimeout(total=self.check_timeout_s)) as resp:
                body = await resp.json(content_type=None)
                if resp.status != 200 or not isinstance(body, dict):
                    raise ValueError(f"/headway/state answered {resp.status}")
        except Exception as exc:  # any failure of the check marks the replica unhealthy
            if r.healthy:
                log.warning("replica %s failed its health check: %s", r.url, str(exc) or type(exc).__name__)
            r.healthy = False
            r.last_error = f"health check: {type(exc).__name__}: {exc}"
            return
        r.apply_state(body, time.perf_counter() - started)
        if r.ejected:
            log.info("replica %s passed its health check; back in rotation", r.url)
        r.healthy, r.ejected, r.consecutive_failures = True, False, 0

    def snapshot(self) -> list[dict[str, Any]]:
        return [{"url": r.url, "model": r.model, "deployment": r.key, "draining": r.draining, "runtime": r.runtime, "ready": r.ready, "healthy": r.healthy,
                 "ejected": r.ejected, "in_flight": r.in_flight, "limit": r.limit, "served": r.served,
                 "region": r.region, "adapters": sorted(r.adapters), "last_error": r.last_error,
                 "latency_ms": None if r.latency_s is None else round(r.latency_s * 1000, 2)}
                for r in self.replicas]
