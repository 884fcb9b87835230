"""The control plane: one process with the API, the router, the autoscaler and the replica manager.

Clients send model traffic to it as to any router; `headway deploy/status/scale/delete/keys` talk
to its API under /headway/control/ (a FastAPI app, control_api.py). Once keys exist, both need
one (auth.py); with none, only local same-origin requests are answered. State lives in SQLite (`STATE_DIR/headway.db`): restarting the
control plane adopts the replicas still running instead of starting new ones.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from headway.infra.autoscale.controller import AutoscaleLoop, Observed
from headway.infra.fleet.auth import AuthGate
from headway.infra.fleet.control_api import PREFIX, body_limits, build_control_api
from headway.infra.fleet.keys import KeyRing
from headway.infra.fleet.manager import ReplicaManager
from headway.infra.fleet.providers.base import Provider
from headway.infra.fleet.roots import normalize_roots
from headway.infra.fleet.store import Store
from headway.infra.router.proxy import RouterApp
from headway.infra.router.replicas import ReplicaSet
from headway.infra.router.upstream import RouterConfig

log = logging.getLogger("headway.control")


class ControlPlane:
    """ASGI app: /headway/control/* is the API, everything else goes through the router."""

    def __init__(self, state_dir: Path, provider: Provider, *, router_config: RouterConfig | None = None,
                 health_interval_s: float = 1.0, package_roots: Sequence[Path] = ()):
        """package_roots: the directories whose packages may be deployed (see fleet/roots.py); with
        none, only model-library names and remote weights sources are accepted."""
        self.state_dir = Path(state_dir)
        self.store = Store(self.state_dir / "headway.db")
        self.ring = KeyRing()
        self.reload_keys()
        self.gate = AuthGate(self.ring)
        self.router = RouterApp(ReplicaSet([], check_interval_s=health_interval_s), router_config or RouterConfig(),
                                on_startup=self._started, on_shutdown=self._stopping, gate=self.gate)
        self.manager = ReplicaManager(self.store, provider, self.router, package_roots=normalize_roots(package_roots))
        self.autoscaler = AutoscaleLoop(self._observe, self.manager.set_desired, waiting=self._waiting,
                                        memory=self.store)
        self._tasks: list[asyncio.Task[None]] = []
        self.stop_replicas_on_exit = False
        self.api = body_limits(build_control_api(self))

    # --- lifecycle ------------------------------------------------------------------------------
    async def _started(self, _: RouterApp) -> None:
        await self.manager.restore()
        self.sync_autoscaler()
        self._resume_autoscaler()
        self._tasks = [asyncio.create_task(self.manager.run()), asyncio.create_task(self.autoscaler.run()),
                       asyncio.create_task(self._refresh_keys())]
        log.info("control plane up: %d deployment(s), %d replica(s) adopted; state in %s",
                 len(self.manager.deployments), len(self.manager.live), self.store.path)

    async def _stopping(self, _: RouterApp) -> None:
        for t in self._tasks:
            t.cancel()
        if self.stop_replicas_on_exit:
            await self.manager.stop_all()
        self.manager.provider.close()
        self.store.close()

    def sync_autoscaler(self) -> None:
        for name, dep in self.manager.deployments.items():
            a = dep.spec.autoscaling
            key = json.dumps([dep.spec.replicas.model_dump(), a.model_dump()], sort_keys=True, default=str)
            self.autoscaler.configure(name, a.policy, key, dep.spec.autoscale_config(), a.tick_s, a.window_s)

    def _resume_autoscaler(self) -> None:
        """Each deployment's autoscaler continues from its saved state, holding what was adopted."""
        for name, dep in self.manager.deployments.items():
            decision = self.autoscaler.resume(name, sum(self.manager.counts(name)))
            if decision is not None:
                bounds = dep.spec.replicas
                self.manager.set_desired(name, min(max(decision.desired, bounds.min), bounds.max), decision.reason)

    def _waiting(self, name: str) -> bool | None:
        if name not in self.manager.deployments:
            return None
        return self.router.activator.queued(name) > 0 and self.manager.counts(name) == (0, 0)

    def _observe(self, name: str) -> Observed | None:
        if name not in self.manager.deployments:
            return None
        ready, starting = self.manager.counts(name)
        queued = self.router.activator.queued(name)
        window = self.manager.deployments[name].spec.autoscaling.window_s
        return Observed(self.router.replicas.in_flight(name) + queued, ready, starting, queued,
                        self.manager.measured_startup_s(name), self.router.first_byte_p95(name, window))

    # --- keys ------------------------------------------------------------------------------------
    def reload_keys(self) -> None:
        self.ring.replace(self.store.keys())

    async def _refresh_keys(self, every_s: float = 1.0) -> None:
        """Keys written by another process (`headway keys create --state-dir`) take effect within a second."""
        while True:
            await asyncio.sleep(every_s)
            try:
                self.reload_keys()
            except Exception as exc:  # noqa: BLE001 - a locked or busy database: keep the keys we have
                log.warning("could not re-read the keys: %s", exc)

    # --- ASGI -----------------------------------------------------------------------------------
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PREFIX):
            await self.api(scope, receive, send)
        else:
            await self.router(scope, receive, send)
