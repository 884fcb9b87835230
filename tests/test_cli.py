"""Every CLI command end to end, against real server processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import EXAMPLES, ROOT, ServerProcess, free_port, running_server


def headway(*args: str, timeout: float = 60, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "headway", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, input=stdin, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_every_command_has_help() -> None:
    top = headway("--help")
    assert top.returncode == 0
    for cmd in ("init", "validate", "serve", "watch", "predict", "library", "bench", "bench-target", "route"):
        assert cmd in top.stdout, cmd
        out = headway(cmd, "--help")
        assert out.returncode == 0 and "Usage" in out.stdout, (cmd, out.stderr)


def test_init_serve_predict(tmp_path: Path) -> None:
    pkg = tmp_path / "my-model"
    out = headway("init", str(pkg))
    assert out.returncode == 0, out.stderr
    assert (pkg / "headway.yaml").exists() and (pkg / "model.py").exists()
    again = headway("init", str(pkg))
    assert again.returncode != 0 and "not empty" in again.stderr
    with running_server(["serve", str(pkg)], tmp_path) as s:
        res = headway("predict", "--url", s.url, "-d", '{"text": "three little words"}')
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout) == {"words": 3, "characters": 18}
        data_file = tmp_path / "in.json"
        data_file.write_text('{"text": "a b"}')
        assert json.loads(headway("predict", "--url", s.url, "-d", f"@{data_file}").stdout)["words"] == 2
        assert json.loads(headway("predict", "--url", s.url, "-d", "-", stdin='{"text": "x"}').stdout)["words"] == 1
        bad = headway("predict", "--url", s.url, "-d", '{"txt": 1}')
        assert bad.returncode == 1 and "422" in bad.stderr and "text" in bad.stderr
        notjson = headway("predict", "--url", s.url, "-d", "{oops")
        assert notjson.returncode == 1 and "not valid JSON" in notjson.stderr
    down = headway("predict", "--url", f"http://127.0.0.1:{free_port()}", "-d", "{}")
    assert down.returncode == 1 and "cannot reach" in down.stderr


def test_predict_prints_a_stream_as_it_arrives(tmp_path: Path) -> None:
    with running_server(["serve", str(EXAMPLES / "streaming-story")], tmp_path) as s:
        proc = subprocess.Popen([sys.executable, "-m", "headway", "predict", "--url", s.url, "-d",
                                 '{"words": 8, "delay_ms": 250}'], stdout=subprocess.PIPE, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.stdout is not None
        t0 = time.monotonic()
        first = os.read(proc.stdout.fileno(), 64)  # returns as soon as the first word is printed
        first_at = time.monotonic() - t0
        rest = proc.stdout.read()
        total = time.monotonic() - t0
        proc.wait(10)
        text = (first + rest).decode()
        assert text.startswith("Once upon a time")
        assert len(text.split()) == 8
        assert first_at < total - 1.0  # the first word came well before the end of the stream
        failing = headway("predict", "--url", s.url, "-d", '{"words": 5, "delay_ms": 0, "fail_after": 2}')
        assert failing.returncode == 1 and "lost the plot" in failing.stderr
        assert failing.stdout.startswith("Once upon")


def test_serve_rejects_invalid_package_and_unknown_target(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "headway.yaml").write_text("name: BAD\nruntime_options: {predict_concurrency: 0}\n")
    out = headway("serve", str(bad), "--port", str(free_port()))
    assert out.returncode == 2 and "2 errors" in out.stderr
    out = headway("serve", "no-such-model-anywhere", "--port", str(free_port()))
    assert out.returncode == 2 and "smollm2-135m-instruct" in out.stderr


def test_watch_restarts_on_code_change_and_survives_a_bad_edit(tmp_path: Path) -> None:
    pkg = tmp_path / "w"
    assert headway("init", str(pkg)).returncode == 0
    server = ServerProcess(["watch", str(pkg)], tmp_path / "watch.log")
    try:
        server.wait_ready(60)
        url = f"{server.url}/v1/models/w:predict"
        assert httpx.post(url, json={"text": "a b c"}).json()["words"] == 3
        model = pkg / "model.py"
        model.write_text(model.read_text().replace('"words": len(words)', '"words": len(words) * 100'))

        def reloaded() -> bool:
            try:
                return httpx.post(url, json={"text": "a b c"}, timeout=2).json().get("words") == 300
            except (httpx.HTTPError, ValueError):
                return False

        deadline = time.monotonic() + 60
        while not reloaded():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.3)
        (pkg / "headway.yaml").write_text((pkg / "headway.yaml").read_text().replace("name: w", "name: W W"))
        deadline = time.monotonic() + 15
        while "not applied" not in server.log():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.2)
        assert reloaded()  # the running server was kept
    finally:
        server.stop()


def test_stopping_watch_stops_its_server(tmp_path: Path) -> None:
    pkg = tmp_path / "w2"
    assert headway("init", str(pkg)).returncode == 0
    server = ServerProcess(["watch", str(pkg)], tmp_path / "watch2.log")
    server.wait_ready(60)
    server.stop()  # SIGTERM to the watcher
    deadline = time.monotonic() + 15
    while True:
        try:
            httpx.get(f"{server.url}/health/live", timeout=1)
        except httpx.HTTPError:
            break  # nothing listens any more: the child server is gone too
        assert time.monotonic() < deadline, "the served child outlived its watcher"
        time.sleep(0.2)
