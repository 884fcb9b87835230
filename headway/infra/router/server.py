"""Running the router: uvicorn (uvloop + httptools) around RouterApp, plus the gRPC service."""

from __future__ import annotations

import logging
from typing import Any

import uvicorn

from headway.infra.router.proxy import RouterApp
from headway.infra.router.replicas import Replica, ReplicaSet
from headway.infra.router.upstream import RouterConfig
from headway.tls import ServerTLS


def build_app(replica_urls: list[str], config: RouterConfig, *, regions: dict[str, str] | None = None,
              max_in_flight: int | None = None, check_interval_s: float = 1.0, eject_after: int = 3,
              grpc_host: str = "127.0.0.1", grpc_port: int | None = None, tls: ServerTLS | None = None) -> RouterApp:
    """The router app for these replica URLs (http://host:port); gRPC starts with it when a port is
    given (over TLS with `tls`, as the HTTP port is when served with it)."""
    for url in replica_urls:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"replica URL must start with http:// or https://, got {url!r}")
    replicas = ReplicaSet([Replica(u.rstrip("/"), region=(regions or {}).get(u.rstrip("/")), limit_override=max_in_flight)
                           for u in replica_urls], eject_after=eject_after, check_interval_s=check_interval_s)
    grpc_server: dict[str, Any] = {}

    async def on_startup(app: RouterApp) -> None:
        if grpc_port is not None:
            from headway.infra.router.grpc_service import start_grpc
            grpc_server["server"] = await start_grpc(app, grpc_host, grpc_port, tls)

    async def on_shutdown(app: RouterApp) -> None:
        if "server" in grpc_server:
            await grpc_server["server"].stop(grace=1)

    return RouterApp(replicas, config, on_startup=on_startup, on_shutdown=on_shutdown)


def serve(app: Any, host: str, port: int, log_level: str = "info", tls: ServerTLS | None = None) -> None:
    """Serve the router (or the control plane around one); HTTPS only with `tls`."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(app, host=host, port=port, loop="uvloop", http="httptools", ws="websockets-sansio", server_header=False, date_header=False, proxy_headers=False,
                log_level=log_level, access_log=False, lifespan="on", timeout_keep_alive=30,
                **(tls.uvicorn_options() if tls else {}))
