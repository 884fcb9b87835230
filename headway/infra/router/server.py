"""Running the router: uvicorn (uvloop + httptools) around RouterApp, plus the gRPC service."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import uvicorn

from headway.infra.fleet.auth import AuthGate
from headway.infra.fleet.keys import KeyRing
from headway.infra.router.proxy import RouterApp
from headway.infra.router.replicas import Replica, ReplicaSet
from headway.infra.router.upstream import RouterConfig
from headway.tls import ServerTLS


def build_app(replica_urls: list[str], config: RouterConfig, *, regions: dict[str, str] | None = None,
              max_in_flight: int | None = None, check_interval_s: float = 1.0, eject_after: int = 3,
              grpc_host: str = "127.0.0.1", grpc_port: int | None = None, key_file: Path | None = None,
              tls: ServerTLS | None = None) -> RouterApp:
    """The router app for these replica URLs (http://host:port); gRPC starts with it when a port is
    given (over TLS with `tls`, as the HTTP port is when served with it). With `key_file` (a control
    plane's state: its directory or headway.db), model traffic needs an invoke key and /metrics,
    /headway/router a deploy key, read from it (re-read every second)."""
    for url in replica_urls:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"replica URL must start with http:// or https://, got {url!r}")
    replicas = ReplicaSet([Replica(u.rstrip("/"), region=(regions or {}).get(u.rstrip("/")), limit_override=max_in_flight)
                           for u in replica_urls], eject_after=eject_after, check_interval_s=check_interval_s)
    grpc_server: dict[str, Any] = {}
    gate, reload = _keys(key_file) if key_file is not None else (None, None)
    if gate is not None and grpc_port is not None:
        raise ValueError("--grpc-port does not check keys yet; leave it out when routing with --key-file")

    async def on_startup(app: RouterApp) -> None:
        if reload is not None:
            grpc_server["keys"] = asyncio.create_task(reload())
        if grpc_port is not None:
            from headway.infra.router.grpc_service import start_grpc
            grpc_server["server"] = await start_grpc(app, grpc_host, grpc_port, tls)

    async def on_shutdown(app: RouterApp) -> None:
        if "keys" in grpc_server:
            grpc_server["keys"].cancel()
        if "server" in grpc_server:
            await grpc_server["server"].stop(grace=1)

    return RouterApp(replicas, config, on_startup=on_startup, on_shutdown=on_shutdown, gate=gate)


def _keys(key_file: Path) -> tuple[AuthGate, Callable[[], Coroutine[Any, Any, None]]]:
    """A gate over the keys in a control plane's state, and the loop that re-reads them."""
    from headway.infra.fleet.store import Store

    path = key_file / "headway.db" if key_file.is_dir() else key_file
    if not path.is_file():
        raise ValueError(f"--key-file {key_file}: no such state file; create keys with `headway keys create "
                         f"--state-dir DIR --scope invoke` and pass DIR (or DIR/headway.db)")
    store = Store(path)
    ring = KeyRing()
    ring.replace(store.keys())
    if ring.empty:
        raise ValueError(f"--key-file {key_file} holds no keys; create one with `headway keys create --state-dir "
                         f"{path.parent} --scope invoke`")

    async def reload() -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                ring.replace(store.keys())
            except Exception as exc:  # noqa: BLE001 - a busy database: keep the keys we have
                logging.getLogger("headway.router").warning("could not re-read the keys: %s", exc)

    return AuthGate(ring), reload


def serve(app: Any, host: str, port: int, log_level: str = "info", tls: ServerTLS | None = None) -> None:
    """Serve the router (or the control plane around one); HTTPS only with `tls`."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(app, host=host, port=port, loop="uvloop", http="httptools", ws="websockets-sansio", server_header=False, date_header=False, proxy_headers=False,
                log_level=log_level, access_log=False, lifespan="on", timeout_keep_alive=30,
                **(tls.uvicorn_options() if tls else {}))
