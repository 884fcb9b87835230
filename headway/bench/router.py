"""Router benchmark: latency the router adds, and requests/s through it, on a no-op model.

    python -m headway.bench.router [--requests 2000] [--concurrency 32] [--seconds 5]

Starts no-op replicas (a real Headway replica serving a model whose predict returns at once) and
a router in front of them, all as local processes. It measures, with the same aiohttp client:
sequential latency direct vs via the router (interleaved blocks; p50/p99 and the difference),
and throughput (requests/s at `--concurrency`) direct vs via the router, and prints the ratios.
It also compares the two pooled HTTP clients the proxy could use (aiohttp, httpx) on the same
replica. Everything shares this machine's CPUs (load generator included): quote numbers with it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path

import aiohttp
import httpx

from headway.bench.servers import wait_ready

NOOP_YAML = """name: noop
runtime: custom
description: Returns at once; for measuring everything but the model.
runtime_options:
  predict_concurrency: 512
  queue_size: 1024
"""
NOOP_MODEL = """
class Model:
    def load(self) -> None:
        pass

    async def predict(self, inputs: dict) -> dict:
        return {"ok": True}
"""
PATH = "/v1/models/noop:predict"
BODY = b'{"x": 1}'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(args: list[str], port: int, log: Path) -> subprocess.Popen[bytes]:
    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, *args, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=root)


def _wait(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    wait_ready(url + "/health/ready", proc, timeout, why=lambda: "\n" + log.read_text(), interval=0.1)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _latencies(session: aiohttp.ClientSession, url: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        async with session.post(url, data=BODY, headers={"content-type": "application/json"}) as r:
            await r.read()
            if r.status != 200:
                raise RuntimeError(f"{url} answered {r.status}")
        out.append(time.perf_counter() - t)
    return out


async def _throughput(send: Callable[[], Awaitable[int]], concurrency: int, seconds: float) -> tuple[float, int]:
    done = errors = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done, errors
        while time.perf_counter() < stop:
            if await send() == 200:
                done += 1
            else:
                errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - start), errors


async def measure(direct: str, routed: str, requests: int, concurrency: int, seconds: float) -> dict[str, float]:
    res: dict[str, float] = {}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await _latencies(session, direct + PATH, 100)          # warm both paths and their pools
        await _latencies(session, routed + PATH, 100)
        d_lat: list[float] = []
        r_lat: list[float] = []
        block = max(1, requests // 10)
        for _ in range(10):                                     # interleaved blocks: drift hits both alike
            d_lat += await _latencies(session, direct + PATH, block)
            r_lat += await _latencies(session, routed + PATH, block)
        for name, lat in (("direct", d_lat), ("router", r_lat)):
            res[f"{name}_p50_ms"] = statistics.median(lat) * 1000
            res[f"{name}_p99_ms"] = _pct(lat, 0.99) * 1000
        res["added_p50_ms"] = res["router_p50_ms"] - res["direct_p50_ms"]
        res["added_p99_ms"] = res["router_p99_ms"] - res["direct_p99_ms"]

        def aio_sender(url: str) -> Callable[[], Awaitable[int]]:
            async def send() -> int:
                async with session.post(url, data=BODY, headers={"content-type": "application/json"}) as r:
                    await r.read()
                    return r.status
            return send

        res["direct_rps"], _ = await _throughput(aio_sender(direct + PATH), concurrency, seconds)
        res["router_rps"], errors = await _throughput(aio_sender(routed + PATH), concurrency, seconds)
        res["router_errors"] = errors
        res["aiohttp_client_rps"] = res["direct_rps"]
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency)) as client:
        async def hx() -> int:
            r = await client.post(direct + PATH, content=BODY, headers={"content-type": "application/json"})
            return r.status_code
        res["httpx_client_rps"], _ = await _throughput(hx, concurrency, seconds)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000, help="sequential requests per path for latency")
    ap.add_argument("--concurrency", type=int, default=32, help="concurrent clients for throughput")
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of each throughput run")
    ap.add_argument("--replicas", type=int, default=1, help="no-op replicas behind the router")
    ap.add_argument("--policy", default="least-load", help="routing policy")
    args = ap.parse_args(argv)
    if args.requests < 10 or args.concurrency < 1 or args.seconds <= 0 or args.replicas < 1:
        ap.error("--requests must be >= 10, --concurrency and --replicas >= 1, --seconds > 0")
    with tempfile.TemporaryDirectory(prefix="headway-router-bench-") as tmp, ExitStack() as stack:
        pkg = Path(tmp) / "noop"
        pkg.mkdir()
        (pkg / "headway.yaml").write_text(NOOP_YAML)
        (pkg / "model.py").write_text(NOOP_MODEL)
        urls = []
        for i in range(args.replicas):
            port = _free_port()
            log = Path(tmp) / f"replica-{i}.log"
            proc = _start(["-m", "headway", "serve", str(pkg), "--log-level", "warning"], port, log)
            stack.callback(proc.terminate)
            urls.append(f"http://127.0.0.1:{port}")
            _wait(urls[-1], proc, log)
        rport = _free_port()
        rlog = Path(tmp) / "router.log"
        replica_args = [a for u in urls for a in ("--replica", u)]
        rproc = _start(["-m", "headway.infra.router.cli", *replica_args, "--policy", args.policy,
                        "--log-level", "warning"], rport, rlog)
        stack.callback(rproc.terminate)
        routed = f"http://127.0.0.1:{rport}"
        _wait(routed, rproc, rlog)
        res = asyncio.run(measure(urls[0], routed, args.requests, args.concurrency, args.seconds))
    cpus = os.cpu_count()
    print(f"router benchmark: no-op model, {args.replicas} replica(s), policy {args.policy}, {cpus} CPUs shared by "
          "load generator, router and replicas (and anything else running on this machine)")
    print(f"latency, sequential, {args.requests} requests each (interleaved):")
    print(f"  direct  p50 {res['direct_p50_ms']:.3f} ms  p99 {res['direct_p99_ms']:.3f} ms")
    print(f"  router  p50 {res['router_p50_ms']:.3f} ms  p99 {res['router_p99_ms']:.3f} ms")
    print(f"  added   p50 {res['added_p50_ms']:.3f} ms  p99 {res['added_p99_ms']:.3f} ms   "
          f"(ratio router/direct p50 {res['router_p50_ms'] / res['direct_p50_ms']:.2f}x, "
          f"p99 {res['router_p99_ms'] / res['direct_p99_ms']:.2f}x)   targets: p50 <= 1 ms, p99 <= 5 ms")
    print(f"throughput, {args.concurrency} concurrent clients, {args.seconds:g} s each:")
    print(f"  direct  {res['direct_rps']:.0f} req/s")
    print(f"  router  {res['router_rps']:.0f} req/s  ({res['router_errors']:.0f} errors)  "
          f"ratio router/direct {res['router_rps'] / res['direct_rps']:.2f}   target: >= 2000 req/s")
    print(f"pooled client to one replica: aiohttp {res['aiohttp_client_rps']:.0f} req/s, httpx "
          f"{res['httpx_client_rps']:.0f} req/s (ratio aiohttp/httpx {res['aiohttp_client_rps'] / res['httpx_client_rps']:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
