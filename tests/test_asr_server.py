"""The ASR runtime with the real whisper-base model from the library, as a real server process:
the official OpenAI client, every response format, SSE streaming, the usual containers, bad
inputs, batching across clients, a disconnect freeing its work, WER against faster-whisper's own
transcribe, and the route through `headway route`."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from headway.bench.speech import SENTENCES, encode, have_espeak, have_piper, recording, synthesize, wav_bytes, wer
from tests.conftest import ServerProcess, running_server
from tests.test_router_support import router

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("faster_whisper") is None,
                                 reason="needs faster-whisper (pip install -e '.[asr]')"),
              pytest.mark.skipif(not have_espeak(), reason="needs espeak-ng to synthesize speech with a known text "
                                 "(scripts/setup installs it; or apt-get install espeak-ng)")]

MODEL = "whisper-base"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """whisper-base from a package: short audio limit, batches of 2 (so long audio queues chunks)."""
    tmp = tmp_path_factory.mktemp("asr")
    pkg = tmp / "pkg"
    pkg.mkdir()
    (pkg / "headway.yaml").write_text(
        f"name: {MODEL}\nruntime: asr\nmodel: {{source: {MODEL}}}\n"
        "engine: {max_audio_seconds: 300, max_batch_size: 2}\n")
    with running_server(["serve", str(pkg), "--log-level", "debug"], tmp, timeout=300) as s:   # debug: no payload
        yield s


@pytest.fixture(scope="module")
def speech() -> tuple[bytes, str]:
    audio, text = recording(25)
    return wav_bytes(audio), text


def post(server: ServerProcess, data: dict[str, object], file: bytes | None, filename: str = "a.wav",
         timeout: float = 300) -> httpx.Response:
    files = {"file": (filename, file, "application/octet-stream")} if file is not None else None
    return httpx.post(server.url + "/v1/audio/transcriptions", data={"model": MODEL, **data}, files=files,
                      timeout=timeout)


def state(server: ServerProcess) -> dict[str, object]:
    return httpx.get(server.url + "/headway/state", timeout=10).json()


def test_openai_client_transcribes_and_wer_is_no_worse_than_faster_whispers_own(
        server: ServerProcess, speech: tuple[bytes, str]) -> None:
    from faster_whisper import WhisperModel
    from openai import OpenAI

    from headway.library import resolve

    wav, text = speech
    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    got = client.audio.transcriptions.create(model=MODEL, file=("speech.wav", wav), language="en")
    ours = wer(text, got.text)
    model = WhisperModel(str(resolve(MODEL).path), device="cpu", compute_type="int8", cpu_threads=2)
    segments, _ = model.transcribe(synthesize_back(wav), language="en")
    theirs = wer(text, "".join(s.text for s in segments))
    print(f"WER espeak-ng: headway {ours:.3f}, faster-whisper transcribe {theirs:.3f}")
    assert ours <= max(theirs, 0.02) + 0.02, (ours, theirs)
    assert ours < 0.25
    usage = got.usage
    assert usage is not None and abs(usage.seconds - len(np.frombuffer(wav[44:], "<i2")) / 16000) < 0.01  # type: ignore[union-attr]


@pytest.mark.skipif(not have_piper(), reason="needs piper-tts for the library's Piper voice (piper-joe)")
def test_wer_on_the_piper_voice_is_at_most_ten_percent(server: ServerProcess) -> None:
    audio, text = recording(45, voice="piper")
    r = post(server, {"language": "en"}, wav_bytes(audio))
    assert r.status_code == 200, r.text
    got = wer(text, r.json()["text"])
    print(f"WER piper-joe: headway {got:.3f}")
    assert got <= 0.10, (got, r.json()["text"])


def synthesize_back(wav: bytes) -> np.ndarray:
    return np.frombuffer(wav[44:], "<i2").astype(np.float32) / 32767


def test_verbose_json_words_and_segments_are_on_the_original_timeline(server: ServerProcess) -> None:
    """Long audio with silences: several chunks, reassembled in order, times in the recording."""
    audio, text = recording(75, pause_s=1.5)
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    got = client.audio.transcriptions.create(model=MODEL, file=("long.wav", wav_bytes(audio)),
                                             response_format="verbose_json",
                                             timestamp_granularities=["word", "segment"])
    duration = audio.size / 16000
    assert got.duration == pytest.approx(duration, abs=0.01) and got.language == "en"
    starts = [s.start for s in got.segments]  # type: ignore[union-attr]
    assert starts == sorted(starts) and got.segments[-1].end <= duration + 0.01  # type: ignore[index]
    assert got.segments[-1].end > 60      # type: ignore[index]  # not chunk-local times
    words = got.words or []
    assert len(words) > 100 and all(a.start <= b.start for a, b in zip(words, words[1:]))
    assert wer(text, got.text) < 0.25
    # the 2nd sentence starts after the 1st and its pause: a word timestamp there, not at chunk time 0
    first_after = next(w for w in words if w.word.lower().startswith("every"))
    assert first_after.start > 1.5 + len(synthesize(SENTENCES[0])) / 16000 - 0.5


@pytest.mark.parametrize("fmt", ["flac", "mp3", "ogg", "webm"])
def test_usual_containers_decode(server: ServerProcess, fmt: str) -> None:
    audio = synthesize(SENTENCES[4])
    r = post(server, {"language": "en"}, encode(audio, fmt), f"a.{fmt}")
    assert r.status_code == 200, r.text
    assert wer(SENTENCES[4], r.json()["text"]) < 0.3


def test_text_srt_vtt(server: ServerProcess) -> None:
    wav = wav_bytes(synthesize(SENTENCES[0]))
    text = post(server, {"response_format": "text"}, wav)
    assert text.headers["content-type"].startswith("text/plain") and "fox" in text.text.lower()
    srt = post(server, {"response_format": "srt"}, wav).text
    assert re.match(r"1\n00:00:0\d,\d{3} --> 00:00:0\d,\d{3}\n\S", srt)
    assert post(server, {"response_format": "vtt"}, wav).text.startswith("WEBVTT\n\n00:00:")


def test_stream_sends_deltas_then_done_through_the_openai_client(server: ServerProcess) -> None:
    from openai import OpenAI

    audio, _ = recording(40, pause_s=1.0)
    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    events = list(client.audio.transcriptions.create(model=MODEL, file=("a.wav", wav_bytes(audio)), stream=True))
    kinds = [e.type for e in events]
    assert kinds[-1] == "transcript.text.done" and kinds.count("transcript.text.delta") >= 2
    assert "".join(e.delta for e in events[:-1]).strip() == events[-1].text  # type: ignore[union-attr]


def test_bad_inputs_get_a_clear_4xx(server: ServerProcess) -> None:
    def err(r: httpx.Response, status: int, param: str) -> str:
        assert r.status_code == status, r.text
        body = r.json()["error"]
        assert body["param"] == param and body["message"]
        return body["message"]

    assert "not audio" in err(post(server, {}, b"this is a text file, not audio" * 50, "a.txt"), 400, "file")
    assert "empty" in err(post(server, {}, b""), 400, "file")
    too_long = wav_bytes(np.zeros(16000 * 301, np.float32))
    assert "at most 300 s" in err(post(server, {}, too_long), 400, "file")
    err(post(server, {}, None), 400, "file")
    err(post(server, {"temperature": "warm"}, b"x"), 400, "temperature")
    err(post(server, {"response_format": "docx"}, b"x"), 400, "response_format")
    err(post(server, {"timestamp_granularities[]": "char", "response_format": "verbose_json"}, b"x"), 400,
        "timestamp_granularities")
    err(post(server, {"model": "whisper-large"}, b"x"), 404, "model")
    err(httpx.post(server.url + "/v1/audio/transcriptions", json={"model": MODEL, "file": "abc"}), 400, "file")
    # silence: no speech, no model work, an empty transcript
    silent = post(server, {}, wav_bytes(np.zeros(16000 * 3, np.float32)))
    assert silent.status_code == 200 and silent.json()["text"] == ""
    assert state(server)["in_flight"] == 0


def test_clients_share_batches(server: ServerProcess) -> None:
    wavs = [wav_bytes(synthesize(s)) for s in SENTENCES[5:9]]

    def batches() -> tuple[float, float]:
        text = httpx.get(server.url + "/metrics").text
        count = float(re.search(r'headway_asr_batch_size_count\{model="whisper-base"\} (\S+)', text).group(1))
        total = float(re.search(r'headway_asr_batch_size_sum\{model="whisper-base"\} (\S+)', text).group(1))
        return count, total

    before = batches()

    async def all_at_once() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=300) as c:
            return await asyncio.gather(*[c.post(server.url + "/v1/audio/transcriptions", data={"model": MODEL},
                                                 files={"file": ("a.wav", w)}) for w in wavs])

    rs = asyncio.run(all_at_once())
    assert all(r.status_code == 200 for r in rs)
    for i, r in enumerate(rs):    # each client got its own transcript back
        errors = [wer(s, r.json()["text"]) for s in SENTENCES[5:9]]
        assert errors.index(min(errors)) == i and errors[i] < 0.6, errors
    after = batches()
    batches_run, chunks = after[0] - before[0], after[1] - before[1]
    assert chunks == 4 and batches_run < 4       # at least one batch held chunks of two clients
    st = state(server)
    asr = st["asr"]
    assert asr["audio_seconds_total"] > 0 and 0 < asr["real_time_factor"] < 5   # type: ignore[index]
    assert {"in_flight", "queued", "max_concurrency", "ready", "audio_seconds_per_s", "real_time_factor"} <= st.keys()


def test_a_client_leaving_mid_stream_frees_its_work(server: ServerProcess) -> None:
    audio, _ = recording(240, pause_s=0.6)    # ~9 chunks; batches of 2: most wait in the queue
    speech_before = _speech_seconds(server)
    with httpx.stream("POST", server.url + "/v1/audio/transcriptions", data={"model": MODEL, "stream": "true"},
                      files={"file": ("a.wav", wav_bytes(audio))}, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["type"] == "transcript.text.delta":
                break           # one delta, then hang up
    deadline = time.monotonic() + 30
    while (s := state(server))["in_flight"] or s["asr"]["pending_chunks"]:  # type: ignore[index]
        assert time.monotonic() < deadline, s
        time.sleep(0.2)
    time.sleep(3)    # a batch running at the disconnect finishes; nothing after it starts
    decoded = _speech_seconds(server) - speech_before
    assert decoded < 150, decoded     # far less than the ~230 s of speech sent


def _speech_seconds(server: ServerProcess) -> float:
    text = httpx.get(server.url + "/metrics").text
    return float(re.search(r'headway_asr_speech_seconds_total\{model="whisper-base"\} (\S+)', text).group(1))


def test_metrics_and_no_payload_in_the_log(server: ServerProcess) -> None:
    text = httpx.get(server.url + "/metrics").text
    assert "headway_asr_audio_seconds_total" in text and "headway_asr_real_time_factor" in text
    log = server.log().lower()          # at log level debug, after every test above
    assert "debug" in log or "info" in log
    for sentence in SENTENCES:
        assert sentence.lower()[:25] not in log
    assert "neighbo" not in log and "fox" not in log


def test_library_name_behind_headway_route(tmp_path: Path) -> None:
    """`headway serve whisper-base` behind the router: the multipart upload routes, the state
    contract is what the router reads."""
    from openai import OpenAI

    with running_server(["serve", MODEL], tmp_path, timeout=300) as replica:
        front = router([replica], tmp_path)  # type: ignore[list-item]
        try:
            front.wait()
            client = OpenAI(base_url=front.url + "/v1", api_key="unused")
            got = client.audio.transcriptions.create(model=MODEL, file=("a.wav", wav_bytes(synthesize(SENTENCES[3]))))
            assert wer(SENTENCES[3], got.text) < 0.35, got.text
            r = httpx.post(front.url + "/v1/audio/transcriptions", data={"model": MODEL},
                           files={"file": ("a.txt", b"not audio at all" * 10)}, timeout=60)
            assert r.status_code == 400 and r.json()["error"]["param"] == "file"
            st = httpx.get(replica.url + "/headway/state").json()
            assert st["runtime"] == "asr" and st["ready"] and st["asr"]["audio_seconds_total"] > 0
        finally:
            front.stop()


def test_admission_503_while_loading_and_429_past_the_queue(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "headway.yaml").write_text(f"name: {MODEL}\nruntime: asr\nmodel: {{source: {MODEL}}}\n"
                                      "engine: {max_concurrency: 1, beam_size: 1}\nruntime_options: {queue_size: 0}\n")
    wav = wav_bytes(recording(20)[0])
    with running_server(["serve", str(pkg)], tmp_path, ready=False) as s:
        early = post(s, {}, wav)
        assert early.status_code == 503 and early.json()["error"]["type"] == "model_loading"
        assert early.headers["retry-after"] == "1"
        s.wait_ready(300)

        async def three() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=300) as c:
                return await asyncio.gather(*[c.post(s.url + "/v1/audio/transcriptions", data={"model": MODEL},
                                                     files={"file": ("a.wav", wav)}) for _ in range(3)])

        codes = sorted(r.status_code for r in asyncio.run(three()))
        assert codes[0] == 200 and 429 in codes, codes
        refused = next(r for r in asyncio.run(three()) if r.status_code == 429)
        assert int(refused.headers["retry-after"]) >= 1 and refused.json()["error"]["type"] == "overloaded"
