"""`headway keys create / list / revoke`: through the control API (an admin key), or, with
--state-dir, straight into a control plane's state (the bootstrap: the first admin key, before
`headway up` or when no control plane answers)."""

from __future__ import annotations

import ipaddress
import json
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from headway.infra.fleet.cli import ControlOpt, KeyOpt, _call, _fail
from headway.infra.fleet.keys import SCOPES, new_key, parse_expires

keys_app = typer.Typer(no_args_is_help=True)

StateOpt = Annotated[Optional[Path], typer.Option(
    "--state-dir", help="Write to this control plane's state directly (no control plane needed; e.g. the first "
    "admin key). Without it the command goes through the control API and needs an admin key.")]


def is_loopback(host: str) -> bool:
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False     # a host name other than localhost may resolve anywhere


def _store(state_dir: Path) -> Any:
    from headway.infra.fleet.store import Store

    return Store(state_dir / "headway.db")


def has_admin_key(state_dir: Path) -> bool:
    if not (state_dir / "headway.db").exists():
        return False
    from headway.infra.fleet.keys import KeyRing

    store = _store(state_dir)
    try:
        ring = KeyRing()
        ring.replace(store.keys())
        return ring.has_admin(time.time())
    finally:
        store.close()


@keys_app.command("create")
def create(
    scope: Annotated[str, typer.Option(help=f"What the key may do: {', '.join(SCOPES)}.")],
    deployment: Annotated[Optional[list[str]], typer.Option(
        "--deployment", help="invoke keys: only this deployment (repeatable; default: all).")] = None,
    expires: Annotated[Optional[str], typer.Option(help="A duration (30d, 12h, 90m, 2w) or an ISO date.")] = None,
    name: Annotated[str, typer.Option(help="A label to recognise the key by.")] = "",
    rpm: Annotated[Optional[int], typer.Option(help="Requests per minute on model routes (default: no limit).")] = None,
    tpm: Annotated[Optional[int], typer.Option(help="Tokens per minute on model routes (default: no limit).")] = None,
    state_dir: StateOpt = None,
    control: ControlOpt = None,
    key: KeyOpt = None,
) -> None:
    """Create a key; it is printed once (only its hash is kept)."""
    if state_dir is None:
        body = {"scope": scope, "deployments": deployment or [], "expires": expires, "name": name, "rpm": rpm,
                "tpm": tpm}
        made = _call(control, "POST", "/keys", body, key=key)
    else:
        now = time.time()
        try:
            when = parse_expires(expires, now) if expires else None
            secret, record = new_key(name, scope, now, deployments=tuple(deployment or ()), expires=when, rpm=rpm,
                                     tpm=tpm)
        except ValueError as exc:
            _fail(str(exc))
            return
        store = _store(state_dir)
        try:
            store.put_key(record)
        finally:
            store.close()
        made = {**record.public(), "key": secret}
    typer.echo(made["key"])
    typer.echo(f"created key {made['id']} ({made['scope']}"
               + (f" for {', '.join(made['deployments'])}" if made["deployments"] else "") + "); it is shown only "
               "once: keep it now (send it as `Authorization: Bearer KEY`, or --key / $HEADWAY_KEY)", err=True)


@keys_app.command("list")
def list_keys(
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw list.")] = False,
    state_dir: StateOpt = None,
    control: ControlOpt = None,
    key: KeyOpt = None,
) -> None:
    """Keys with their scope, deployments, expiry and revocation (never the keys themselves)."""
    if state_dir is None:
        rows = _call(control, "GET", "/keys", key=key)["keys"]
    else:
        store = _store(state_dir)
        try:
            rows = [k.public() for k in store.keys()]
        finally:
            store.close()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no keys; create one with `headway keys create --scope admin`")
        return
    for r in rows:
        state = "revoked" if r["revoked"] else ("expired" if r["expires"] and r["expires"] <= time.time() else "active")
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["expires"])) + " UTC" if r["expires"] else "never"
        limits = " ".join(f"{k}={r[k]}" for k in ("rpm", "tpm") if r[k])
        typer.echo(f"{r['id']}  {r['scope']:<6}  {state:<7}  expires {when}  {','.join(r['deployments']) or '*'}  "
                   f"{limits}  {r['name']}".rstrip())


@keys_app.command("revoke")
def revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (k_..., from `headway keys list`).")],
    state_dir: StateOpt = None,
    control: ControlOpt = None,
    key: KeyOpt = None,
) -> None:
    """Revoke a key: it stops working at once (within a second when written with --state-dir)."""
    if state_dir is None:
        _call(control, "DELETE", f"/keys/{key_id}", key=key)
    else:
        store = _store(state_dir)
        try:
            if not store.revoke_key(key_id, time.time()):
                _fail(f"no key '{key_id}' in {state_dir}; `headway keys list --state-dir {state_dir}` shows them")
        finally:
            store.close()
    typer.echo(f"revoked {key_id}")
