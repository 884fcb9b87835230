"""Benchmark: parallel byte ranges against one stream, from a bandwidth-limited store.

    python -m headway.bench.weights [--size-mb 256] [--rate-mb 25] [--streams 8]
                                   [--part-mib 16] [--rounds 2] [--store http|s3]

The store runs in its own process on 127.0.0.1 (`localstore`: a range-serving file server, or
moto's S3 API) and caps every response at `--rate-mb` MB/s, as a remote object store caps
each connection. A generated file of `--size-mb` is fetched with one GET of the whole object
(the baseline) and with `--streams` parallel ranges of `--part-mib`, alternating, `--rounds`
times each, through the same transfer code (`ranges.download`) into a preallocated file; every
copy is checked against the source's sha256 and deleted. Prints MB/s of each and the ratio.
Disk: the source plus one copy at a time, in a temp dir removed at the end.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from headway.infra.weights.fetch import open_store
from headway.infra.weights.ranges import MiB, TransferOptions, download, file_digests
from headway.infra.weights.remote import RemoteFile, Store

MB = 1_000_000


def _make_source(path: Path, size: int) -> str:
    """A file of `size` incompressible bytes; returns its sha256."""
    digest = hashlib.sha256()
    with path.open("wb") as f:
        left = size
        while left:
            block = os.urandom(min(8 * MiB, left))
            f.write(block)
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def _start_store(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    root = Path(__file__).resolve().parents[3]
    proc = subprocess.Popen([sys.executable, "-m", "headway.infra.weights.localstore", *args],
                            stdout=subprocess.PIPE, text=True,
                            env={**env, "PYTHONPATH": str(root) + os.pathsep + env.get("PYTHONPATH", "")})
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    if not url.startswith("http"):
        proc.kill()
        raise RuntimeError(f"the local store did not start (printed {url!r})")
    return proc, url


def _time_fetch(store: Store, f: RemoteFile, dest: Path, options: TransferOptions, sha: str) -> float:
    t = time.perf_counter()
    download(dest, f.size, lambda a, b: store.read(f, a, b), options, what=f.url, ranged=f.ranged)
    seconds = time.perf_counter() - t
    got, _ = file_digests(dest)
    dest.unlink()
    if got != sha:
        raise AssertionError(f"{f.url}: fetched bytes differ from the source ({got} != {sha})")
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Parallel byte ranges vs one stream from a bandwidth-limited store.")
    p.add_argument("--size-mb", type=int, default=256)
    p.add_argument("--rate-mb", type=float, default=25.0, help="cap per connection, MB/s")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--part-mib", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--store", choices=("http", "s3"), default="http")
    a = p.parse_args(argv)
    size = a.size_mb * MB
    work = Path(tempfile.mkdtemp(prefix="headway-weights-bench-"))
    env = {**os.environ, "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "bench"),
           "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "bench"),
           "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
    proc: subprocess.Popen[str] | None = None
    try:
        (work / "src").mkdir()
        sha = _make_source(work / "src" / "blob.bin", size)
        if a.store == "http":
            proc, url = _start_store(["--files", str(work / "src"), "--rate", str(a.rate_mb * MB)], env)
            source = f"{url}/blob.bin"
            store = open_store(source, max_connections=a.streams + 2)
        else:
            import boto3

            proc, url = _start_store(["--s3", "--rate", str(a.rate_mb * MB)], env)
            os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
            client = boto3.client("s3", endpoint_url=url)
            client.create_bucket(Bucket="bench")
            client.upload_file(str(work / "src" / "blob.bin"), "bench", "blob.bin")
            source = "s3://bench/blob.bin"
            store = open_store(source, endpoint_url=url, max_connections=a.streams + 2)
        [f] = store.files(source)
        single = TransferOptions(part_size=max(size, 64 * 1024), concurrency=1, progress=False)
        parallel = TransferOptions(part_size=a.part_mib * MiB, concurrency=a.streams, progress=False)
        times: dict[str, list[float]] = {"single": [], "parallel": []}
        for _ in range(a.rounds):
            times["single"].append(_time_fetch(store, f, work / "copy.bin", single, sha))
            times["parallel"].append(_time_fetch(store, f, work / "copy.bin", parallel, sha))
        rate = {k: size / MB / statistics.median(v) for k, v in times.items()}
        print(f"store: {a.store} on 127.0.0.1 (own process), {a.rate_mb:g} MB/s cap per connection; "
              f"object {a.size_mb} MB; {a.rounds} rounds, alternating; median of each")
        print(f"{'mode':<34}{'seconds (each round)':<26}{'MB/s':>8}")
        print(f"{'one stream (one GET)':<34}{', '.join(f'{t:.2f}' for t in times['single']):<26}{rate['single']:>8.1f}")
        label = f"{a.streams} streams x {a.part_mib} MiB ranges"
        print(f"{label:<34}{', '.join(f'{t:.2f}' for t in times['parallel']):<26}{rate['parallel']:>8.1f}")
        print(f"ratio parallel / one stream: {rate['parallel'] / rate['single']:.2f}x")
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
