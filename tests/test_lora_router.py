"""The replica-state contract for adapters, end to end: two tinycoder replicas, one serving a
LoRA adapter loaded at run time; the router reads `adapters` from /headway/state and sends
requests that name the adapter to that replica only."""

from __future__ import annotations

import time

import httpx
import pytest

from headway.library import resolve
from headway.runtime.llm.config import ModelConfig
from headway.runtime.llm.lora.peft import random_adapter
from tests.test_router_support import Proc, router

pytestmark = pytest.mark.slow  # three processes (~15 s on a shared 2-core machine)


def test_router_sends_adapter_requests_to_the_replica_serving_it(tmp_path) -> None:
    cfg = ModelConfig.from_model_dir(resolve("tinycoder-test").path)
    path = random_adapter(tmp_path / "sql", cfg, r=4, std=0.5)
    procs = {f"r{i}": Proc(["-m", "headway", "serve", "tinycoder-test", "--threads", "1", "--port", "{port}",
                            "--lora-root", str(tmp_path)],
                           tmp_path / f"llm-{i}.log") for i in range(2)}
    try:
        for p in procs.values():
            p.wait(timeout=180)
        load = httpx.post(procs["r1"].url + "/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": str(path)},
                          timeout=60)
        assert load.status_code == 200, load.text
        procs["router"] = router([procs["r0"], procs["r1"]], tmp_path)
        procs["router"].wait()
        url = procs["router"].url
        deadline = time.monotonic() + 10  # the router polls /headway/state
        while time.monotonic() < deadline:
            if "sql" in {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}:
                break
            time.sleep(0.1)
        body = {"model": "sql", "prompt": "def f(", "max_tokens": 4, "temperature": 0}
        served = set()
        for _ in range(6):
            r = httpx.post(url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            served.add(r.headers["x-headway-replica"])
        direct = httpx.post(procs["r1"].url + "/v1/completions", json=body, timeout=60).json()
        assert r.json()["choices"][0]["text"] == direct["choices"][0]["text"]
        assert len(served) == 1
        assert httpx.get(procs["r1"].url + "/headway/state").json()["lora"]["requests"]["sql"] >= 7
    finally:
        for p in procs.values():
            p.stop()
