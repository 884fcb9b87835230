"""Failures contained on the replica: OpenAI traffic under admission control (429 past the
queue, never a hang or a 5xx), a bounded number of prompts per request, 503 with a reason on
every route while the model loads or after it failed, and an engine thread that dies: every
request ends at once with an error, the replica says it is not ready, and the control plane
replaces it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import running_server, wait_for, write_package

SMOL = "smollm2-135m-instruct"



def llm_package(root: Path, source: str, *, max_running: int, queue_size: int) -> Path:
    return write_package(root, f"""
name: {source}
runtime: llm
model: {{source: {source}}}
engine: {{max_running: {max_running}, num_threads: 1}}
runtime_options: {{queue_size: {queue_size}}}
""", None)


# ---- admission for the OpenAI API ----------------------------------------------------------------

async def _burst(url: str, clients: int) -> tuple[list[tuple[int, dict[str, str], bytes]], list[BaseException], int]:
    """`clients` chat requests at once (half streamed); every answer, every client error, and
    the highest in_flight + queued /headway/state showed meanwhile."""
    peak = 0
    stop = asyncio.Event()

    async def one(http: httpx.AsyncClient, i: int) -> tuple[int, dict[str, str], bytes]:
        body = {"model": SMOL, "messages": [{"role": "user", "content": f"Count from {i} to {i + 40}."}],
                "max_tokens": 24, "temperature": 0, "ignore_eos": True, "stream": i % 2 == 1}
        async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            return r.status_code, dict(r.headers), await r.aread()

    async def watch(http: httpx.AsyncClient) -> None:
        nonlocal peak
        while not stop.is_set():
            st = (await http.get(f"{url}/headway/state")).json()
            peak = max(peak, st["in_flight"] + st["queued"])
            await asyncio.sleep(0.05)

    async with httpx.AsyncClient(timeout=httpx.Timeout(120), limits=httpx.Limits(max_connections=200)) as http:
        watcher = asyncio.create_task(watch(http))
        got = await asyncio.wait_for(asyncio.gather(*(one(http, i) for i in range(clients)), return_exceptions=True),
                                     timeout=240)
        stop.set()
        await watcher
    answers = [g for g in got if not isinstance(g, BaseException)]
    return answers, [g for g in got if isinstance(g, BaseException)], peak


@pytest.mark.slow
def test_openai_burst_past_the_queue_gets_429_and_every_request_an_answer(tmp_path: Path) -> None:
    pkg = llm_package(tmp_path / "pkg", SMOL, max_running=2, queue_size=2)
    with running_server(["serve", str(pkg)], tmp_path, timeout=300) as s:
        answers, errors, peak = asyncio.run(_burst(s.url, 64))
        assert not errors, errors                     # every client got an answer (no hang, no reset)
        statuses = sorted(code for code, _, _ in answers)
        assert set(statuses) <= {200, 429}, statuses  # overload is 429, never a 5xx
        assert statuses.count(429) >= 1 and statuses.count(200) >= 4, statuses   # 2 run, 2 wait, the rest: 429
        for code, headers, body in answers:
            if code == 429:
                assert int(headers["retry-after"]) >= 1
                err = json.loads(body)["error"]
                assert err["type"] == "overloaded" and "at capacity" in err["message"], err
            else:
                text = body.decode()
                assert "[DONE]" in text if headers["content-type"].startswith("text/event-stream") else \
                    json.loads(text)["choices"][0]["finish_reason"] == "length"
        assert 1 <= peak <= 4, peak                   # the state counts OpenAI traffic, within its bounds
        st = httpx.get(f"{s.url}/headway/state").json()
        assert st["in_flight"] == 0 and st["queued"] == 0 and st["max_concurrency"] == 2
        metrics = httpx.get(f"{s.url}/metrics").text
        assert 'headway_in_flight{model="smollm2-135m-instruct"} 0.0' in metrics


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with running_server(["serve", "tinycoder-test", "--threads", "1"], tmp_path_factory.mktemp("tiny")) as s:
        yield s


def test_too_many_prompts_is_a_400_naming_the_limit(tiny) -> None:
    url = f"{tiny.url}/v1/completions"
    r = httpx.post(url, json={"model": "tinycoder-test", "prompt": ["def f():"] * 17, "max_tokens": 1}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "prompt" and err["code"] == "too_many_prompts"
    assert "at most 16" in err["message"] and "max_prompts_per_request" in err["message"]
    r = httpx.post(url, json={"model": "tinycoder-test", "prompt": [[1, 2, 3]] * 17, "max_tokens": 1}, timeout=60)
    assert r.status_code == 400 and "at most 16" in r.json()["error"]["message"]
    r = httpx.post(url, json={"model": "tinycoder-test", "prompt": ["def f():"] * 16, "max_tokens": 1}, timeout=60)
    assert r.status_code == 200 and len(r.json()["choices"]) == 16
    r = httpx.post(url, json={"model": "tinycoder-test", "prompt": "x", "n": 17, "max_tokens": 1}, timeout=60)
    assert r.status_code == 400 and "16" in r.json()["error"]["message"]      # n has its own limit
    # the generic predict endpoint takes the same body and the same limit
    r = httpx.post(f"{tiny.url}/v1/models/tinycoder-test:predict", json={"prompt": ["a"] * 17}, timeout=60)
    assert r.status_code == 422 and "at most 16" in r.text


# ---- 503 with a reason while loading ---------------------------------------------------------------

ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/chat/completions", {"model": "tinycoder-test", "messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/v1/chat/completions", {"model": "tinycoder-test", "stream": True,
                                      "messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/v1/completions", {"model": "tinycoder-test", "prompt": "hi"}),
    ("POST", "/v1/models/tinycoder-test:predict", {"prompt": "hi"}),
    ("GET", "/v1/models/tinycoder-test/schema", None),
    ("GET", "/headway/tokenizer", None),
    ("POST", "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/nowhere"}),
    ("POST", "/v1/unload_lora_adapter", {"lora_name": "a"}),
]


def _app_with_load(load: Any):
    """The real replica app around the LLM runtime, with load() replaced by `load`."""
    from headway.runtime.llm.serving import LLMRuntime
    from headway.server.app import create_app
    from headway.server.serve import resolve_target

    class Runtime(LLMRuntime):
        async def load(self) -> None:
            await load()

    package = resolve_target("tinycoder-test")
    return create_app(Runtime(package), package.config.runtime_options)


@pytest.mark.parametrize("phase", ["loading", "load_failed"])
def test_every_route_answers_503_with_the_reason_before_the_model_serves(phase: str) -> None:
    from starlette.testclient import TestClient

    async def never() -> None:
        await asyncio.sleep(3600)

    async def broken() -> None:
        raise RuntimeError("weights file is corrupt")

    kind = "model_loading" if phase == "loading" else "model_load_failed"
    with TestClient(_app_with_load(never if phase == "loading" else broken), raise_server_exceptions=False) as c:
        if phase == "load_failed":
            assert wait_for(lambda: c.get("/health/ready").json().get("reason") == "load_failed")
        for method, path, body in ROUTES:
            r = c.request(method, path, json=body)
            assert r.status_code == 503, (path, r.status_code, r.text)
            err = r.json()["error"]
            assert err["type"] == kind and "tinycoder-test" in err["message"], (path, err)
            assert ("retry-after" in r.headers) == (phase == "loading"), (path, r.headers)
        st = c.get("/headway/state")
        assert st.status_code == 200 and st.json()["ready"] is False and st.json()["reason"] == phase
        assert st.json()["in_flight"] == 0 and st.json()["queued"] == 0
        ready = c.get("/health/ready")
        assert ready.status_code == 503 and ready.json()["reason"] == phase
        assert 'headway_ready{model="tinycoder-test"} 0.0' in c.get("/metrics").text


# ---- the engine thread dies ---------------------------------------------------------------------

def _long_chat(stream: bool) -> dict[str, Any]:
    return {"model": SMOL, "messages": [{"role": "user", "content": "Tell me a very long story."}],
            "max_tokens": 1500, "temperature": 0, "ignore_eos": True, "stream": stream}


@pytest.mark.slow
def test_engine_thread_death_fails_every_request_at_once_and_the_replica_turns_unready(tmp_path: Path) -> None:
    with running_server(["serve", SMOL, "--threads", "1"], tmp_path, env={"HEADWAY_TEST_FAULTS": "1"},
                        timeout=300) as s:
        unary: dict[str, Any] = {}

        def call_unary() -> None:
            r = httpx.post(f"{s.url}/v1/chat/completions", json=_long_chat(False), timeout=120)
            unary.update(status=r.status_code, body=r.json(), at=time.monotonic())

        t = threading.Thread(target=call_unary)
        t.start()
        lines: list[str] = []
        with httpx.stream("POST", f"{s.url}/v1/chat/completions", json=_long_chat(True), timeout=120) as r:
            assert r.status_code == 200
            it = r.iter_lines()
            for line in it:   # the stream is producing tokens: now break the engine under it
                lines.append(line)
                if line.startswith("data:") and '"content": "' in line and '"content": ""' not in line:
                    break
            assert wait_for(lambda: httpx.get(f"{s.url}/headway/state").json()["in_flight"] == 2)
            os.kill(s.proc.pid, signal.SIGUSR1)
            killed = time.monotonic()
            lines.extend(it)
            ended = time.monotonic()
        t.join(30)
        assert ended - killed < 5, ended - killed
        assert lines.count("event: error") == 1 and "data: [DONE]" not in lines, lines[-5:]
        err = json.loads(lines[lines.index("event: error") + 1][5:])["error"]
        assert err["type"] == "engine_failed" and "fault injected" in err["message"], err
        assert unary["status"] == 503 and unary["body"]["error"]["type"] == "engine_failed", unary
        assert unary["at"] - killed < 5
        ready = httpx.get(f"{s.url}/health/ready")
        assert ready.status_code == 503 and ready.json()["reason"] == "engine_failed"
        assert "fault injected" in ready.json()["error"]
        st = httpx.get(f"{s.url}/headway/state").json()
        assert st["ready"] is False and "fault injected" in st["error"] and st["in_flight"] == 0
        for method, path, body in [("POST", "/v1/chat/completions", _long_chat(False)),
                                   ("POST", "/v1/completions", {"model": SMOL, "prompt": "x"}),
                                   ("GET", "/v1/models", None),
                                   ("POST", f"/v1/models/{SMOL}:predict", {"prompt": "x"})]:
            r = httpx.request(method, s.url + path, json=body, timeout=10)
            assert r.status_code == 503 and r.json()["error"]["type"] == "engine_failed", (path, r.text)
        assert s.proc.poll() is None          # the process lives on: replacing it is the control plane's call
        assert "engine thread died" in s.log()


@pytest.mark.slow
def test_control_plane_replaces_a_replica_whose_engine_died(tmp_path: Path) -> None:
    from tests.test_fleet import Plane

    plane = Plane(tmp_path / "state", tmp_path / "plane.log")
    try:
        plane.deploy({"name": "chat", "package": "tinycoder-test", "replicas": {"min": 1, "max": 1},
                      "serve_args": ["--threads", "1"], "env": {"HEADWAY_TEST_FAULTS": "1"}})
        plane.wait(lambda: plane.status("chat")["ready"] == 1, timeout=180, what="a ready replica")
        [first] = plane.status("chat")["replicas"]
        os.kill(first["handle"]["pid"], signal.SIGUSR1)

        def replaced() -> bool:
            reps = plane.status("chat")["replicas"]
            return any(r["phase"] == "ready" and r["id"] != first["id"] for r in reps)

        plane.wait(replaced, timeout=180, what="a replacement replica")
        reps = {r["id"]: r for r in plane.status("chat")["replicas"]}
        old = reps[first["id"]]
        assert old["phase"] == "failed" and "engine_failed" in old["error"], old
        [new] = [r for r in reps.values() if r["phase"] == "ready"]
        assert new["handle"]["pid"] != first["handle"]["pid"]
        r = httpx.post(f"{plane.url}/v1/completions", json={"model": "chat", "prompt": "def f():", "max_tokens": 4},
                       timeout=60)
        assert r.status_code == 200, r.text
        st = httpx.get(f"{new['url']}/headway/state").json()
        assert st["ready"] is True and st["replica_id"] == new["id"]
    finally:
        plane.stop()


async def test_manager_replaces_a_serving_replica_that_stops_being_ready(tmp_path: Path) -> None:
    """Alive but no longer ready: replaced at once when the replica says engine_failed, after
    three not-ready answers in a row otherwise; a ready answer in between resets the count."""
    import aiohttp
    from aiohttp import web

    from headway.infra.fleet.manager import ReplicaManager
    from headway.infra.fleet.spec import validate_spec
    from headway.infra.fleet.store import Store
    from headway.infra.router.proxy import RouterApp
    from headway.infra.router.replicas import ReplicaSet
    from tests.conftest import free_port
    from tests.test_fleet import RecordingProvider

    state: dict[str, Any] = {"ready": True, "model": "d"}

    async def handler(request: web.Request) -> web.Response:
        return web.json_response(state)

    app = web.Application()
    app.router.add_get("/headway/state", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()

    class Provider(RecordingProvider):
        def url(self, handle: Any) -> str:
            return f"http://127.0.0.1:{port}"

    provider = Provider()
    m = ReplicaManager(Store(tmp_path / "s.db"), provider, RouterApp(ReplicaSet([], check_interval_s=0.01)))
    m.apply(validate_spec({"name": "d", "package": "p", "replicas": {"min": 1, "max": 1}}))
    m._reconcile(m.deployments["d"])
    r = m.live[provider.started[0]]
    m._became_ready(r, {"ready": True, "model": "d"})

    async def check(times: int = 1) -> None:
        for _ in range(times):
            await asyncio.sleep(0.02)
            await m._watch(session, r)

    try:
        async with aiohttp.ClientSession() as session:
            await check()
            assert r.phase == "ready"
            state.update(ready=False, reason="loading")
            await check(2)
            state.update(ready=True)
            await check()
            state.update(ready=False)
            await check(2)
            assert r.phase == "ready" and not provider.stopped        # two in a row: not yet
            state.update(ready=False, reason="engine_failed", error="RuntimeError: boom")
            await check()
            await asyncio.sleep(0.05)                                 # stops run off the loop
            assert provider.stopped == [r.id] and r.phase == "failed"
            assert "engine_failed" in r.error and "boom" in r.error
            m.deployments["d"].next_start_at = 0
            m._reconcile(m.deployments["d"])
            assert len(provider.started) == 2 and m.counts("d") == (0, 1)   # a replacement starts
            r = m.live[provider.started[1]]
            m._became_ready(r, {"ready": True, "model": "d"})
            state.clear()
            state.update(ready=False, model="d")                     # not ready, no reason given
            await check(3)
            await asyncio.sleep(0.05)
            assert provider.stopped[-1] == r.id and r.phase == "failed"
    finally:
        await runner.cleanup()
