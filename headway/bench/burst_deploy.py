"""A burst against a deployment at its minimum, through a real control plane and real replicas.

    python -m headway.bench.burst_deploy --model smollm2-135m-instruct

Steady load at `--base` concurrent streams, then `--factor` times as many for `--burst-s`, then
steady again; every request is a streamed chat completion. Two deployments of the same model
run side by side in one control plane, one after the other on the same load: autoscaled
(min 1 → max) and pinned at its minimum (the baseline). Reported: requests sent, completed and
lost (an error, a 5xx or a cut stream), latency p50/p95/p99 of time to first token and of the
whole request, and the replicas the autoscaled one reached.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import httpx

from headway.infra.fleet.local_plane import local_plane


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _one(url: str, name: str, tokens: int) -> tuple[bool, float, float, str]:
    started = time.perf_counter()
    ttft = None
    body = {"model": name, "messages": [{"role": "user", "content": "Write a short poem about the sea."}],
            "max_tokens": tokens, "stream": True}
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as r:
            if r.status_code != 200:
                return False, 0.0, 0.0, f"{r.status_code}: {r.read()[:200]!r}"
            done = False
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                item = json.loads(data)
                if "error" in item:
                    return False, 0.0, 0.0, str(item["error"])
                if ttft is None and item["choices"] and item["choices"][0]["delta"].get("content"):
                    ttft = time.perf_counter() - started
            if not done:
                return False, 0.0, 0.0, "stream ended without [DONE]"
    except httpx.HTTPError as exc:
        return False, 0.0, 0.0, f"{type(exc).__name__}: {exc}"
    return True, ttft or 0.0, time.perf_counter() - started, ""


def load(url: str, name: str, base: int, factor: int, steady_s: float, burst_s: float, tokens: int,
         control: str) -> dict:
    results: list[tuple[bool, float, float, str]] = []
    lock = threading.Lock()
    peak = [0]
    end_all = time.monotonic() + 2 * steady_s + burst_s
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            st = httpx.get(f"{control}/headway/control/deployments/{name}", timeout=10).json()
            peak[0] = max(peak[0], st["ready"])
            time.sleep(0.5)

    def worker(active_from: float, active_until: float) -> None:
        while time.monotonic() < active_from:
            time.sleep(0.05)
        while time.monotonic() < active_until:
            res = _one(url, name, tokens)
            with lock:
                results.append(res)

    t0 = time.monotonic()
    # `base` workers run throughout; the burst adds (factor - 1) * base more for its duration
    threads = [threading.Thread(target=worker, args=(t0, end_all)) for _ in range(base)]
    threads += [threading.Thread(target=worker, args=(t0 + steady_s, t0 + steady_s + burst_s))
                for _ in range(base * (factor - 1))]
    w = threading.Thread(target=watch, daemon=True)
    w.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(end_all - time.monotonic() + 400)
    stop.set()
    ok = [r for r in results if r[0]]
    return {"sent": len(results), "ok": len(ok), "lost": len(results) - len(ok),
            "errors": sorted({r[3] for r in results if not r[0]})[:3],
            "ttft": [r[1] for r in ok], "e2e": [r[2] for r in ok], "peak_replicas": peak[0]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--base", type=int, default=1, help="steady concurrent streams")
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--steady-s", type=float, default=10)
    ap.add_argument("--burst-s", type=float, default=30)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--max-replicas", type=int, default=2)
    ap.add_argument("--cpu", type=float, default=1, help="each replica's CPU share")
    ap.add_argument("--port", type=int, default=18766)
    args = ap.parse_args(argv)
    from headway.library import resolve

    resolve(args.model)
    rows = []
    with local_plane(args.port) as control:
        for label, max_r in (("autoscaled", args.max_replicas), ("pinned at min", 1)):
            name = "burst-auto" if max_r > 1 else "burst-pinned"
            spec = {"name": name, "package": args.model, "replicas": {"min": 1, "max": max_r},
                    "resources": {"cpu": args.cpu},
                    "autoscaling": {"target_concurrency": max(1, args.base * 2), "target_utilization": 1.0,
                                    "window_s": 20, "panic_window_s": 3, "scale_down_delay_s": 10, "tick_s": 0.5}}
            httpx.post(f"{control}/headway/control/deployments", json=spec, timeout=30).raise_for_status()
            while httpx.get(f"{control}/headway/control/deployments/{name}", timeout=10).json()["ready"] < 1:
                time.sleep(0.2)
            r = load(control, name, args.base, args.factor, args.steady_s, args.burst_s, args.tokens, control)
            rows.append((label, r))
            print(f"  {label}: {r['sent']} sent, {r['ok']} completed, {r['lost']} lost, peak replicas "
                  f"{r['peak_replicas']} {r['errors'] or ''}", flush=True)
            httpx.delete(f"{control}/headway/control/deployments/{name}", timeout=30)
            while any(d["name"] == name for d in
                      httpx.get(f"{control}/headway/control/deployments", timeout=10).json()["deployments"]):
                time.sleep(0.2)
    print(f"\n{args.factor}x burst ({args.base} -> {args.base * args.factor} streams for {args.burst_s:g} s), "
          f"{args.model}, {args.tokens} tokens each")
    print(f"{'deployment':<16}{'sent':>6}{'lost':>6}{'replicas':>10}{'TTFT p50':>10}{'p95':>8}{'p99':>8}"
          f"{'e2e p50':>9}{'p95':>8}")
    for label, r in rows:
        print(f"{label:<16}{r['sent']:>6}{r['lost']:>6}{r['peak_replicas']:>10}{_pct(r['ttft'], .5):>10.2f}"
              f"{_pct(r['ttft'], .95):>8.2f}{_pct(r['ttft'], .99):>8.2f}{_pct(r['e2e'], .5):>9.2f}"
              f"{_pct(r['e2e'], .95):>8.2f}")
    a, b = rows[0][1], rows[1][1]
    if a["ttft"] and b["ttft"]:
        print(f"TTFT p95 pinned / autoscaled: {_pct(b['ttft'], .95) / _pct(a['ttft'], .95):.2f}x; "
              f"e2e p50: {statistics.median(b['e2e']) / statistics.median(a['e2e']):.2f}x")


if __name__ == "__main__":
    main()
