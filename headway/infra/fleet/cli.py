"""`headway up / deploy / status / scale / delete / down`: the control plane and its clients."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

CONTROL_ENV = "HEADWAY_CONTROL"
KEY_ENV = "HEADWAY_KEY"
DEFAULT_CONTROL = "http://127.0.0.1:8080"

ControlOpt = Annotated[Optional[str], typer.Option("--control", help=f"Control plane URL (default: ${CONTROL_ENV} "
                                                   f"or {DEFAULT_CONTROL}).")]
KeyOpt = Annotated[Optional[str], typer.Option("--key", envvar=KEY_ENV, show_envvar=True,
                                               help="API key (sent as Authorization: Bearer KEY); needed once the "
                                               "control plane has keys.")]
CaFileOpt = Annotated[Optional[str], typer.Option("--ca-file", help="CA bundle (PEM) trusted for an https:// "
                                                  "control plane (default: $HEADWAY_CA_FILE, $SSL_CERT_FILE, "
                                                  "else the system's).")]


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _call(control: str | None, method: str, path: str, body: Any = None, key: str | None = None,
          ca_file: str | None = None) -> Any:
    import httpx

    from headway.tls import TLSConfigError, client_context

    base = (control or os.environ.get(CONTROL_ENV) or DEFAULT_CONTROL).rstrip("/")
    headers = {"authorization": f"Bearer {key}"} if key else {}
    try:
        verify = client_context(ca_file)
    except TLSConfigError as exc:
        _fail(str(exc))
    try:
        resp = httpx.request(method, f"{base}/headway/control{path}", json=body, timeout=30, headers=headers,
                             verify=verify)
    except httpx.HTTPError as exc:
        hint = ("; if it serves HTTPS, use an https:// --control URL" if base.startswith("http://") else
                "; for a private CA pass --ca-file or set HEADWAY_CA_FILE" if "CERTIFICATE" in str(exc) else "")
        _fail(f"cannot reach the control plane at {base} ({type(exc).__name__}: {exc}); start one with `headway up`"
              + hint)
    try:
        data = resp.json()
    except ValueError:
        data = {}
    if resp.status_code >= 400:
        message = data.get("error", {}).get("message", resp.text) if isinstance(data, dict) else resp.text
        if resp.status_code == 401 and not key:
            message += f" (pass --key or set ${KEY_ENV})"
        _fail(message)
    return data


def up(
    port: Annotated[int, typer.Option(help="Port for model traffic and the control API.")] = 8080,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    state_dir: Annotated[Path, typer.Option(help="Where the control plane keeps its SQLite state and replica logs.")]
    = Path(".headway"),
    ray: Annotated[Optional[str], typer.Option("--ray", help="Run replicas on this Ray cluster (ADDRESS as for "
                                               "ray.init, e.g. auto or 10.0.0.1:6379) instead of local processes.")]
    = None,
    health_interval: Annotated[float, typer.Option(help="Seconds between the router's health checks.")] = 1.0,
    standby: Annotated[bool, typer.Option(help="Keep a local process with torch and the server imported, to "
                                          "become the next replica (a faster cold start).")] = True,
    tls_cert: Annotated[Optional[str], typer.Option(help="Serve HTTPS only (model traffic and the control API), "
                                                    "with this certificate (PEM); needs --tls-key.")] = None,
    tls_key: Annotated[Optional[str], typer.Option(help="The private key (PEM) of --tls-cert.")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    package_root: Annotated[Optional[list[Path]], typer.Option(
        "--package-root", help="A directory whose model packages (their model.py runs in replicas) may be deployed; "
        "repeatable. Without one, only model-library names and s3:// / https:// weights are accepted.")] = None,
) -> None:
    """Start the control plane: API, router, autoscaler and replica manager in one process."""
    from headway.infra.fleet.control import ControlPlane
    from headway.infra.fleet.keys_cli import has_admin_key, is_loopback
    from headway.infra.router.server import serve
    from headway.tls import TLSConfigError, server_tls

    try:
        tls = server_tls(tls_cert, tls_key)
    except TLSConfigError as exc:
        _fail(str(exc))
        return

    if not is_loopback(host) and not has_admin_key(state_dir):
        _fail(f"refusing to listen on {host}: off loopback the control plane needs an API key, and {state_dir} holds "
              f"no valid admin key. Create one first with\n  headway keys create --state-dir {state_dir} --scope admin "
              f"--name ops\n(it prints the key once), or bind to 127.0.0.1")

    if ray is not None:
        try:
            import ray as _  # noqa: F401
        except ImportError:
            _fail("--ray needs Ray: pip install 'ray==2.60.0' (or headway[ray])")
        from headway.infra.fleet.providers.ray import RayProvider

        try:
            provider: Any = RayProvider(ray, state_dir / "logs")
        except ConnectionError as exc:
            _fail(f"cannot join the Ray cluster at {ray}: {exc}")
    else:
        from headway.infra.fleet.providers.local import LocalProvider

        provider = LocalProvider(state_dir / "logs", host="127.0.0.1" if host in ("127.0.0.1", "localhost") else host,
                                 standby=standby)
    try:
        plane = ControlPlane(state_dir, provider, health_interval_s=health_interval, package_roots=package_root or [])
    except ValueError as exc:
        provider.close()
        _fail(str(exc))
    typer.echo(f"headway control plane on {'https' if tls else 'http'}://{host}:{port} (state: {state_dir.resolve()}, "
               f"replicas: {'ray ' + ray if ray else 'local processes'}, package roots: "
               f"{', '.join(str(p) for p in plane.manager.package_roots or ()) or 'none'})")
    typer.echo("API keys: every route but /health/* needs one" if not plane.ring.empty else
               "no API keys yet: only local, same-origin requests are answered; add one with "
               "`headway keys create --scope admin`")
    serve(plane, host, port, log_level, tls)


def deploy(
    spec: Annotated[Path, typer.Argument(help="A deployment spec file (YAML).")],
    wait: Annotated[bool, typer.Option(help="Wait until the deployment has its minimum replicas ready.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds --wait waits.")] = 300.0,
    control: ControlOpt = None,
    key: KeyOpt = None,
    ca_file: CaFileOpt = None,
) -> None:
    """Create or update a deployment from its spec."""
    from headway.infra.fleet.spec import load_spec
    from headway.package.load import PackageError

    try:
        parsed = load_spec(spec)
    except PackageError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    data = _call(control, "POST", "/deployments", parsed.model_dump(mode="json"), key=key, ca_file=ca_file)
    typer.echo(f"deployed '{parsed.name}' (generation {data['generation']}, {data['desired']} replica(s) wanted); "
               f"send requests with model='{parsed.name}'")
    if wait:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = _call(control, "GET", f"/deployments/{parsed.name}", key=key, ca_file=ca_file)
            if data["ready"] >= min(parsed.replicas.min, data["desired"]):
                typer.echo(f"'{parsed.name}': {data['ready']} replica(s) ready")
                return
            time.sleep(0.5)
        _fail(f"'{parsed.name}' did not reach {parsed.replicas.min} ready replica(s) in {timeout:g} s; "
              f"see `headway status {parsed.name}`")


def status(
    name: Annotated[Optional[str], typer.Argument(help="A deployment (default: all).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw status.")] = False,
    control: ControlOpt = None,
    key: KeyOpt = None,
    ca_file: CaFileOpt = None,
) -> None:
    """Deployments, their replicas, and each replica's cold-start breakdown."""
    import json

    deps = [_call(control, "GET", f"/deployments/{name}", key=key, ca_file=ca_file)] if name else _call(control, "GET", "/deployments", key=key, ca_file=ca_file)["deployments"]
    if as_json:
        typer.echo(json.dumps(deps, indent=2))
        return
    if not deps:
        typer.echo("no deployments; create one with `headway deploy SPEC`")
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for d in deps:
        mode = f"manual {d['manual']}" if d["manual"] is not None else f"autoscaler ({d['autoscaler']['reason']})"
        startup = f"{d['measured_startup_s']:.2f} s" if d["measured_startup_s"] else "not measured yet"
        console.print(f"[bold]{d['name']}[/bold]  {d['spec']['package']}  ready {d['ready']}, starting "
                      f"{d['starting']}, desired {d['desired']} [{mode}]  in flight {d['in_flight']}, queued "
                      f"{d['queued']}  startup {startup}" + ("  [red]deleting[/red]" if d["deleting"] else ""))
        table = Table("replica", "phase", "url", "in flight", "process", "started", "fetched", "loaded", "warmed",
                      "ready", "error")
        for r in d["replicas"]:
            b = r["breakdown"]
            cell = [f"{b[k]:.2f}" if k in b else "" for k in
                    ("process_s", "started_s", "fetched_s", "loaded_s", "warmed_s", "ready_s")]
            table.add_row(r["id"], r["phase"], r["url"] or "", str(r["in_flight"]), *cell,
                          (r["error"].splitlines() or [""])[0][:60])
        console.print(table)
        console.print("cold start: seconds since the replica was scheduled at the end of each phase")


def scale(
    name: Annotated[str, typer.Argument(help="The deployment.")],
    replicas: Annotated[str, typer.Argument(help="A replica count, or 'auto' to hand it back to the autoscaler.")],
    control: ControlOpt = None,
    key: KeyOpt = None,
    ca_file: CaFileOpt = None,
) -> None:
    """Pin a deployment's replica count, or give it back to the autoscaler."""
    if replicas == "auto":
        count: int | None = None
    else:
        try:
            count = int(replicas)
        except ValueError:
            _fail(f"replicas must be a whole number or 'auto', got {replicas!r}")
            return
    data = _call(control, "POST", f"/deployments/{name}/scale", {"replicas": count}, key=key, ca_file=ca_file)
    typer.echo(f"'{name}': {data['desired']} replica(s) wanted ({'manual' if count is not None else 'autoscaler'})")


def delete(
    name: Annotated[str, typer.Argument(help="The deployment.")],
    control: ControlOpt = None,
    key: KeyOpt = None,
    ca_file: CaFileOpt = None,
) -> None:
    """Delete a deployment: its replicas drain (finish their requests) and stop."""
    _call(control, "DELETE", f"/deployments/{name}", key=key, ca_file=ca_file)
    typer.echo(f"'{name}': draining its replicas; it disappears once they have stopped")


def down(
    keep_replicas: Annotated[bool, typer.Option(help="Leave replicas running (a later `headway up` adopts them).")]
    = False,
    control: ControlOpt = None,
    key: KeyOpt = None,
    ca_file: CaFileOpt = None,
) -> None:
    """Stop the control plane (and, unless --keep-replicas, every replica it runs)."""
    _call(control, "POST", "/shutdown", {"stop_replicas": not keep_replicas}, key=key, ca_file=ca_file)
    typer.echo("control plane stopping" + (" (replicas left running)" if keep_replicas else " with its replicas"))


def register(app: typer.Typer) -> None:
    app.command("up", help="Start the control plane (API, router, autoscaler, replica manager).")(up)
    app.command("deploy", help="Create or update a deployment from a spec file.")(deploy)
    app.command("status", help="Deployments, replicas and cold-start breakdowns.")(status)
    app.command("scale", help="Pin a deployment's replica count, or 'auto'.")(scale)
    app.command("delete", help="Delete a deployment (its replicas drain first).")(delete)
    app.command("down", help="Stop the control plane.")(down)
    from headway.infra.fleet.keys_cli import keys_app

    app.add_typer(keys_app, name="keys", help="API keys: create, list, revoke (scopes admin, deploy, invoke).")
