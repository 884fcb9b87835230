"""The replica manager: keeps each deployment at its desired replica count, and owns every
replica's lifecycle (starting -> ready -> draining -> stopped, or failed) and its place behind the
router.

- A replica is routed to only once it says it is ready; the activator's waiters are woken then.
- Scaling down removes starting replicas first (nothing to drain), then drains serving ones: the
  router stops sending them requests, and they are stopped once their in-flight count reaches
  zero (or the drain timeout passes).
- A spec change that needs new replicas (package, arguments, resources) bumps the deployment's
  generation: new replicas start, and the old ones drain once enough new ones are ready.
- A replica whose process (or Ray actor) died is taken out and replaced; a deployment whose
  replicas keep failing to start backs off (1, 2, 4 ... 60 s) instead of crash-looping.
- A serving replica whose process lives on but that stops being ready (its engine failed) is
  stopped and replaced too: at once when its state says `engine_failed`, else after
  UNREADY_CHECKS consecutive not-ready answers, one health interval apart.

Invariant (asserted in check()): every replica behind the router for a managed deployment is a
live replica here in phase ready or draining; every live replica is in the store.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from headway.infra.fleet.providers.base import Launch, Provider
from headway.infra.fleet.roots import allowed_package
from headway.infra.fleet.spec import DeploymentSpec
from headway.infra.fleet.store import DeploymentRow, ReplicaRow, Store
from headway.infra.router.activator import QueueLimits
from headway.infra.router.proxy import RouterApp
from headway.infra.router.replicas import Replica

log = logging.getLogger("headway.fleet")

_REPLACING_FIELDS = ("package", "serve_args", "env", "resources")
UNREADY_CHECKS = 3   # consecutive not-ready answers of a serving replica before it is replaced


@dataclass
class _Deployment:
    row: DeploymentRow
    desired: int                      # from the autoscaler (or manual / min until it first decides)
    reason: str = "initial"
    failures: int = 0                 # starts in a row that failed
    next_start_at: float = 0.0        # monotonic; backoff after failures
    events: list[tuple[float, str]] = field(default_factory=list)

    @property
    def spec(self) -> DeploymentSpec:
        return self.row.spec

    def target(self) -> int:
        if self.row.deleting:
            return 0
        return self.row.manual if self.row.manual is not None else self.desired

    def event(self, text: str) -> None:
        text = self.spec.redact(text)
        self.events.append((time.time(), text))
        del self.events[:-50]
        log.info("%s: %s", self.row.name, text)


class ReplicaManager:
    def __init__(self, store: Store, provider: Provider, router: RouterApp, *, poll_s: float = 0.1,
                 package_roots: Sequence[Path] | None = None):
        """package_roots: where package directories may be (see roots.py); the control plane always
        passes its list (empty: library names and remote weights only); None checks nothing."""
        self.store = store
        self.package_roots = None if package_roots is None else tuple(package_roots)
        self.provider = provider
        self.router = router
        self.poll_s = poll_s
        self.deployments: dict[str, _Deployment] = {}
        self.live: dict[str, ReplicaRow] = {}          # starting, ready, draining
        self._drain_started: dict[str, float] = {}
        self._busy: set[str] = set()                   # replicas with a start/stop call in flight
        self._unready: dict[str, tuple[float, int]] = {}  # serving replica -> (last check, not-ready streak)

    # --- deployments ----------------------------------------------------------------------------
    async def restore(self) -> None:
        """After a (re)start: the deployments and replicas the store remembers; live ones adopted
        (serving ones go straight back behind the router, checked before the first request), and
        each deployment keeps the count it adopted (the autoscaler resumes from there)."""
        for row in self.store.deployments():
            self._register(row)
        for r in self.store.replicas(live_only=True):
            if r.deployment in self.deployments and self.provider.alive(r.handle):
                self.live[r.id] = r
                if r.phase == "draining":
                    self._drain_started[r.id] = time.monotonic()
                if r.phase in ("ready", "draining") and r.url:
                    rep = self.router.replicas.add(Replica(r.url, deployment=r.deployment))
                    rep.draining = r.phase == "draining"
                self.deployments[r.deployment].event(f"adopted replica {r.id} ({r.url}, {r.phase})")
            else:
                r.phase, r.ended_at = "failed", time.time()
                r.error = r.error or "gone while the control plane was down"
                self.store.put_replica(r)
        for name, dep in self.deployments.items():
            # keep what was adopted until the autoscaler (resumed from its saved state) decides
            # otherwise: starting from replicas.min would drain the surplus at once
            adopted = sum(self.counts(name))
            dep.desired = min(max(adopted, dep.spec.replicas.min), dep.spec.replicas.max)
            dep.reason = "resumed"
        session = self.router.forwarder.session
        if session is not None:
            await self.router.replicas.check_all(session)

    def check_package(self, spec: DeploymentSpec) -> str:
        """The package as a replica gets it; PackageNotAllowed (a ValueError) when outside the roots."""
        return spec.package if self.package_roots is None else allowed_package(spec.package, self.package_roots)

    def apply(self, spec: DeploymentSpec) -> DeploymentRow:
        """Create or update a deployment (refused, changing nothing, if its package is not allowed)."""
        self.check_package(spec)
        old = self.store.deployment(spec.name)
        replace = old is not None and any(getattr(old.spec, f) != getattr(spec, f) for f in _REPLACING_FIELDS)
        row = self.store.put_deployment(spec, bump_generation=replace)
        if old is not None and old.manual is not None:
            self.store.set_manual(spec.name, old.manual)
            row.manual = old.manual
        dep = self._register(row)
        dep.event("updated: new replicas replace the old ones" if replace else
                  "updated" if old is not None else "created")
        return row

    def _register(self, row: DeploymentRow) -> _Deployment:
        spec = row.spec
        dep = self.deployments.get(row.name)
        if dep is None:
            dep = self.deployments[row.name] = _Deployment(row, desired=spec.replicas.min)
        else:
            dep.row = row
            dep.desired = min(max(dep.desired, spec.replicas.min), spec.replicas.max)
        self.router.replicas.managed.add(row.name)
        self.router.activator.manage(row.name, QueueLimits(spec.activator.queue_size, spec.activator.timeout_s))
        policies = dict(self.router.config.deployment_policies or {})
        if spec.router_policy:
            policies[row.name] = spec.router_policy
        else:
            policies.pop(row.name, None)
        self.router.config.deployment_policies = policies
        self.router.forwarder.policies.pop(row.name, None)   # rebuilt with the new setting on next use
        return dep

    def scale(self, name: str, replicas: int | None) -> None:
        dep = self._get(name)
        spec = dep.spec
        if replicas is not None and not 0 <= replicas <= spec.replicas.max:
            raise ValueError(f"replicas must be between 0 and replicas.max ({spec.replicas.max}) of '{name}', "
                             f"got {replicas}; raise replicas.max in the spec to go higher")
        self.store.set_manual(name, replicas)
        dep.row.manual = replicas
        dep.event(f"scaled by hand to {replicas}" if replicas is not None else "back to autoscaling")

    def delete(self, name: str) -> None:
        dep = self._get(name)
        self.store.mark_deleting(name)
        dep.row.deleting = True
        dep.event("deleting: draining every replica")

    def set_desired(self, name: str, desired: int, reason: str) -> None:
        dep = self.deployments.get(name)
        if dep is not None:
            if desired != dep.desired:
                dep.event(f"autoscaler: {dep.desired} -> {desired} replicas ({reason})")
            dep.desired, dep.reason = desired, reason

    def _get(self, name: str) -> _Deployment:
        dep = self.deployments.get(name)
        if dep is None:
            known = ", ".join(sorted(self.deployments)) or "none"
            raise KeyError(f"no deployment named '{name}' (deployments: {known})")
        return dep

    # --- counts the autoscaler reads ------------------------------------------------------------
    def counts(self, name: str) -> tuple[int, int]:
        """(ready, starting) replicas of the deployment's current generation."""
        gen = self.deployments[name].row.generation
        mine = [r for r in self.live.values() if r.deployment == name and r.generation == gen]
        return sum(r.phase == "ready" for r in mine), sum(r.phase == "starting" for r in mine)

    def measured_startup_s(self, name: str) -> float | None:
        """Median scheduled -> ready time of the deployment's last replicas, if any became ready."""
        times = [r.ready_at - r.scheduled_at for r in self.store.replicas(name)[-10:] if r.ready_at]
        return statistics.median(times) if times else None

    # --- the loop -------------------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:   # the loop must outlive any one bad tick; the error is logged
                log.exception("replica manager tick failed")
            await asyncio.sleep(self.poll_s)

    async def tick(self) -> None:
        session = self.router.forwarder.session
        assert session is not None
        await asyncio.gather(*(self._watch(session, r) for r in list(self.live.values()) if r.id not in self._busy))
        for name in list(self.deployments):
            self._reconcile(self.deployments[name])

    async def _watch(self, session: aiohttp.ClientSession, r: ReplicaRow) -> None:
        if not self.provider.alive(r.handle):
            tail = self._redact(r.deployment, self.provider.log_tail(r.handle))
            self._stop(r, "failed", f"the replica process exited; its log ends:\n{tail}")
            return
        if r.phase == "starting":
            if r.url is None:
                r.url = self.provider.url(r.handle)
                if r.url is None:
                    return
                self.store.put_replica(r)
            body = await _state(session, r.url)
            if body is not None and body.get("error"):
                self._stop(r, "failed", self._redact(r.deployment, f"the model failed to load: {body['error']}"))
            elif body is not None and body.get("ready"):
                self._became_ready(r, body)
        elif r.phase == "ready":
            await self._check_serving(session, r)
        elif r.phase == "draining":
            routed = self.router.replicas.find(r.url or "")
            waited = time.monotonic() - self._drain_started.get(r.id, time.monotonic())
            timeout = self.deployments[r.deployment].spec.drain.timeout_s if r.deployment in self.deployments else 0
            if routed is None or routed.in_flight == 0 or waited >= timeout:
                if routed is not None and routed.in_flight:
                    log.warning("replica %s still had %d requests after the %g s drain timeout",
                                r.id, routed.in_flight, timeout)
                self._stop(r, "stopped", "")

    async def _check_serving(self, session: aiohttp.ClientSession, r: ReplicaRow) -> None:
        """A serving replica that says it is no longer ready is replaced (see the module doc).
        No answer at all is the router's business (it ejects), not a reason to replace."""
        now = time.monotonic()
        last, streak = self._unready.get(r.id, (0.0, 0))
        if now - last < self.router.replicas.check_interval_s or r.url is None:
            return
        self._unready[r.id] = (now, streak)
        body = await _state(session, r.url)
        if body is None or r.phase != "ready" or r.id in self._busy:
            return
        if body.get("ready", True):
            self._unready[r.id] = (now, 0)
            return
        streak += 1
        self._unready[r.id] = (now, streak)
        if body.get("reason") == "engine_failed" or streak >= UNREADY_CHECKS:
            why = body.get("error") or body.get("reason") or "not ready"
            self._stop(r, "failed", f"the replica stopped being ready ({body.get('reason', '?')}): {why}")

    def _became_ready(self, r: ReplicaRow, body: dict[str, Any]) -> None:
        r.phase, r.ready_at = "ready", time.time()
        r.breakdown = breakdown(r.scheduled_at, r.breakdown, body.get("startup") or {}, r.ready_at)
        self.store.put_replica(r)
        assert r.url is not None
        rep = self.router.replicas.find(r.url) or self.router.replicas.add(Replica(r.url, deployment=r.deployment))
        rep.apply_state(body, 0.0)
        rep.healthy, rep.ejected, rep.draining = True, False, False
        dep = self.deployments.get(r.deployment)
        if dep is not None:
            dep.failures = 0
            dep.event(f"replica {r.id} ready in {r.breakdown.get('ready_s', 0):.2f} s")
        self.router.activator.notify(r.deployment)

    def _reconcile(self, dep: _Deployment) -> None:
        name, gen, now = dep.row.name, dep.row.generation, time.monotonic()
        mine = [r for r in self.live.values() if r.deployment == name]
        current = [r for r in mine if r.generation == gen and r.phase in ("starting", "ready")]
        old = [r for r in mine if r.generation != gen and r.phase in ("starting", "ready")]
        target = dep.target()
        if len(current) < target and now >= dep.next_start_at:
            for _ in range(target - len(current)):
                self._start(dep)
        elif len(current) > target:
            extra = len(current) - target
            starting = sorted((r for r in current if r.phase == "starting"), key=lambda r: -r.scheduled_at)
            ready = sorted((r for r in current if r.phase == "ready"), key=self._in_flight)
            for r in (starting + ready)[:extra]:
                self._remove(r)
        ready_now = sum(r.phase == "ready" for r in current)
        if old and ready_now >= min(target, len(old)):
            for r in old:
                self._remove(r)
        if dep.row.deleting and not mine:
            self.store.drop_deployment(name)
            del self.deployments[name]
            self.router.replicas.managed.discard(name)
            self.router.activator.forget(name)

    def _redact(self, name: str, text: str) -> str:
        dep = self.deployments.get(name)
        return dep.spec.redact(text) if dep is not None else text

    def _in_flight(self, r: ReplicaRow) -> int:
        routed = self.router.replicas.find(r.url or "")
        return routed.in_flight if routed else 0

    def _start(self, dep: _Deployment) -> None:
        spec = dep.spec
        rid = f"{spec.name}-{uuid.uuid4().hex[:8]}"
        res = spec.resources
        try:
            package = self.check_package(spec)   # again: a directory may have been swapped since it was deployed
        except ValueError as exc:
            self._backoff(dep, f"not starting a replica: {exc}")
            return
        launch = Launch(rid, spec.name, package, list(spec.serve_args), spec.env_values(), res.cpu, res.gpu,
                        res.memory_gb, dict(res.custom), scheduled_at=time.time())
        try:
            handle = self.provider.start(launch)
        except Exception as exc:  # noqa: BLE001 - a provider that cannot start a replica is reported, then retried
            self._backoff(dep, f"could not start a replica: {type(exc).__name__}: {spec.redact(str(exc))}")
            return
        r = ReplicaRow(rid, spec.name, dep.row.generation, self.provider.name, handle, self.provider.url(handle),
                       "starting", launch.scheduled_at,
                       breakdown={"process_s": round(time.time() - launch.scheduled_at, 3)})
        self.live[rid] = r
        self.store.put_replica(r)
        dep.event(f"starting replica {rid}")

    def _backoff(self, dep: _Deployment, why: str) -> None:
        dep.failures += 1
        delay = min(60.0, 2.0 ** (dep.failures - 1))
        dep.next_start_at = time.monotonic() + delay
        dep.event(f"{why}; next start in {delay:g} s")

    def _remove(self, r: ReplicaRow) -> None:
        if r.phase == "starting":
            self._stop(r, "stopped", "")
            return
        r.phase = "draining"
        self._drain_started[r.id] = time.monotonic()
        routed = self.router.replicas.find(r.url or "")
        if routed is not None:
            routed.draining = True
        self.store.put_replica(r)
        if r.deployment in self.deployments:
            self.deployments[r.deployment].event(f"draining replica {r.id}")

    def _stop(self, r: ReplicaRow, phase: str, error: str) -> None:
        """Take the replica out of the router and stop its process in the background."""
        self._busy.add(r.id)
        if r.url:
            self.router.replicas.remove(r.url)
        grace = 10.0

        async def stop() -> None:
            try:
                await asyncio.to_thread(self.provider.stop, r.handle, grace)
            finally:
                self._busy.discard(r.id)
                self._ended(r, phase, error)

        asyncio.get_running_loop().create_task(stop())

    def _ended(self, r: ReplicaRow, phase: str, error: str) -> None:
        if r.url:
            self.router.replicas.remove(r.url)
        was_starting = r.phase == "starting"
        r.phase, r.ended_at, r.error = phase, time.time(), error
        self.live.pop(r.id, None)
        self._drain_started.pop(r.id, None)
        self._unready.pop(r.id, None)
        self.store.put_replica(r)
        self.store.prune(r.deployment)
        dep = self.deployments.get(r.deployment)
        if dep is not None and phase == "failed":
            if was_starting:
                self._backoff(dep, f"replica {r.id} failed to start: {error.splitlines()[0] if error else ''}")
            else:
                dep.event(f"replica {r.id} failed: {error.splitlines()[0] if error else ''}")
        self.router.activator.notify(r.deployment)

    async def stop_all(self) -> None:
        """Stop every replica (`headway down`)."""
        await asyncio.gather(*(asyncio.to_thread(self.provider.stop, r.handle, 10.0) for r in self.live.values()))
        for r in list(self.live.values()):
            self._ended(r, "stopped", "")

    def check(self) -> None:
        live_urls = {r.url for r in self.live.values() if r.phase in ("ready", "draining")}
        for rep in self.router.replicas.replicas:
            if rep.deployment in self.deployments:
                assert rep.url in live_urls, f"{rep.url} is routed to but is not a ready replica"

    # --- status ---------------------------------------------------------------------------------
    def status(self, name: str) -> dict[str, Any]:
        dep = self._get(name)
        ready, starting = self.counts(name)
        replicas = []
        for r in self.store.replicas(name):
            routed = self.router.replicas.find(r.url or "") if r.phase in ("ready", "draining") else None
            replicas.append({"id": r.id, "phase": r.phase, "url": r.url, "generation": r.generation, "handle": r.handle,
                             "in_flight": routed.in_flight if routed else 0, "breakdown": r.breakdown,
                             "scheduled_at": r.scheduled_at, "ready_at": r.ready_at,
                             "error": dep.spec.redact(r.error)[-2000:]})
        return {"name": name, "spec": dep.spec.public_dump(), "generation": dep.row.generation,
                "desired": dep.target(), "autoscaler": {"desired": dep.desired, "reason": dep.reason},
                "manual": dep.row.manual, "deleting": dep.row.deleting, "ready": ready, "starting": starting,
                "queued": self.router.activator.queued(name), "in_flight": self.router.replicas.in_flight(name),
                "measured_startup_s": self.measured_startup_s(name), "replicas": replicas,
                "events": [{"at": t, "event": e} for t, e in dep.events[-15:]]}


def breakdown(scheduled_at: float, known: dict[str, float], startup: dict[str, Any], ready_at: float) -> dict[str, float]:
    """A replica's cold start as seconds since it was scheduled, at the end of each phase:
    process (the provider started it), started (its server listened: interpreter and imports),
    fetched (weights local and converted), loaded (in memory), warmed (first forward
    done), ready (the control plane saw it ready)."""
    out = dict(known)
    started_unix = startup.get("server_started_unix")
    if isinstance(started_unix, (int, float)):
        base = started_unix - scheduled_at
        out["started_s"] = round(base, 3)
        for phase in ("fetched_s", "loaded_s", "warmed_s"):
            value = startup.get(phase)
            if isinstance(value, (int, float)):
                out[phase] = round(base + value, 3)
    out["ready_s"] = round(ready_at - scheduled_at, 3)
    return out


async def _state(session: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    try:
        async with session.get(url + "/headway/state", timeout=aiohttp.ClientTimeout(total=1.0)) as resp:
            if resp.status != 200:
                return None
            body = await resp.json(content_type=None)
            return body if isinstance(body, dict) else None
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
        return None
