"""The replica server's contracts, each against a real server process on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import EXAMPLES, wait_for, write_package

SLOW_MODEL = '''
import asyncio, time
from pathlib import Path
from pydantic import BaseModel

MARKS = Path(__file__).parent / "marks"
MARKS.mkdir(exist_ok=True)

class Inputs(BaseModel):
    seconds: float = 0.0
    tag: str = "x"

class Model:
    def __init__(self, config=None, secrets=None):
        self.secrets = secrets or {}

    def load(self):
        time.sleep(float(__import__("os").environ.get("LOAD_SECONDS", "0")))
        if __import__("os").environ.get("LOAD_FAIL"):
            raise RuntimeError("weights file is corrupt")

    async def predict(self, inputs: Inputs):
        try:
            await asyncio.sleep(inputs.seconds)
        except asyncio.CancelledError:
            (MARKS / f"cancelled-{inputs.tag}").write_text("1")
            raise
        return {"slept": inputs.seconds, "secret_names": sorted(self.secrets),
                "secret_len": {k: len(v) for k, v in self.secrets.items()}}
'''

STREAM_MODEL = '''
import time
from pathlib import Path
MARKS = Path(__file__).parent / "marks"
MARKS.mkdir(exist_ok=True)

class Model:
    def predict(self, inputs: dict):
        try:
            for i in range(int(inputs.get("n", 10))):
                time.sleep(float(inputs.get("delay", 0.05)))
                yield {"i": i}
        finally:
            (MARKS / f"closed-{inputs.get('tag', 'x')}").write_text("1")
'''


def slow_package(tmp_path: Path, *, concurrency: int = 1, queue: int = 0, body: str = "10MB",
                 secrets: str = "[]") -> Path:
    return write_package(tmp_path / "slow", f"""
name: slow
secrets: {secrets}
runtime_options: {{predict_concurrency: {concurrency}, queue_size: {queue}, max_request_body: {body}}}
""", SLOW_MODEL)



@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    from tests.conftest import running_server

    with running_server(["serve", str(EXAMPLES / "text-classifier")], tmp_path_factory.mktemp("clf")) as s:
        yield s


def test_predict_json_and_schema(classifier) -> None:
    r = httpx.post(f"{classifier.url}/v1/models/text-classifier:predict",
                   json={"texts": ["I love it, wonderful and great", "awful, broken and terrible"]})
    assert r.status_code == 200
    labels = [p["label"] for p in r.json()["predictions"]]
    assert labels == ["positive", "negative"]
    schema = httpx.get(f"{classifier.url}/v1/models/text-classifier/schema").json()
    assert schema["input"]["required"] == ["texts"]


def test_bad_inputs_get_clear_errors(classifier) -> None:
    url = f"{classifier.url}/v1/models/text-classifier:predict"
    r = httpx.post(url, json={"text": "hi"})
    assert r.status_code == 422
    assert "texts" in r.json()["error"]["message"]
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{classifier.url}/v1/models/other:predict", json={"texts": ["x"]})
    assert r.status_code == 404 and "'text-classifier'" in r.json()["error"]["message"]


def test_body_limit_413_declared_and_chunked(classifier) -> None:
    url = f"{classifier.url}/v1/models/text-classifier:predict"
    big = json.dumps({"texts": ["word " * 20_000]}).encode()  # > 64KB limit of the example
    r = httpx.post(url, content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "max_request_body" in r.json()["error"]["message"]

    def chunks():
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]

    r = httpx.post(url, content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    ok = httpx.post(url, json={"texts": ["fine"]})
    assert ok.status_code == 200


def test_metrics_and_state(classifier) -> None:
    httpx.post(f"{classifier.url}/v1/models/text-classifier:predict", json={"texts": ["great"]})
    text = httpx.get(f"{classifier.url}/metrics").text
    assert 'headway_requests_total{endpoint="predict",model="text-classifier",status="200"}' in text
    assert "headway_request_duration_seconds_bucket" in text
    assert "headway_in_flight" in text and "headway_queued" in text
    state = httpx.get(f"{classifier.url}/headway/state").json()
    assert state["ready"] is True and state["runtime"] == "custom" and state["model"] == "text-classifier"
    assert state["max_concurrency"] == 2 and state["in_flight"] == 0
    assert state["startup"]["ready_s"] >= state["startup"]["loaded_s"] >= 0


def test_streaming_arrives_incrementally_and_errors_become_events(server_factory) -> None:
    with server_factory(["serve", str(EXAMPLES / "streaming-story")]) as s:
        url = f"{s.url}/v1/models/streaming-story:predict"
        arrivals = []
        t0 = time.monotonic()
        with httpx.stream("POST", url, json={"words": 6, "delay_ms": 200}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data:"):
                    arrivals.append((time.monotonic() - t0, line[5:].strip()))
        assert arrivals[-1][1] == "[DONE]"
        assert len(arrivals) == 7
        # the first word arrives long before the last: the response is not buffered
        assert arrivals[0][0] < arrivals[-2][0] - 0.6
        with httpx.stream("POST", url, json={"words": 6, "delay_ms": 0, "fail_after": 3}) as r:
            lines = [ln for ln in r.iter_lines() if ln]
        assert lines.count("event: error") == 1
        error = json.loads(lines[lines.index("event: error") + 1][5:])
        assert "lost the plot after 3 words" in error["error"]["message"]
        assert sum(1 for ln in lines if ln.startswith("data:")) == 4  # 3 words + the error, no [DONE]
        metrics = httpx.get(f"{s.url}/metrics").text
        assert 'status="500"' in metrics


def test_overload_gets_429_with_retry_after(server_factory, tmp_path: Path) -> None:
    pkg = slow_package(tmp_path, concurrency=1, queue=1)
    with server_factory(["serve", str(pkg)]) as s:
        url = f"{s.url}/v1/models/slow:predict"
        results: list[int] = []

        def call() -> None:
            results.append(httpx.post(url, json={"seconds": 1.5}, timeout=30).status_code)

        threads = [threading.Thread(target=call) for _ in range(2)]  # one runs, one waits
        for t in threads:
            t.start()
        assert wait_for(lambda: httpx.get(f"{s.url}/headway/state").json()["queued"] == 1)
        r = httpx.post(url, json={"seconds": 0})
        assert r.status_code == 429
        assert int(r.headers["Retry-After"]) >= 1
        assert "at capacity" in r.json()["error"]["message"]
        for t in threads:
            t.join()
        assert results == [200, 200]  # the waiting one was served, not dropped
        assert httpx.post(url, json={"seconds": 0}).status_code == 200


def test_disconnect_cancels_unary_and_stream_work(server_factory, tmp_path: Path) -> None:
    pkg = slow_package(tmp_path, concurrency=2, queue=4)
    with server_factory(["serve", str(pkg)]) as s:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{s.url}/v1/models/slow:predict", json={"seconds": 30, "tag": "unary"}, timeout=0.5)
        assert wait_for(lambda: (pkg / "marks" / "cancelled-unary").exists()), s.log()
        assert wait_for(lambda: httpx.get(f"{s.url}/headway/state").json()["in_flight"] == 0)

    stream_pkg = write_package(tmp_path / "streamer", "name: streamer\n", STREAM_MODEL)
    with server_factory(["serve", str(stream_pkg)]) as s:
        with httpx.stream("POST", f"{s.url}/v1/models/streamer:predict",
                          json={"n": 1000, "delay": 0.05, "tag": "s1"}) as r:
            for i, _line in enumerate(r.iter_lines()):
                if i > 4:
                    break  # leave mid-stream: the connection closes
        assert wait_for(lambda: (stream_pkg / "marks" / "closed-s1").exists()), s.log()
        assert wait_for(lambda: httpx.get(f"{s.url}/headway/state").json()["in_flight"] == 0)


def test_readiness_while_loading(server_factory, tmp_path: Path) -> None:
    pkg = slow_package(tmp_path)
    with server_factory(["serve", str(pkg)], ready=False, env={"LOAD_SECONDS": "3"}) as s:
        r = httpx.get(f"{s.url}/health/ready")
        assert r.status_code == 503 and r.json()["reason"] == "loading"
        assert httpx.get(f"{s.url}/health/live").status_code == 200
        p = httpx.post(f"{s.url}/v1/models/slow:predict", json={})
        assert p.status_code == 503 and p.headers["Retry-After"] == "1"
        s.wait_ready(30)
        assert httpx.post(f"{s.url}/v1/models/slow:predict", json={}).status_code == 200


def test_load_failure_reported_once_and_clearly(server_factory, tmp_path: Path) -> None:
    pkg = slow_package(tmp_path)
    with server_factory(["serve", str(pkg)], ready=False, env={"LOAD_FAIL": "1"}) as s:
        assert wait_for(lambda: httpx.get(f"{s.url}/health/ready").json().get("reason") == "load_failed")
        body = httpx.get(f"{s.url}/health/ready").json()
        assert body["error"] == "RuntimeError: weights file is corrupt"
        p = httpx.post(f"{s.url}/v1/models/slow:predict", json={})
        assert p.status_code == 503 and "failed to load" in p.json()["error"]["message"]
        log = s.log()
        assert log.count("failed to load") == 1
        assert "Traceback" not in log


def test_secrets_from_env_and_directory_never_logged(server_factory, tmp_path: Path) -> None:
    pkg = slow_package(tmp_path, secrets="[API_KEY, DB_PASSWORD, ABSENT]")
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "DB_PASSWORD").write_text("hunter2-from-file\n")
    with server_factory(["serve", str(pkg), "--secrets-dir", str(secrets_dir)],
                        env={"API_KEY": "sk-from-env"}) as s:
        out = httpx.post(f"{s.url}/v1/models/slow:predict", json={}).json()
        assert out["secret_names"] == ["API_KEY", "DB_PASSWORD"]
        assert out["secret_len"] == {"API_KEY": len("sk-from-env"), "DB_PASSWORD": len("hunter2-from-file")}
        assert "hunter2" not in s.log() and "sk-from-env" not in s.log()


def _tiny_wheel(where: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel built by hand (no network, no build backend)."""
    import base64
    import hashlib
    import zipfile

    files = {f"{name}/__init__.py": f"VERSION = {version!r}\n",
             f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{name}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{name}-{version}.dist-info/RECORD,,")
    wheel = where / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
        z.writestr(f"{name}-{version}.dist-info/RECORD", "\n".join(record) + "\n")
    return wheel


def test_requirements_are_checked_never_installed_into_the_shared_interpreter(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process, headway.yaml's requirements are only checked: satisfied ones pass, a bad spec
    is a field error with an example, a missing one is an error saying how it gets installed
    (`headway serve` gives it a virtual environment), and pip never runs."""
    import subprocess

    from headway.package.load import PackageError
    from headway.server import serve

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"ran {a}"))
    serve.check_requirements(["pyyaml>=6", "httpx"])
    with pytest.raises(PackageError) as bad:
        serve.check_requirements(["numpy >>= 2"])
    assert "requirements" in str(bad.value) and "numpy==2.1.0" in str(bad.value)
    with pytest.raises(PackageError, match=r"headway-not-installed-pkg==1.0 not installed .*\$HEADWAY_CACHE/venvs"):
        serve.check_requirements(["headway_not_installed_pkg==1.0"])


REQUIRING = """
import sys
import headway_reqvenv_pkg

class Model:
    def load(self):
        pass

    def predict(self, inputs: dict):
        return {"version": headway_reqvenv_pkg.VERSION, "prefix": sys.prefix, "torch": "torch" in sys.modules
                or __import__("importlib.util").util.find_spec("torch") is not None}
"""


def test_requirements_get_their_own_venv_and_the_shared_interpreter_stays_clean(tmp_path: Path) -> None:
    """`headway serve` of a package with requirements builds one venv for that requirement set
    (offline: a local wheel), runs the replica with its python (torch inherited), and installs
    nothing into the shared interpreter; a second replica reuses the venv."""
    import subprocess
    import sys

    from tests.conftest import running_server

    name = "headway_reqvenv_pkg"
    check = [sys.executable, "-c", f"import importlib.util, sys; sys.exit(importlib.util.find_spec({name!r}) is not None)"]
    assert subprocess.run(check).returncode == 0, f"{name} is already in the shared interpreter"
    wheel = _tiny_wheel(tmp_path, name, "0.3")
    pkg = write_package(tmp_path / "req", f"name: req\nrequirements: ['{name} @ {wheel.as_uri()}']\n", REQUIRING)
    cache = tmp_path / "cache"
    env = {"HEADWAY_CACHE": str(cache), "PIP_NO_INDEX": "1"}
    prefixes = []
    for _ in range(2):
        with running_server(["serve", str(pkg)], tmp_path, env=env) as s:
            out = httpx.post(f"{s.url}/v1/models/req:predict", json={}, timeout=30).json()
            assert out["version"] == "0.3" and out["torch"] is True, out
            prefixes.append(Path(out["prefix"]).resolve())
    [venv] = list((cache / "venvs").glob("*/.headway-ready"))
    assert prefixes == [venv.parent.resolve()] * 2
    assert subprocess.run(check).returncode == 0, f"{name} leaked into the shared interpreter"
