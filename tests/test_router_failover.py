"""A replica that dies before a stream's first token is invisible to the client.

A burst of streamed chat requests with long prompts goes to two real smollm2 replicas; one is
SIGKILLed while its requests are still prefilling. The replica writes nothing before the first
token and the router sends nothing to the client before the replica's first body bytes, so each
of those requests is retried on the other replica and completes there: 200, tokens, [DONE]. A
stream cut after its first token ends with an error event; never a 200 with an empty stream.
Behind `headway route` (fixed replicas) and behind `headway up` (control plane, 2 replicas).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.test_router_support import Proc, router, sse_events

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m-instruct"
BURST = 6
WORDS = "the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun "


# A replica that sends its status line and headers, then dies before any body byte (argv[2] == "die"),
# or streams three events (anything else).
HEADERS_THEN_DIE = '''
import asyncio, os, sys
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

async def state(request):
    return JSONResponse({"ready": True, "runtime": "custom", "model": "story", "in_flight": 0, "queued": 0,
                         "max_concurrency": 4})

async def predict(request):
    async def events():
        if sys.argv[2] == "die":
            await asyncio.sleep(0.3)        # the headers are out by now
            os._exit(9)
        for word in ("once", "upon", "a"):
            yield f"data: {word}\\n\\n".encode()
        yield b"data: [DONE]\\n\\n"
    return StreamingResponse(events(), media_type="text/event-stream")

app = Starlette(routes=[Route("/headway/state", state), Route("/health/ready", state),
                        Route("/v1/models/story:predict", predict, methods=["POST"])])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
'''


def test_headers_without_a_body_byte_do_not_start_the_stream(tmp_path: Path) -> None:
    """The router sends the client nothing (not even the status line) until the replica's first
    body bytes: a replica that sent its headers and died is retried on another one."""
    script = tmp_path / "headers_then_die.py"
    script.write_text(HEADERS_THEN_DIE)
    dying = Proc([str(script), "{port}", "die"], tmp_path / "dying.log")
    good = Proc([str(script), "{port}", "live"], tmp_path / "good.log")
    front: Proc | None = None
    try:
        dying.wait()
        good.wait()
        front = router([dying, good], tmp_path, "--policy", "round-robin", "--health-interval", "1000")
        front.wait()
        answers = [httpx.post(front.url + "/v1/models/story:predict", json={}, timeout=30) for _ in range(2)]
        assert [r.status_code for r in answers] == [200, 200]
        assert all(r.headers["x-headway-replica"] == good.url for r in answers)
        assert all(sse_events(r.text) == [("", "once"), ("", "upon"), ("", "a"), ("", "[DONE]")] for r in answers)
        assert dying.proc is not None and dying.proc.poll() is not None     # it did die, once the headers were out
        assert 'reason="disconnect"' in httpx.get(front.url + "/metrics").text
    finally:
        for p in [dying, good, *([front] if front else [])]:
            p.stop()


def smol(tmp: Path, i: int) -> Proc:
    return Proc(["-m", "headway", "serve", MODEL, "--port", "{port}", "--threads", "1"], tmp / f"smol-{i}.log")


async def one(client: httpx.AsyncClient, url: str, i: int) -> tuple[str, str]:
    """(outcome, replica): ok | error_after_token | anything else (a failure the test reports)."""
    body = {"model": MODEL, "stream": True, "max_tokens": 6, "temperature": 0,
            "messages": [{"role": "user", "content": f"Request {i}. " + WORDS * 30 + "Summarise that."}]}
    tokens, events = 0, []
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return f"status {r.status_code}: {(await r.aread())[:200]!r}", ""
            replica = r.headers.get("x-headway-replica", "")
            event = ""
            async for line in r.aiter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data = line[5:].strip()
                    events.append((event, data))
                    if event == "" and data != "[DONE]":
                        chunk = json.loads(data)
                        if "error" in chunk:
                            events[-1] = ("error", data)
                        tokens += sum(1 for c in chunk.get("choices", []) if c.get("delta", {}).get("content"))
                    event = ""
    except httpx.HTTPError as exc:
        return f"{'after' if tokens else 'before'} first token: {exc!r}", ""
    if events and events[-1] == ("", "[DONE]") and tokens:
        return "ok", replica
    if events and events[-1][0] == "error":
        return ("error_after_token" if tokens else f"error before any token: {events[-1][1][:200]}"), replica
    return f"200 with {tokens} token(s) and no [DONE] or error event: {events[-3:]}", replica


async def burst_and_kill(url: str, victim: str, kill: Callable[[], None]) -> list[tuple[str, str]]:
    """BURST streams at once; once the victim's engine holds its share of them (prefilling, by its
    own /headway/state), SIGKILL it."""
    async with httpx.AsyncClient(timeout=80) as client:
        tasks = [asyncio.create_task(one(client, url, i)) for i in range(BURST)]
        deadline = time.monotonic() + 30
        while (await client.get(victim + "/headway/state")).json()["in_flight"] < BURST // 2:
            assert time.monotonic() < deadline, "the burst never reached the victim's engine"
            await asyncio.sleep(0.005)
        kill()
        return list(await asyncio.gather(*tasks))


def check(outcomes: list[tuple[str, str]], metrics: str, victim: str) -> None:
    bad = [o for o, _ in outcomes if o not in ("ok", "error_after_token")]
    assert bad == [], outcomes
    assert sum(o == "ok" for o, _ in outcomes) >= BURST // 2, outcomes
    retried = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("headway_router_retries_total{"))
    assert retried >= 1, metrics          # the kill was felt before the first byte, and retried
    assert all(r != victim for o, r in outcomes if o == "ok"), outcomes


def test_kill_while_prefilling_behind_headway_route(tmp_path: Path) -> None:
    reps = [smol(tmp_path, i) for i in range(2)]
    front: Proc | None = None
    try:
        for p in reps:
            p.wait(timeout=90)
        front = router(reps, tmp_path, "--policy", "round-robin")
        front.wait()
        victim = reps[0]
        started = time.monotonic()
        outcomes = asyncio.run(burst_and_kill(front.url, victim.url, victim.kill))
        print(f"outcomes after {time.monotonic() - started:.1f} s: {outcomes}")
        check(outcomes, httpx.get(front.url + "/metrics").text, victim.url)
    finally:
        for p in [*reps, *([front] if front else [])]:
            p.stop()


def test_kill_while_prefilling_behind_headway_up(tmp_path: Path) -> None:
    from tests.test_fleet import Plane

    plane = Plane(tmp_path / "state", tmp_path / "plane.log")
    try:
        plane.deploy({"name": MODEL, "package": MODEL, "replicas": {"min": 2, "max": 2},
                      "router_policy": "round-robin"})
        plane.wait(lambda: plane.status(MODEL)["ready"] == 2, timeout=120, what="two ready replicas")
        [victim, _] = [r for r in plane.status(MODEL)["replicas"] if r["phase"] == "ready"]

        outcomes = asyncio.run(burst_and_kill(plane.url, victim["url"],
                                              lambda: os.kill(int(victim["handle"]["pid"]), signal.SIGKILL)))
        print(f"outcomes: {outcomes}")
        check(outcomes, httpx.get(plane.url + "/metrics").text, victim["url"])
    finally:
        plane.stop()
