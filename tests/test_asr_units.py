"""The ASR runtime's parts that need no model: multipart parsing (replica and router), request
validation, chunk timelines, response formats, WER."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from headway.bench.speech import normalize, wer
from headway.infra.router.extract import model_from_form
from headway.multipart import MultipartError, field_value, parse

pytest.importorskip("faster_whisper", reason="needs faster-whisper (pip install -e '.[asr]')")

from headway.runtime.asr.api import BadRequest, parse_call  # noqa: E402
from headway.runtime.asr.chunks import Chunk  # noqa: E402
from headway.runtime.asr.decode import ChunkResult  # noqa: E402
from headway.runtime.asr.formats import Transcript, render  # noqa: E402


def form(data: dict[str, object], file: bytes | None = b"RIFF....", filename: str = "a.wav") -> tuple[bytes, str]:
    files = {"file": (filename, file, "audio/wav")} if file is not None else None
    req = httpx.Request("POST", "http://x/", data=data, files=files)
    return req.read(), req.headers["content-type"]


def test_multipart_round_trip_keeps_binary_and_repeated_fields() -> None:
    payload = b"\r\n--\x00\xffboundary-like\r\n\r\n"
    body, ct = form({"model": "m", "timestamp_granularities[]": ["word", "segment"]}, payload)
    parts = parse(body, ct)
    assert [p.name for p in parts] == ["model", "timestamp_granularities[]", "timestamp_granularities[]", "file"]
    assert parts[-1].data == payload and parts[-1].filename == "a.wav"
    assert field_value(body, ct, "model") == "m"
    with pytest.raises(MultipartError):
        parse(body[: len(body) // 2], ct)
    with pytest.raises(MultipartError):
        parse(b"{}", "application/json")


def test_router_reads_the_model_of_a_multipart_upload() -> None:
    body, ct = form({"model": "whisper-base"})
    assert model_from_form(body, [(b"content-type", ct.encode())]) == "whisper-base"
    assert model_from_form(b'{"model": "x"}', [(b"content-type", b"application/json")]) is None
    assert model_from_form(b"garbage", [(b"content-type", ct.encode())]) is None


def call(data: dict[str, object], **kw: object) -> object:
    body, ct = form({"model": "whisper-base", **data}, **kw)  # type: ignore[arg-type]
    return parse_call(body, ct, ["whisper-base"], {"en", "de"}, 1)


@pytest.mark.parametrize("data,param,status", [
    ({"temperature": "hot"}, "temperature", 400),
    ({"temperature": "3"}, "temperature", 400),
    ({"response_format": "xml"}, "response_format", 400),
    ({"timestamp_granularities[]": ["char"], "response_format": "verbose_json"}, "timestamp_granularities", 400),
    ({"timestamp_granularities[]": ["word"]}, "timestamp_granularities", 400),
    ({"language": "klingon"}, "language", 400),
    ({"stream": "maybe"}, "stream", 400),
    ({"stream": "true", "response_format": "srt"}, "stream", 400),
    ({"model": "gpt-4o-transcribe"}, "model", 404),
])
def test_bad_fields_are_named(data: dict[str, object], param: str, status: int) -> None:
    with pytest.raises(BadRequest) as err:
        call(data)
    assert err.value.param == param and err.value.status == status


def test_missing_file_and_non_multipart_bodies() -> None:
    with pytest.raises(BadRequest) as err:
        call({}, file=None)
    assert err.value.param == "file"
    with pytest.raises(BadRequest):
        parse_call(b'{"model": "whisper-base"}', "application/json", ["whisper-base"], {"en"}, 1)
    ok = call({"response_format": "verbose_json", "timestamp_granularities[]": ["word", "segment"],
               "temperature": "0.2", "language": "en", "prompt": "Names: Ada."})
    assert ok.opts.word_timestamps and ok.opts.temperature == 0.2 and ok.language == "en"  # type: ignore[attr-defined]


def test_chunk_times_map_back_across_removed_silences() -> None:
    # two speech pieces, 1 s each, at 2-3 s and 10-11 s of the recording
    chunk = Chunk(0, np.zeros(32000, np.float32), ((32000, 48000), (160000, 176000)))
    assert chunk.to_original(0.0) == 2.0
    assert chunk.to_original(0.5) == 2.5
    assert chunk.to_original(1.0) == 3.0          # the seam maps to the end of the first piece
    assert chunk.to_original(1.25) == 10.25
    assert chunk.to_original(2.0) == 11.0
    assert chunk.to_original(5.0) == 11.0         # past the end: clamped


def seg(text: str, start: float, end: float) -> dict[str, object]:
    return {"text": text, "start": start, "end": end, "tokens": [1], "temperature": 0.0, "avg_logprob": -0.1,
            "compression_ratio": 1.0, "no_speech_prob": 0.0,
            "words": [{"word": " " + w, "start": start, "end": end} for w in text.split()[:1]]}


def test_reassembly_and_formats() -> None:
    t = Transcript(duration=70.0)
    c0 = Chunk(0, np.zeros(16000 * 30, np.float32), ((0, 16000 * 30),))
    c1 = Chunk(1, np.zeros(16000 * 30, np.float32), ((16000 * 40, 16000 * 70),))
    assert t.add(c0, ChunkResult("en", [seg(" Hello there.", 0.0, 2.0)])) == " Hello there."
    t.add(c1, ChunkResult("en", [seg(" Bye now.", 1.0, 3.5), seg("  ", 4.0, 5.0)]))
    assert t.text == "Hello there. Bye now."
    assert [(s["start"], s["end"]) for s in t.segments] == [(0.0, 2.0), (41.0, 43.5)]
    body, _ = render(t, "verbose_json", {"word", "segment"})
    assert body["words"][1] == {"word": "Bye", "start": 41.0, "end": 43.5} and body["duration"] == 70.0
    assert "words" not in render(t, "verbose_json", {"segment"})[0]
    srt, _ = render(t, "srt", set())
    assert srt.startswith("1\n00:00:00,000 --> 00:00:02,000\nHello there.\n\n2\n00:00:41,000 --> 00:00:43,500\n")
    vtt, _ = render(t, "vtt", set())
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:02.000\nHello there.")
    assert render(t, "text", set())[0] == "Hello there. Bye now.\n"
    assert render(t, "json", set())[0]["text"] == "Hello there. Bye now."


def test_wer() -> None:
    assert wer("The cat sat on the mat.", "the cat sat on the mat") == 0.0
    assert wer("the cat sat on the mat", "the cat sat on mat") == pytest.approx(1 / 6)
    assert wer("one two", "one two three four") == 1.0
    assert normalize("It's 4 o'clock, neighbors!") == ["its", "four", "oclock", "neighbours"]


def test_router_picks_the_deployment_named_in_a_multipart_upload() -> None:
    from headway.infra.router.proxy import RouterApp
    from headway.infra.router.replicas import Replica, ReplicaSet
    from headway.infra.router.upstream import RouterConfig

    replicas = []
    for i, (name, kind) in enumerate([("whisper-base", "asr"), ("smol", "llm")]):
        r = Replica(f"http://r{i}:1")
        r.apply_state({"ready": True, "runtime": kind, "model": name}, 0.001)
        r.healthy = True
        replicas.append(r)
    app = RouterApp(ReplicaSet(replicas), RouterConfig())
    body, ct = form({"model": "whisper-base"}, b"\x00audio")
    req = app.route_request("/v1/audio/transcriptions", body, [(b"content-type", ct.encode())])
    assert not isinstance(req, str) and req.deployment == "whisper-base"
    nameless, ct2 = form({}, b"\x00audio")
    err = app.route_request("/v1/audio/transcriptions", nameless, [(b"content-type", ct2.encode())])
    assert isinstance(err, str) and "say which model" in err
