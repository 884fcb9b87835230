"""Routing policies on a multi-turn chat trace, over real LLM replicas, side by side in one run.

    python -m headway.bench.router_trace [--replicas 4] [--conversations 200] \\
        [--turns 4 --max-turns 8] [--policy predicted-latency --policy round-robin]

For each policy, in turn and on the same trace: start `--replicas` fresh replicas of the model
(`headway serve`, each with its share of the CPU threads; a fresh start empties their prefix
caches), a router with that policy in front of them, and replay the trace (conversations of
several turns; groups of conversations share a 500-1,500-token system prompt) through the
router with the `headway bench` client. Reports, per policy: the prefix-cache hit rate summed
over the replicas (cached prompt tokens / prompt tokens looked up, from their /metrics), TTFT
p50/p90/p99, errors, and the ratios of the first policy against each other one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from headway.bench.client import Target, run_workload, send_request
from headway.bench.report import percentile
from headway.bench.router import _free_port, _start, _wait
from headway.bench.text import TextGenerator
from headway.bench.workloads import LengthDist, multi_turn_workload

_COUNTER = re.compile(r"^(headway_llm_prefix_cache_(?:hit|query)_tokens)_total\{[^}]*\} ([0-9.e+]+)$", re.M)


def cache_counters(url: str) -> dict[str, float]:
    """Prefix-cache hit and query token counters of one replica (from its /metrics)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    found = {name.removeprefix("headway_llm_prefix_cache_"): float(v) for name, v in _COUNTER.findall(text)}
    if set(found) != {"hit_tokens", "query_tokens"}:
        raise RuntimeError(f"{url}/metrics has no prefix-cache counters; is it a Headway LLM replica?")
    return found


def _deployment_name(args: argparse.Namespace) -> str:
    return re.sub(r"[^a-z0-9._-]", "-", Path(args.model).name.lower())


def _served(args: argparse.Namespace, tmp: Path) -> str:
    """What the replicas serve: the model itself, or a package around it that caps the KV pool."""
    if not args.kv_cache_tokens:
        return str(args.model)
    pkg = tmp / "package"
    pkg.mkdir(exist_ok=True)
    name = _deployment_name(args)
    (pkg / "headway.yaml").write_text(json.dumps({  # JSON is YAML
        "name": name, "runtime": "llm", "model": {"source": args.model},
        "engine": {"kv_cache_tokens": args.kv_cache_tokens}}))
    return str(pkg)


def run_policy(policy: str, args: argparse.Namespace, workload: Any, tmp: Path) -> dict[str, Any]:
    served = _served(args, tmp)
    with ExitStack() as stack:
        urls = []
        procs = []
        for i in range(args.replicas):  # start all, then wait: their loads overlap
            port = _free_port()
            log = tmp / f"{policy}-replica-{i}.log"
            cmd = ["-m", "headway", "serve", served, "--threads", str(args.threads), "--log-level", "warning"]
            if args.dtype:
                cmd += ["--dtype", args.dtype]
            proc = _start(cmd, port, log)
            stack.callback(proc.terminate)
            urls.append(f"http://127.0.0.1:{port}")
            procs.append((proc, log))
        for url, (proc, log) in zip(urls, procs):
            _wait(url, proc, log, timeout=300)
        rport = _free_port()
        rlog = tmp / f"{policy}-router.log"
        exact = (["--tokenizer", f"{_deployment_name(args)}={args.model}"] if args.router_tokenizer
                 else ["--no-auto-tokenizer"])
        rproc = _start(["-m", "headway.infra.router.cli", *[a for u in urls for a in ("--replica", u)],
                        "--policy", policy, *exact, "--log-level", "warning"], rport, rlog)
        stack.callback(rproc.terminate)
        router = f"http://127.0.0.1:{rport}"
        _wait(router, rproc, rlog)

        async def warm() -> None:  # each replica pays its one-off first-request costs outside the run
            async with httpx.AsyncClient(timeout=120) as client:
                for url in urls:
                    await send_request(client, Target("warm", url, args.model, api=args.api), [{"role": "user", "content": "Hi."}], 2)

        asyncio.run(warm())
        before = [cache_counters(u) for u in urls]
        target = Target(policy, router, args.model, api=args.api)
        run = asyncio.run(run_workload(target, workload, duration_limit_s=args.duration_limit))
        after = [cache_counters(u) for u in urls]
        decisions = httpx.get(router + "/headway/router", timeout=10).json()["policies"]
        states = [httpx.get(u + "/headway/state", timeout=10).json() for u in urls]
    hit = sum(a["hit_tokens"] - b["hit_tokens"] for a, b in zip(after, before))
    query = sum(a["query_tokens"] - b["query_tokens"] for a, b in zip(after, before))
    ok = [r for r in run.results if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    return {
        "policy": policy, "requests": len(run.results), "completed": len(ok), "errors": len(run.results) - len(ok),
        "error_messages": sorted({str(r.error) for r in run.results if not r.ok})[:5],
        "wall_s": run.wall_s, "prefix_cache_hit_rate": hit / query if query else 0.0,
        "cached_tokens": hit, "prompt_tokens_looked_up": query,
        "ttft_p50_s": percentile(ttft, 50) if ttft else None, "ttft_p90_s": percentile(ttft, 90) if ttft else None,
        "ttft_p99_s": percentile(ttft, 99) if ttft else None,
        "per_replica_query_tokens": [a["query_tokens"] - b["query_tokens"] for a, b in zip(after, before)],
        "decisions": {d: p["reasons"] for d, p in decisions.items()},
        "preemptions": [s.get("preemptions") for s in states],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="library name or model directory to serve")
    ap.add_argument("--api", default="chat", choices=["chat", "completions"],
                    help="OpenAI API used (completions for models without a chat template)")
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads per replica (default: CPUs / replicas, >= 1)")
    ap.add_argument("--dtype", default=None, help="replica dtype (default: the engine's auto choice)")
    ap.add_argument("--kv-cache-tokens", type=int, default=0,
                    help="KV pool of each replica, in tokens (default: the engine's, from its memory budget)")
    ap.add_argument("--policy", action="append", default=None,
                    help="policies to compare, first against the rest (default: predicted-latency, round-robin)")
    ap.add_argument("--conversations", type=int, default=200)
    ap.add_argument("--turns", type=int, default=4, help="fewest turns per conversation")
    ap.add_argument("--max-turns", type=int, default=8, help="most turns per conversation")
    ap.add_argument("--groups", type=int, default=8, help="groups of conversations sharing a system prompt")
    ap.add_argument("--user-tokens", default="uniform:20:80", help="user message length: N | uniform:LO:HI")
    ap.add_argument("--output-tokens", default="uniform:16:48", help="answer length: N | uniform:LO:HI")
    ap.add_argument("--concurrency", type=int, default=8, help="conversations in flight at once")
    ap.add_argument("--duration-limit", type=float, default=1200.0, help="seconds per policy run at most")
    ap.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.json for exact token counts")
    ap.add_argument("--no-router-tokenizer", dest="router_tokenizer", action="store_false",
                    help="route on the prompt text (~4 characters a token) instead of exact token ids "
                         "(by default the router gets the model's tokenizer: `headway route --tokenizer`)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    policies = args.policy or ["predicted-latency", "round-robin"]
    if args.replicas < 1 or args.conversations < 1 or args.concurrency < 1 or len(policies) < 2:
        ap.error("--replicas, --conversations and --concurrency must be >= 1, and at least two policies compared")
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.replicas)
    tok = None
    if args.tokenizer is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(args.tokenizer))
    workload = multi_turn_workload(args.conversations, args.turns, args.concurrency, args.groups,
                                   LengthDist.parse(args.user_tokens), LengthDist.parse(args.output_tokens),
                                   TextGenerator(tok), seed=args.seed, max_turns=args.max_turns)
    turns = sum(len(s.turns) for s in workload.sessions)
    print(f"trace: {args.conversations} conversations, {turns} turns, {args.groups} shared system prompts; "
          f"{args.replicas} replicas x {args.threads} thread(s), KV {args.kv_cache_tokens or 'default'} tokens each, on {os.cpu_count()} CPUs; concurrency {args.concurrency}",
          flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="headway-trace-bench-") as tmp:
        for policy in policies:
            t0 = time.perf_counter()
            res = run_policy(policy, args, workload, Path(tmp))
            results.append(res)
            if not res["completed"]:
                raise SystemExit(f"{policy}: every request failed: {res['error_messages']}")
            print(f"  {policy:<18} hit rate {res['prefix_cache_hit_rate']:6.1%}   TTFT p50 {res['ttft_p50_s'] * 1000:7.0f} ms"
                  f"  p90 {res['ttft_p90_s'] * 1000:7.0f} ms  p99 {res['ttft_p99_s'] * 1000:7.0f} ms   "
                  f"{res['completed']}/{res['requests']} ok   ({time.perf_counter() - t0:.0f} s)", flush=True)
            print(f"    decisions {res['decisions']}  preemptions per replica {res['preemptions']}  "
                  f"prompt tokens per replica {[int(x) for x in res['per_replica_query_tokens']]}", flush=True)
            if res["errors"]:
                print(f"    errors: {res['error_messages']}")
    first = results[0]
    ratios = {}
    for other in results[1:]:
        r = {"hit_rate_ratio": first["prefix_cache_hit_rate"] / max(other["prefix_cache_hit_rate"], 1e-9),
             "ttft_p90_ratio": other["ttft_p90_s"] / first["ttft_p90_s"],
             "ttft_p50_ratio": other["ttft_p50_s"] / first["ttft_p50_s"]}
        ratios[other["policy"]] = r
        print(f"{first['policy']} vs {other['policy']}: hit rate {r['hit_rate_ratio']:.2f}x higher, "
              f"TTFT p90 {r['ttft_p90_ratio']:.2f}x lower (p50 {r['ttft_p50_ratio']:.2f}x)   targets: >= 3x, >= 2x")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "workload": workload.params, "results": results, "ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
