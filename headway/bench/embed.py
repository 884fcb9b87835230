"""`python -m headway.bench.embed`: Headway's embeddings replica against sentence-transformers,
side by side in one run, on the same model, threads and dtype (float32).

Two figures:
1. throughput (texts/s) on a fixed corpus of mixed-length texts (5-500 tokens; inputs past the
   model's limit truncated, as sentence-transformers does): Headway's server (a subprocess on a
   real port) under `--clients` concurrent clients, against `SentenceTransformer.encode` in this
   process with the best of `--batch-sizes`; rounds alternate (ST, Headway, ST, ...) and each
   side keeps its best round, since a shared machine is noisy;
2. interactive latency: p50/p99 of single-sentence requests sent one at a time, idle and while
   a `--job-texts` job (requests of 2,000 texts) runs; the job is dropped (its client disconnects)
   once the samples are taken.

Prints a JSON report (and writes it with --out); quote figures with the machine and its load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from headway.bench.embed_corpus import mixed_corpus, short_sentences
from headway.bench.report import machine_info, percentile
from headway.bench.servers import wait_ready

ROOT = Path(__file__).resolve().parents[2]


def start_server(model: str, port: int, threads: int, extra: list[str]) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "headway", "serve", model, "--port", str(port), "--threads",
                             str(threads), "--dtype", "float32", "--log-level", "warning", *extra],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_ready(f"http://127.0.0.1:{port}/health/ready", proc, 180,
               why=lambda: proc.stderr.read().decode() if proc.stderr and proc.poll() is not None else "")
    return proc


async def headway_throughput(url: str, texts: list[str], clients: int, per_request: int) -> float:
    chunks = [texts[i:i + per_request] for i in range(0, len(texts), per_request)]
    it = iter(chunks)

    async def client(c: httpx.AsyncClient) -> None:
        for chunk in it:
            r = await c.post("/v1/embeddings", json={"input": chunk, "truncate": True, "encoding_format": "base64"})
            r.raise_for_status()

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients)) as c:
        started = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(clients)))
        return len(texts) / (time.perf_counter() - started)


def st_throughput(st: Any, texts: list[str], batch_sizes: list[int]) -> dict[int, float]:
    out = {}
    for bs in batch_sizes:
        started = time.perf_counter()
        st.encode(texts, batch_size=bs, convert_to_numpy=True)
        out[bs] = len(texts) / (time.perf_counter() - started)
    return out


async def singles(c: httpx.AsyncClient, sentences: list[str], stop: asyncio.Event | None = None) -> list[float]:
    lat = []
    for s in sentences:
        if stop is not None and stop.is_set():
            break
        t = time.perf_counter()
        r = await c.post("/v1/embeddings", json={"input": s})
        r.raise_for_status()
        lat.append(time.perf_counter() - t)
        await asyncio.sleep(0.01)
    return lat


async def interactive(url: str, samples: int, job_texts: int, job_max_tokens: int) -> dict[str, Any]:
    sentences = short_sentences(samples, seed=21)
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        await singles(c, sentences[:10])   # warm
        idle = await singles(c, sentences)
        job = mixed_corpus(job_texts, seed=31, max_tokens=job_max_tokens)
        done = asyncio.Event()
        async with httpx.AsyncClient(base_url=url, timeout=3600) as bulk:
            async def run_job() -> None:
                await asyncio.gather(*(bulk.post("/v1/embeddings", json={"input": job[i:i + 2000], "truncate": True})
                                       for i in range(0, len(job), 2000)))
                done.set()
            task = asyncio.create_task(run_job())
            while not (await c.get("/headway/state")).json()["embed"]["pending_tokens"]:
                await asyncio.sleep(0.05)
            loaded = await singles(c, sentences, done)
            pending = (await c.get("/headway/state")).json()["embed"]["pending_tokens"]
            task.cancel()
    p99_idle, p99_loaded = percentile(idle, 99), percentile(loaded, 99)
    return {"samples_idle": len(idle), "samples_under_load": len(loaded),
            "idle_p50_ms": round(percentile(idle, 50) * 1e3, 1), "idle_p99_ms": round(p99_idle * 1e3, 1),
            "loaded_p50_ms": round(percentile(loaded, 50) * 1e3, 1), "loaded_p99_ms": round(p99_loaded * 1e3, 1),
            "p99_ratio": round(p99_loaded / p99_idle, 2), "job_still_running_at_end": pending > 0}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m headway.bench.embed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--port", type=int, default=8790)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--corpus", type=int, default=1000, help="texts in the throughput corpus")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--texts-per-request", type=int, default=4)
    ap.add_argument("--batch-sizes", default="16,32,64,128")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--samples", type=int, default=200, help="single-sentence requests, idle and under load")
    ap.add_argument("--job-texts", type=int, default=10_000)
    ap.add_argument("--job-max-tokens", type=int, default=500)
    ap.add_argument("--engine", default=None, help='engine options as JSON, e.g. \'{"max_batch_tokens": 2048}\'')
    ap.add_argument("--skip-interactive", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)

    import torch
    from sentence_transformers import SentenceTransformer

    from headway.library import resolve

    torch.set_num_threads(a.threads)
    st = SentenceTransformer(str(resolve(a.model).path), device="cpu")
    texts = mixed_corpus(a.corpus, seed=0)
    st.encode(texts[:32], batch_size=16)
    target = a.model
    if a.engine:     # a package around the library model, with these engine options
        pkg = Path(tempfile.mkdtemp(prefix="headway-bench-embed-"))
        (pkg / "headway.yaml").write_text(json.dumps({"name": a.model, "runtime": "embeddings",
                                                       "model": {"source": a.model}, "engine": json.loads(a.engine)}))
        target = str(pkg)
    proc = start_server(target, a.port, a.threads, [])
    url = f"http://127.0.0.1:{a.port}"
    try:
        asyncio.run(headway_throughput(url, texts[:64], a.clients, a.texts_per_request))   # warm
        st_rounds, hw_rounds = [], []
        for _ in range(a.rounds):
            st_rounds.append(st_throughput(st, texts, [int(b) for b in a.batch_sizes.split(",")]))
            hw_rounds.append(asyncio.run(headway_throughput(url, texts, a.clients, a.texts_per_request)))
        best_st = max((v, bs) for r in st_rounds for bs, v in r.items())
        report: dict[str, Any] = {
            "machine": machine_info(), "load_average": os.getloadavg(), "threads": a.threads, "dtype": "float32",
            "engine": json.loads(a.engine) if a.engine else "defaults",
            "throughput": {"corpus_texts": len(texts), "clients": a.clients, "texts_per_request": a.texts_per_request,
                           "headway_texts_per_s": round(max(hw_rounds), 1),
                           "headway_rounds": [round(v, 1) for v in hw_rounds],
                           "st_texts_per_s": round(best_st[0], 1), "st_best_batch_size": best_st[1],
                           "st_rounds": [{bs: round(v, 1) for bs, v in r.items()} for r in st_rounds],
                           "ratio": round(max(hw_rounds) / best_st[0], 2)}}
        if not a.skip_interactive:
            report["interactive"] = asyncio.run(interactive(url, a.samples, a.job_texts, a.job_max_tokens))
        report["load_average_end"] = os.getloadavg()
    finally:
        proc.terminate()
        proc.wait(10)
    print(json.dumps(report, indent=2))
    if a.out:
        a.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
