"""The `headway` command line."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from headway.bench.cli import bench
from headway.bench.ppl import app as eval_app
from headway.bench.targets import app as targets_app
from headway.infra.fleet.cli import register as register_fleet
from headway.infra.router.cli import route
from headway.library.cli import app as library_app
from headway.package.load import PackageError, load_package
from headway.server.cli import serve

app = typer.Typer(help="Headway: package a model once, serve it anywhere.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def init(path: Annotated[Path, typer.Argument(help="Directory to create.")],
         name: Annotated[Optional[str], typer.Option(help="Package name (default: directory name).")] = None) -> None:
    """Scaffold a model package that serves as-is."""
    from headway.cli.scaffold import scaffold

    try:
        files = scaffold(path, name)
    except FileExistsError as exc:
        _fail(str(exc))
    for f in files:
        typer.echo(f"created {f}")
    typer.echo(f"\nnext: headway serve {path}   (or: headway watch {path})")


@app.command()
def validate(path: Annotated[Path, typer.Argument(help="Package directory.")]) -> None:
    """Check a package's headway.yaml and model.py location; print every error at once."""
    try:
        pkg = load_package(path)
    except PackageError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    typer.echo(f"ok: {pkg.config.name} ({pkg.config.runtime})")


app.command()(serve)


@app.command()
def watch(
    path: Annotated[Path, typer.Argument(help="Package directory.")],
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
) -> None:
    """Serve a package and restart it whenever its code or config changes."""
    from watchfiles import watch as watch_changes

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "headway", "serve", str(path),
                                 "--port", str(port), "--host", host])

    try:
        load_package(path)
    except PackageError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    proc = start()
    # SIGTERM must run the cleanup below too, or the child server outlives its watcher.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    typer.echo(f"watching {path} for changes (Ctrl-C to stop)")
    try:
        for changes in watch_changes(path, debounce=300, step=100,
                                     watch_filter=lambda _c, p: not p.endswith((".pyc", "~")) and "__pycache__" not in p):
            names = sorted({Path(p).name for _, p in changes})
            try:
                load_package(path)
            except PackageError as exc:
                typer.echo(f"change in {', '.join(names)} not applied; the package is invalid:\n{exc}", err=True)
                continue
            typer.echo(f"change in {', '.join(names)}: restarting")
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc = start()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _read_data(data: str) -> Any:
    if data == "-":
        text = sys.stdin.read()
    elif data.startswith("@"):
        text = Path(data[1:]).read_text()
    else:
        text = data
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        _fail(f"--data is not valid JSON ({exc}); pass JSON, @file.json or - for stdin")


def _served_model(client: Any, base: str) -> str:
    """The model a replica serves (its /headway/state), or a router's only one (its /v1/models:
    a router does not pass /headway/* through)."""
    state = client.get(f"{base}/headway/state")
    if state.status_code == 200 and state.json().get("model"):
        return str(state.json()["model"])
    listed = client.get(f"{base}/v1/models")
    names = [m["id"] for m in listed.json().get("data", [])] if listed.status_code == 200 else []
    if len(names) != 1:
        _fail(f"{base} serves {', '.join(names) if names else 'no model it names'}; say which with --model")
    return str(names[0])


@app.command()
def predict(
    data: Annotated[str, typer.Option("--data", "-d", help="JSON input, @file.json, or - for stdin.")],
    url: Annotated[str, typer.Option(help="Server address.")] = "http://127.0.0.1:8000",
    model: Annotated[Optional[str], typer.Option(help="Model name (default: the one the server serves).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the response.")] = 300.0,
) -> None:
    """Call a running server's predict endpoint; streamed output prints as it arrives."""
    import httpx

    body = _read_data(data)
    base = url.rstrip("/")
    try:
        with httpx.Client(timeout=timeout) as client:
            if model is None:
                model = _served_model(client, base)
            with client.stream("POST", f"{base}/v1/models/{model}:predict", json=body) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    try:
                        message = resp.json()["error"]["message"]
                    except Exception:
                        message = resp.text
                    _fail(f"{resp.status_code}: {message}")
                if resp.headers.get("content-type", "").startswith("text/event-stream"):
                    _print_stream(resp)
                else:
                    resp.read()
                    typer.echo(json.dumps(resp.json(), indent=2))
    except httpx.HTTPError as exc:
        _fail(f"cannot reach {base}: {exc}")


def _print_stream(resp: Any) -> None:
    event = None
    for line in resp.iter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
            continue
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            break
        item = json.loads(payload)
        if event == "error":
            sys.stdout.write("\n")
            _fail(f"stream ended with an error: {item['error']['message']}")
        sys.stdout.write(item if isinstance(item, str) else json.dumps(item) + "\n")
        sys.stdout.flush()
        event = None
    sys.stdout.write("\n")


app.add_typer(library_app, name="library", help="The model library: list and pull models.")
app.command("bench", help="Benchmark an OpenAI-compatible endpoint, with baselines side by side.")(bench)
app.add_typer(targets_app, name="bench-target")
app.add_typer(eval_app, name="eval", help="Model quality and cost: perplexity with and without quantization.")
app.command("route", help="Run a router in front of replicas.")(route)
register_fleet(app)


@app.command("sim", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                      "help_option_names": []})
def sim(ctx: typer.Context) -> None:
    """Simulate a deployment's autoscaling under a trace (`headway sim --help` for the options)."""
    from headway.sim.__main__ import main as sim_main

    sim_main(ctx.args)

if __name__ == "__main__":
    app()
