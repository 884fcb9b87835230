"""Forwarding one request to a replica: choose, take a lease, send, retry before the first byte.

Owns the policies (one per deployment) and the pooled HTTP client. A request that fails before
its first byte (connection refused or reset, a 429/502/503/504 answer while another replica is
eligible) is retried on a replica not yet tried, up to `max_attempts`; once `open()` returns, the
first body chunk is in hand and nothing has been sent to the client yet.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp.typedefs import LooseHeaders

from headway.infra.router.metrics import RouterMetrics
from headway.infra.router.policies import LLM_DEFAULT, OTHER_DEFAULT, make_policy
from headway.infra.router.replicas import Replica, ReplicaSet
from headway.infra.router.tokenize import PromptTokenizer
from headway.infra.router.types import EventKind, RouteEvent, RouteRequest, RoutingPolicy
from headway.tls import client_context

RETRYABLE_STATUS = frozenset({429, 502, 503, 504})


@dataclass
class RouterConfig:
    policy: str | None = None            # None: predicted-latency for LLM deployments, least-load otherwise
    seed: int = 0
    max_attempts: int = 3
    retry_after_s: int = 1
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 300.0        # longest silence from a replica mid-response
    policy_options: dict[str, Any] | None = None
    deployment_policies: dict[str, str] | None = None  # per deployment, over `policy` and the defaults
    tokenizers: dict[str, PromptTokenizer] | None = None  # per deployment: exact prompt token ids
    auto_tokenizer: bool = True          # fetch an LLM deployment's tokenizer from its replicas (tokenizer_fetch)
    ca_file: str | None = None           # CA bundle trusted for https:// replicas (None: the system's store)


class NoCapacity(Exception):
    """No replica can take the request (all down, ejected, or at their concurrency limit)."""


@dataclass
class Opened:
    replica: Replica
    resp: aiohttp.ClientResponse
    first: bytes
    req: RouteRequest
    started: float                        # monotonic time the lease was taken
    upstream_s: float                     # request sent -> first chunk, on the attempt that succeeded
    policy: RoutingPolicy


class Forwarder:
    def __init__(self, replicas: ReplicaSet, metrics: RouterMetrics, config: RouterConfig,
                 on_release: Callable[[str], None] | None = None):
        self.replicas = replicas
        self.metrics = metrics
        self.config = config
        self.on_release = on_release     # capacity of a deployment freed (wakes the activator's waiters)
        self.policies: dict[str, RoutingPolicy] = {}
        self.session: aiohttp.ClientSession | None = None
        self._ids = itertools.count(1)
        replicas.on_remove.append(self.forget)

    def forget(self, rid: str) -> None:
        """A replica left the set: every policy drops what it keeps about it (its prefixes)."""
        for policy in self.policies.values():
            policy.forget(rid)

    def start(self) -> aiohttp.ClientSession:
        tls = client_context(self.config.ca_file) if self.config.ca_file else True   # True: the system's trust store
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30, ttl_dns_cache=300, ssl=tls)
        timeout = aiohttp.ClientTimeout(total=None, connect=self.config.connect_timeout_s,
                                        sock_read=self.config.read_timeout_s)
        self.session = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False,
                                             skip_auto_headers=("User-Agent",))
        return self.session

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    def next_id(self) -> int:
        return next(self._ids)

    def policy_for(self, deployment: str) -> RoutingPolicy:
        policy = self.policies.get(deployment)
        if policy is None:
            name = (self.config.deployment_policies or {}).get(deployment, self.config.policy)
            if name is None:
                llm = any(r.runtime == "llm" for r in self.replicas.replicas if r.key == deployment)
                name = LLM_DEFAULT if llm else OTHER_DEFAULT
            policy = make_policy(name, seed=self.config.seed + len(self.policies), **(self.config.policy_options or {}))
            self.policies[deployment] = policy
        return policy

    async def open(self, req: RouteRequest, method: str, path_qs: str, headers: LooseHeaders, body: bytes) -> Opened:
        dep = req.deployment
        if not self.replicas.candidates(dep):
            raise NoCapacity(f"no replica of '{dep}' is healthy and ready")
        assert self.session is not None, "Forwarder.start() was not called"
        policy = self.policy_for(dep)
        tried: set[str] = set()
        same_again = False
        attempts = 0
        last_error = ""
        for attempt in range(self.config.max_attempts):
            picked = self.pick(req, policy, tried)
            if picked is None:
                break
            rep, now = picked
            rid = rep.url
            attempts += 1
            sent = time.perf_counter()
            try:
                resp = await self.session.request(method, rep.url + path_qs, headers=headers, data=body)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                refused = isinstance(exc, aiohttp.ClientConnectorError)
                last_error = f"{rep.url}: {type(exc).__name__}: {exc}"
                self.replicas.failed(rep, last_error, down=refused)
                self.failed(rep, req, policy, now, "connect" if refused else "disconnect")
                if not refused and not same_again and not self.replicas.eligible(dep, tried, req.adapter):
                    same_again = True      # a pooled connection may have gone stale: one fresh try on it
                    tried.discard(rid)
                continue
            except BaseException:
                self.release(rep, ok=False)
                raise
            if (resp.status in RETRYABLE_STATUS and attempt + 1 < self.config.max_attempts
                    and self.replicas.eligible(dep, tried, req.adapter)):
                last_error = f"{rep.url} answered {resp.status}"
                if resp.status != 429:
                    self.replicas.failed(rep, last_error, down=False)
                resp.release()
                self.failed(rep, req, policy, now, f"status_{resp.status}")
                continue
            try:
                first = await resp.content.readany()
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                last_error = f"{rep.url}: {type(exc).__name__} before the first byte: {exc}"
                self.replicas.failed(rep, last_error, down=False)
                resp.close()
                self.failed(rep, req, policy, now, "disconnect")
                continue
            except BaseException:
                resp.close()
                self.release(rep, ok=False)
                raise
            upstream_s = time.perf_counter() - sent
            policy.observe(RouteEvent("first_byte", rid, time.monotonic(), req, time.monotonic() - now))
            return Opened(rep, resp, first, req, now, upstream_s, policy)
        if last_error:
            raise NoCapacity(f"no replica of '{dep}' could take the request after {attempts} attempt(s); "
                             f"last error: {last_error}")
        raise NoCapacity(f"every replica of '{dep}' is at its concurrency limit")

    def pick(self, req: RouteRequest, policy: RoutingPolicy, tried: set[str]) -> tuple[Replica, float] | None:
        """Choose among the eligible replicas not yet in `tried`, lease the chosen one and tell
        the policy it started; None when none is left. Returns the replica and the start time."""
        eligible = self.replicas.eligible(req.deployment, tried, req.adapter)
        if not eligible:
            return None
        now = time.monotonic()
        rid = policy.choose(req, [r.view() for r in eligible], now)
        self.metrics.count_decision(req.deployment, policy.name, policy.stats.last_reason)
        rep = self.replicas.acquire(rid)
        tried.add(rid)
        policy.observe(RouteEvent("started", rid, now, req))
        return rep, now

    def release(self, rep: Replica, ok: bool) -> None:
        """Give a lease back; requests waiting in the activator for the deployment are woken."""
        self.replicas.release(rep, ok)
        if self.on_release is not None and rep.key:
            self.on_release(rep.key)

    def failed(self, rep: Replica, req: RouteRequest, policy: RoutingPolicy, started: float, reason: str) -> None:
        """An attempt that will be retried elsewhere: lease back, policy told, retry counted."""
        self.release(rep, ok=False)
        now = time.monotonic()
        policy.observe(RouteEvent("failed", rep.url, now, req, now - started))
        self.metrics.retries.labels(req.deployment, reason).inc()

    def finish(self, opened: Opened, ok: bool) -> None:
        """Release the lease of an opened request and tell its policy how it ended. A 5xx
        answer counts toward passive ejection like a broken connection does."""
        status = opened.resp.status
        self.release(opened.replica, ok and status < 500)
        if ok and status >= 500:
            self.replicas.failed(opened.replica, f"{opened.replica.url} answered {status}", down=False)
        now = time.monotonic()
        kind: EventKind = "finished" if ok else "failed"
        opened.policy.observe(RouteEvent(kind, opened.replica.url, now, opened.req, now - opened.started))
        if ok:
            opened.resp.release()
        else:
            opened.resp.close()
