"""The control plane: one process with the API, the router, the autoscaler and the replica manager.

Clients send model traffic to it as to any router; `headway deploy/status/scale/delete` talk to
its API under /headway/control/. State lives in SQLite (`STATE_DIR/headway.db`): restarting the
control plane adopts the replicas still running instead of starting new ones.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

from headway.infra.autoscale.controller import AutoscaleLoop, Observed
from headway.infra.fleet.manager import ReplicaManager
from headway.infra.fleet.providers.base import Provider
from headway.infra.fleet.spec import validate_spec
from headway.infra.fleet.store import Store
from headway.infra.router.proxy import RouterApp, respond
from headway.infra.router.replicas import ReplicaSet
from headway.infra.router.upstream import RouterConfig
from headway.package.load import PackageError

log = logging.getLogger("headway.control")
PREFIX = "/headway/control"


class ControlPlane:
    """ASGI app: /headway/control/* is the API, everything else goes through the router."""

    def __init__(self, state_dir: Path, provider: Provider, *, router_config: RouterConfig | None = None,
                 health_interval_s: float = 1.0):
        self.state_dir = Path(state_dir)
        self.store = Store(self.state_dir / "headway.db")
        self.router = RouterApp(ReplicaSet([], check_interval_s=health_interval_s), router_config or RouterConfig(),
                                on_startup=self._started, on_shutdown=self._stopping)
        self.manager = ReplicaManager(self.store, provider, self.router)
        self.autoscaler = AutoscaleLoop(self._observe, self.manager.set_desired, waiting=self._waiting,
                                        memory=self.store)
        self._tasks: list[asyncio.Task[None]] = []
        self.stop_replicas_on_exit = False

    # --- lifecycle ------------------------------------------------------------------------------
    async def _started(self, _: RouterApp) -> None:
        await self.manager.restore()
        self._sync_autoscaler()
        self._resume_autoscaler()
        self._tasks = [asyncio.create_task(self.manager.run()), asyncio.create_task(self.autoscaler.run())]
        log.info("control plane up: %d deployment(s), %d replica(s) adopted; state in %s",
                 len(self.manager.deployments), len(self.manager.live), self.store.path)

    async def _stopping(self, _: RouterApp) -> None:
        for t in self._tasks:
            t.cancel()
        if self.stop_replicas_on_exit:
            await self.manager.stop_all()
        self.manager.provider.close()
        self.store.close()

    def _sync_autoscaler(self) -> None:
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

    # --- ASGI -----------------------------------------------------------------------------------
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PREFIX):
            await self._api(scope, receive, send)
        else:
            await self.router(scope, receive, send)

    async def _api(self, scope: Any, receive: Any, send: Any) -> None:
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        method, parts = scope["method"], [p for p in scope["path"][len(PREFIX):].split("/") if p]
        try:
            status, answer = await self._handle(method, parts, body)
        except KeyError as exc:
            status, answer = 404, {"error": {"type": "not_found", "message": exc.args[0]}}
        except (ValueError, PackageError) as exc:
            status, answer = 400, {"error": {"type": "invalid_request", "message": str(exc)}}
        await respond(send, status, json.dumps(answer, default=str).encode())

    async def _handle(self, method: str, parts: list[str], body: bytes) -> tuple[int, Any]:
        m = self.manager
        if parts == ["deployments"] and method == "GET":
            return 200, {"deployments": [m.status(n) for n in sorted(m.deployments)]}
        if parts == ["deployments"] and method == "POST":
            spec = validate_spec(_json(body), "deployment spec")
            if spec.package.startswith(("./", "../")):
                raise ValueError(f"package '{spec.package}' is relative; send an absolute directory or a library "
                                 "name (`headway deploy` resolves a relative one against the spec's folder)")
            created = spec.name not in m.deployments
            m.apply(spec)
            self._sync_autoscaler()
            return (201 if created else 200), m.status(spec.name)
        if len(parts) == 2 and parts[0] == "deployments" and method == "GET":
            return 200, m.status(parts[1])
        if len(parts) == 2 and parts[0] == "deployments" and method == "DELETE":
            m.delete(parts[1])
            return 202, m.status(parts[1])
        if len(parts) == 3 and parts[0] == "deployments" and parts[2] == "scale" and method == "POST":
            data = _json(body)
            replicas = data.get("replicas") if isinstance(data, dict) else None
            if replicas is not None and (isinstance(replicas, bool) or not isinstance(replicas, int)):
                raise ValueError(f"'replicas' must be a whole number or null (back to autoscaling), got {replicas!r}")
            m.scale(parts[1], replicas)
            return 200, m.status(parts[1])
        if parts == ["shutdown"] and method == "POST":
            data = _json(body) if body else {}
            self.stop_replicas_on_exit = bool(isinstance(data, dict) and data.get("stop_replicas", True))
            asyncio.get_running_loop().call_later(0.1, os.kill, os.getpid(), signal.SIGTERM)
            return 202, {"stopping": True, "stop_replicas": self.stop_replicas_on_exit}
        raise KeyError(f"no control endpoint {method} {PREFIX}/{'/'.join(parts)}; see `headway --help`")


def _json(body: bytes) -> Any:
    try:
        return json.loads(body or b"null")
    except ValueError as exc:
        raise ValueError(f"the request body is not JSON: {exc}") from None
