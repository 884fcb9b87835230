"""`headway serve`: the replica server's command line (the `headway` CLI registers it; the
standby preloader runs it without importing the rest of the CLI)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from headway.package.load import PackageError


def serve(
    target: Annotated[str, typer.Argument(
        help="A package directory, a model-library name, or s3://BUCKET/PREFIX/ or https://HOST/m.gguf.")],
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    dtype: Annotated[str | None, typer.Option(help="LLM dtype: auto, float32 or bfloat16.")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for the forward pass.")] = None,
    quantization: Annotated[str | None, typer.Option(
        help="LLM weight quantization: none (default), int8 or fp8.")] = None,
    speculative: Annotated[str | None, typer.Option(
        help="LLM speculative decoding: ngram or draft (details in headway.yaml engine.speculative).")] = None,
    kv_offload_tokens: Annotated[int | None, typer.Option(
        help="LLM host-memory KV tier in tokens: evicted prefixes are restored from it (0 = off).")] = None,
    lora: Annotated[list[str] | None, typer.Option(
        help="LoRA adapter to serve, NAME=PATH to a PEFT directory; repeatable.")] = None,
    lora_root: Annotated[list[str] | None, typer.Option(
        "--lora-root", help="Directory POST /v1/load_lora_adapter may load adapters from; repeatable (none: "
        "loading from a path at run time is refused).")] = None,
    secrets_dir: Annotated[str | None, typer.Option(help="Directory of secret files.")] = None,
    name: Annotated[str | None, typer.Option(help="Name clients use in `model` (default: the package's "
                                                "name); the control plane passes the deployment's.")] = None,
    replica_id: Annotated[str | None, typer.Option(help="Identity reported on /headway/state (set by the "
                                                      "control plane).")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="Serve HTTPS only, with this certificate (PEM); "
                                                     "needs --tls-key.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="The private key (PEM) of --tls-cert.")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Serve a model package or a library model on one machine."""
    from headway.infra.weights import fetch_for_runtime
    from headway.server.serve import serve as run
    from headway.tls import TLSConfigError, server_tls

    try:
        tls = server_tls(tls_cert, tls_key)
    except TLSConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None

    adapters = None
    if lora:
        bad = [item for item in lora if "=" not in item or not item.split("=", 1)[0] or not item.split("=", 1)[1]]
        if bad:
            typer.echo(f"--lora {bad[0]!r}: expected NAME=PATH, e.g. --lora sql=./adapters/sql", err=True)
            raise typer.Exit(2)
        adapters = {n: str(Path(p).expanduser().resolve()) for n, p in (item.split("=", 1) for item in lora)}
    try:
        run(target, host, port, log_level=log_level, secrets_dir=secrets_dir, fetch=fetch_for_runtime, name=name,
            replica_id=replica_id, requirements_venv=True, tls=tls, engine_overrides={"dtype": dtype, "num_threads": threads,
                                                     "quantization": quantization, "speculative": speculative,
                                                     "kv_offload_tokens": kv_offload_tokens, "lora_adapters": adapters,
                                                     "lora_roots": [str(Path(p).expanduser().resolve()) for p in lora_root]
                                                     if lora_root else None})
    except PackageError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


def run_serve(argv: list[str]) -> None:
    """Run `headway serve ARGV` (ARGV without the word `serve`) in this process."""
    app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
    app.command()(serve)
    app(argv, prog_name="headway serve")
