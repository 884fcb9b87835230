"""Cold start, measured: from zero replicas to the first token, through a real control plane.

    python -m headway.bench.cold_start --model smollm2-135m-instruct --runs 5

Each run (after one not counted: the first after `headway up` meets a standby still importing)
deploys the model with `replicas.min: 0` under a fresh name (no replica, no autoscaler
history), sends one streamed chat completion, and times its first token; the replica's cold-start
breakdown comes from the control plane. The baseline, in the same run: the same request to the
replica once it is warm. Weights come from the node's cache (converted once beforehand), which is
what the target speaks of. Also in the same run: a control plane without its standby process
(`headway up --no-standby`: each replica a fresh interpreter); `--cold-cache` adds runs with an
empty cache directory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import httpx

from headway.infra.fleet.local_plane import local_plane

PHASES = ("process_s", "started_s", "fetched_s", "loaded_s", "warmed_s", "ready_s")


def _first_token(url: str, name: str) -> float:
    started = time.perf_counter()
    body = {"model": name, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {r.read()!r}")
        for line in r.iter_lines():
            if line.startswith("data:") and '"content"' in line:
                item = json.loads(line[5:])
                if item["choices"] and item["choices"][0]["delta"].get("content"):
                    return time.perf_counter() - started
    raise RuntimeError("the stream ended without a token")


def _api(url: str, method: str, path: str, body: object = None) -> dict:
    r = httpx.request(method, f"{url}/headway/control{path}", json=body, timeout=30)
    r.raise_for_status()
    return r.json()


def run(model: str, runs: int, port: int, cache: str | None, cpu: float, standby: bool = True) -> dict:
    with local_plane(port, {"HEADWAY_CACHE": cache} if cache else None,
                     extra=None if standby else ["--no-standby"]) as url:
        cold, warm, breakdowns = [], [], []
        for i in range(runs + 1):   # run 0 meets a standby still importing (a control plane just up): not counted
            name = f"cold-{i}"
            _api(url, "POST", "/deployments", {"name": name, "package": model, "replicas": {"min": 0, "max": 1},
                                               "resources": {"cpu": cpu}, "activator": {"timeout_s": 300}})
            first = _first_token(url, name)
            again = min(_first_token(url, name) for _ in range(3))
            st = _api(url, "GET", f"/deployments/{name}")
            [rep] = [r for r in st["replicas"] if r["phase"] == "ready"]
            if i:
                cold.append(first)
                warm.append(again)
                breakdowns.append(rep["breakdown"])
            _api(url, "DELETE", f"/deployments/{name}")
            deadline = time.monotonic() + 60
            while any(d["name"] == name for d in _api(url, "GET", "/deployments")["deployments"]):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not go away")
                time.sleep(0.2)
            if standby:
                time.sleep(9)   # the node's next standby starts 5 s after the last became a replica, then imports
            print(f"  run {i}{' (not counted)' if not i else ''}: first token from zero {first:.2f} s, "
                  f"warm {again * 1000:.0f} ms, "
                  + ", ".join(f"{k} {rep['breakdown'].get(k, float('nan')):.2f}" for k in PHASES), flush=True)
        return {"cold": cold, "warm": warm, "breakdown": {k: statistics.median(b[k] for b in breakdowns if k in b)
                                                           for k in PHASES if any(k in b for b in breakdowns)}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--port", type=int, default=18765)
    ap.add_argument("--cpu", type=float, default=2, help="the replica's CPU share (its threads)")
    ap.add_argument("--cold-cache", action="store_true", help="also run with an empty node cache")
    args = ap.parse_args(argv)
    from headway.library import resolve

    resolve(args.model)   # the warm node cache the target assumes
    rows = [("warm node cache", run(args.model, args.runs, args.port, None, args.cpu)),
            ("  no standby", run(args.model, args.runs, args.port, None, args.cpu, standby=False))]
    if args.cold_cache:
        with tempfile.TemporaryDirectory() as empty:
            rows.append(("empty node cache", run(args.model, min(args.runs, 2), args.port, empty, args.cpu)))
    print(f"\nfrom zero to first token, {args.model}, {args.runs} runs each")
    print(f"{'case':<18}{'p50 s':>8}{'min s':>8}{'max s':>8}{'warm replica ms':>17}{'cold/warm':>10}")
    for label, r in rows:
        p50, w = statistics.median(r["cold"]), statistics.median(r["warm"])
        print(f"{label:<18}{p50:>8.2f}{min(r['cold']):>8.2f}{max(r['cold']):>8.2f}{w * 1000:>17.0f}{p50 / w:>9.0f}x")
    base, fresh = statistics.median(rows[0][1]["cold"]), statistics.median(rows[1][1]["cold"])
    print(f"the standby process (torch and the server imported ahead) cuts the cold start {fresh / base:.2f}x")
    print("\nbreakdown (median seconds since scheduled, at the end of each phase):")
    for label, r in rows:
        print(f"  {label}: " + ", ".join(f"{k.removesuffix('_s')} {v:.2f}" for k, v in r["breakdown"].items()))


if __name__ == "__main__":
    main()
