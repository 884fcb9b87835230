"""`headway route`: one address in front of many replicas."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from headway.infra.router.policies import POLICIES
from headway.infra.router.tokenize import PromptTokenizer, load_prompt_tokenizer
from headway.tls import ca_file as tls_ca_file, server_tls


def route(
    replica: Annotated[list[str], typer.Option("--replica", help="A replica URL (http://host:port); repeat for more.")],
    policy: Annotated[Optional[str], typer.Option(help=f"Routing policy: {', '.join(POLICIES)}. Default: "
                                                  "predicted-latency for LLM deployments, least-load for others.")] = None,
    deployment_policy: Annotated[Optional[list[str]], typer.Option(
        help="A deployment's own policy as DEPLOYMENT=NAME (over --policy); repeatable.")] = None,
    tokenizer: Annotated[Optional[list[str]], typer.Option(
        help="A deployment's tokenizer as DEPLOYMENT=SOURCE (model directory or library name): prefix "
        "affinity on exact token ids, matched against the replicas' prefix digests; repeatable. "
        "Without it the router fetches an LLM deployment's tokenizer from its replicas.")] = None,
    auto_tokenizer: Annotated[bool, typer.Option(
        help="Fetch an LLM deployment's tokenizer from its replicas (GET /headway/tokenizer) when none is "
        "given; --no-auto-tokenizer routes on the prompt text (~4 characters a token) instead.")] = True,
    port: Annotated[int, typer.Option(help="HTTP port to listen on.")] = 8080,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    grpc_port: Annotated[Optional[int], typer.Option(help="Also serve the gRPC API on this port.")] = None,
    region: Annotated[Optional[list[str]], typer.Option(help="A replica's region as URL=REGION, for the geo policy; "
                                                        "repeatable.")] = None,
    max_in_flight: Annotated[Optional[int], typer.Option(help="Per-replica concurrency limit (default: each replica's "
                                                         "published max_concurrency).")] = None,
    health_interval: Annotated[float, typer.Option(help="Seconds between active health checks.")] = 1.0,
    eject_after: Annotated[int, typer.Option(help="Consecutive failed answers that eject a replica.")] = 3,
    max_attempts: Annotated[int, typer.Option(help="Replicas tried for one request before the first byte.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of the policies' random tie-breaking.")] = 0,
    key_file: Annotated[Optional[Path], typer.Option(
        help="Require API keys: a control plane's state (its --state-dir, or DIR/headway.db) holding keys made by "
        "`headway keys create --state-dir DIR`. Model traffic then needs an invoke or admin key, /metrics and "
        "/headway/router a deploy or admin key; re-read every second.")] = None,
    tls_cert: Annotated[Optional[str], typer.Option(help="Serve HTTPS (and gRPC over TLS) only, with this "
                                                    "certificate (PEM); needs --tls-key.")] = None,
    tls_key: Annotated[Optional[str], typer.Option(help="The private key (PEM) of --tls-cert.")] = None,
    ca_file: Annotated[Optional[str], typer.Option(help="CA bundle (PEM) trusted for https:// replicas (default: "
                                                   "$HEADWAY_CA_FILE, $SSL_CERT_FILE, else the system's).")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Route requests for one or more deployments over their replicas."""
    from headway.infra.router.server import build_app, serve
    from headway.infra.router.upstream import RouterConfig

    def fail(message: str) -> None:
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(2)

    if policy is not None and policy not in POLICIES:
        fail(f"unknown policy '{policy}'; choose one of: {', '.join(POLICIES)}")
    regions: dict[str, str] = {}
    for item in region or []:
        url, sep, name = item.rpartition("=")
        if not sep or not url or not name:
            fail(f"--region takes URL=REGION (e.g. http://10.0.0.5:8000=eu-west), got {item!r}")
        regions[url.rstrip("/")] = name
    per_deployment: dict[str, str] = {}
    for item in deployment_policy or []:
        dep, sep, name = item.partition("=")
        if not sep or not dep or name not in POLICIES:
            fail(f"--deployment-policy takes DEPLOYMENT=NAME with NAME one of {', '.join(POLICIES)} "
                 f"(e.g. smollm2-135m-instruct=cache-aware), got {item!r}")
        per_deployment[dep] = name
    tokenizers: dict[str, PromptTokenizer] = {}
    for item in tokenizer or []:
        dep, sep, source = item.partition("=")
        if not sep or not dep or not source:
            fail(f"--tokenizer takes DEPLOYMENT=SOURCE (e.g. smollm2-135m-instruct=smollm2-135m-instruct), got {item!r}")
        try:
            tokenizers[dep] = load_prompt_tokenizer(source)
        except Exception as exc:  # noqa: BLE001 - any load failure is the user's to fix, with its reason
            fail(f"--tokenizer {item}: cannot load a tokenizer from {source!r}: {exc}")
    if max_attempts < 1 or eject_after < 1 or health_interval <= 0:
        fail("--max-attempts and --eject-after must be >= 1 and --health-interval > 0")
    if max_in_flight is not None and max_in_flight < 1:
        fail(f"--max-in-flight must be >= 1, got {max_in_flight}")
    try:
        tls = server_tls(tls_cert, tls_key)
        config = RouterConfig(policy=policy, seed=seed, max_attempts=max_attempts,
                              deployment_policies=per_deployment or None, tokenizers=tokenizers or None,
                              auto_tokenizer=auto_tokenizer, ca_file=tls_ca_file(ca_file))
        app = build_app(replica, config, regions=regions, max_in_flight=max_in_flight, check_interval_s=health_interval, eject_after=eject_after,
                        grpc_host=host, grpc_port=grpc_port, key_file=key_file, tls=tls)
    except ValueError as exc:   # TLSConfigError is one
        fail(str(exc))
        return
    serve(app, host, port, log_level, tls)


def main() -> None:
    """`python -m headway.infra.router.cli --replica ...`: the same command as `headway route`."""
    typer.run(route)


if __name__ == "__main__":
    main()
