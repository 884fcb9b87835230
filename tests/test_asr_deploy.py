"""An ASR package deployed on the control plane (`headway up` + a deployment, as `headway deploy`
sends it): the replica comes up, the plane's front door routes a multipart upload to it, and the
plane reads the replica-state contract (in flight, queued) it autoscales on."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import httpx
import pytest

from headway.bench.speech import SENTENCES, have_espeak, synthesize, wav_bytes, wer
from tests.test_fleet import Plane

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("faster_whisper") is None, reason="needs faster-whisper"),
              pytest.mark.skipif(not have_espeak(), reason="needs espeak-ng (scripts/setup installs it)")]


def test_deployed_asr_replica_serves_through_the_plane(tmp_path: Path) -> None:
    pkg = tmp_path / "stt"
    pkg.mkdir()
    (pkg / "headway.yaml").write_text("name: stt\nruntime: asr\nmodel: {source: whisper-base}\n"
                                      "engine: {beam_size: 1}\n")
    plane = Plane(tmp_path / "state", tmp_path / "plane.log")
    try:
        plane.deploy({"name": "stt", "package": str(pkg), "replicas": {"min": 0, "max": 1},
                      "activator": {"timeout_s": 290}})
        assert plane.status("stt")["replicas"] == []                 # from zero: the request waits for one
        r = httpx.post(plane.url + "/v1/audio/transcriptions", data={"model": "stt", "language": "en"},
                       files={"file": ("a.wav", wav_bytes(synthesize(SENTENCES[3])))}, timeout=300)
        assert r.status_code == 200, r.text
        assert plane.status("stt")["ready"] == 1
        assert wer(SENTENCES[3], r.json()["text"]) < 0.35
        bad = httpx.post(plane.url + "/v1/audio/transcriptions", data={"model": "stt"},
                         files={"file": ("a.txt", b"plain text, not audio" * 20)}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "file"
    finally:
        plane.stop()
