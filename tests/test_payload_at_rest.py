"""No payload at rest (DESIGN.md principle 5): prompts and outputs never reach a log (at any
level, debug included), the control plane's state, or any file. A canary string goes into
every kind of request — chat (whole and streamed), completions, a custom model's predict (ok,
failing with the input in its exception, invalid) and requests the server refuses with a 4xx
that echoes it back (the answer to the client may; a log may not) — through `headway route`
and through `headway up`, every process at log level debug; afterwards no file under the
test's directory (state, SQLite, every process's log), the model cache, the working tree or
the temporary directory that changed during the test contains it."""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, running_server, write_package
from tests.test_fleet import Plane

SMOL = "smollm2-135m-instruct"

ECHO = '''
from pydantic import BaseModel


class Inputs(BaseModel):
    text: str
    fail: bool = False


class Model:
    def load(self):
        pass

    def predict(self, inputs: Inputs):
        if inputs.fail:
            raise ValueError(f"cannot handle {inputs.text!r}")
        return {"echo": inputs.text, "length": len(inputs.text)}
'''


def _files(root: Path, since: float | None) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root, onerror=lambda e: None):
        dirnames[:] = [d for d in dirnames if d not in (".git", "__pycache__")]
        for name in filenames:
            path = Path(dirpath) / name
            try:
                st = path.lstat()
            except OSError:
                continue
            if not path.is_symlink() and path.is_file() and (since is None or st.st_mtime >= since) \
                    and st.st_size < 512 * 2**20:
                yield path


def files_containing(canary: str, everything: list[Path], changed: list[Path], since: float) -> list[str]:
    """Files holding the canary: every file under `everything`, and the ones under `changed`
    modified since `since`."""
    needle = canary.encode()
    found = []
    for root, cutoff in [(r, None) for r in everything] + [(r, since) for r in changed]:
        for path in _files(root, cutoff):
            try:
                if needle in path.read_bytes():
                    found.append(str(path))
            except OSError:
                continue
    return sorted(set(found))


def send_everything(url: str, chat_model: str, custom: str, canary: str) -> None:
    """Each kind of request with the canary in it; the answers are checked to have carried it."""
    said = f"Repeat this word: {canary}"
    with httpx.Client(base_url=url, timeout=120) as c:
        r = c.post("/v1/chat/completions", json={"model": chat_model, "max_tokens": 8, "temperature": 0,
                                                 "messages": [{"role": "user", "content": said}]})
        assert r.status_code == 200, r.text
        with c.stream("POST", "/v1/chat/completions", json={
                "model": chat_model, "max_tokens": 8, "stream": True,
                "messages": [{"role": "system", "content": canary}, {"role": "user", "content": said}]}) as s:
            assert s.status_code == 200 and "[DONE]" in s.read().decode()
        r = c.post("/v1/completions", json={"model": chat_model, "prompt": said, "max_tokens": 8, "echo": True})
        assert r.status_code == 200 and canary in r.text, r.text          # the echoed prompt is output
        r = c.post("/v1/chat/completions", json={"model": chat_model, "messages": [{"role": "user", "content": said}],
                                                 "response_format": {"type": canary}})
        assert r.status_code == 400, r.text                               # refused; the answer may echo it
        r = c.post("/v1/completions", json={"model": chat_model, "prompt": said, "max_tokens": canary})
        assert r.status_code == 400, r.text
        r = c.post("/v1/completions", json={"model": chat_model, "prompt": said, "max_tokens": 4,
                                            "structured_outputs": {"regex": f"[{canary}"}})
        assert r.status_code == 400, r.text                               # a regex that does not compile
        bad_tool = {"type": "function", "function": {"name": "f", "description": canary, "parameters": {
            "type": "object", "properties": {"x": {"type": canary}}}}}
        r = c.post("/v1/chat/completions", json={"model": chat_model, "messages": [{"role": "user", "content": said}],
                                                 "tools": [bad_tool], "tool_choice": "required"})
        assert r.status_code == 400, r.text
        r = c.post("/v1/completions", json={"model": chat_model, "prompt": said * 3000, "max_tokens": 4})
        assert r.status_code == 400, r.text                               # longer than the context
        r = c.post(f"/v1/models/{custom}:predict", json={"text": canary})
        assert r.status_code == 200 and r.json()["echo"] == canary, r.text
        r = c.post(f"/v1/models/{custom}:predict", json={"text": canary, "fail": True})
        assert r.status_code == 500 and canary in r.text, r.text          # the model's error, to its caller only
        r = c.post(f"/v1/models/{custom}:predict", json={"text": {"nested": canary}})
        assert r.status_code == 422, r.text
        r = c.post(f"/v1/models/{custom}:predict", content=b'{"text": "' + canary.encode() + b'"')
        assert r.status_code == 400, r.text                               # not JSON


def _changed_roots() -> list[Path]:
    cache = Path(os.environ.get("HEADWAY_CACHE", Path.home() / ".cache" / "headway"))
    return [cache, Path(tempfile.gettempdir()), ROOT]


@pytest.mark.slow
def test_no_payload_at_rest_through_the_router(tmp_path: Path) -> None:
    canary = f"canary-{uuid.uuid4().hex}"
    since = time.time() - 1
    pkg = write_package(tmp_path / "echo", "name: echo\n", ECHO)
    debug = ["--log-level", "debug"]
    with running_server(["serve", SMOL, "--threads", "1", *debug], tmp_path, timeout=300) as smol, \
            running_server(["serve", str(pkg), *debug], tmp_path) as echo, \
            running_server(["route", "--replica", smol.url, "--replica", echo.url, *debug], tmp_path,
                           ready=False) as router:
        send_everything(router.url, SMOL, "echo", canary)
    assert files_containing(canary, [tmp_path], _changed_roots(), since) == []


@pytest.mark.slow
def test_no_payload_at_rest_through_the_control_plane(tmp_path: Path) -> None:
    canary = f"canary-{uuid.uuid4().hex}"
    since = time.time() - 1
    pkg = write_package(tmp_path / "echo", "name: echo\n", ECHO)
    plane = Plane(tmp_path / "state", tmp_path / "plane.log", extra=["--log-level", "debug"])
    try:
        for name, package in (("chat", SMOL), ("echo", str(pkg))):
            plane.deploy({"name": name, "package": package, "replicas": {"min": 1, "max": 1},
                          "serve_args": ["--log-level", "debug"]})
        plane.wait(lambda: all(plane.status(n)["ready"] == 1 for n in ("chat", "echo")), timeout=300,
                   what="both deployments ready")
        send_everything(plane.url, "chat", "echo", canary)
    finally:
        plane.stop()
    assert files_containing(canary, [tmp_path], _changed_roots(), since) == []


def test_a_failure_is_logged_without_its_message() -> None:
    from headway.server.redact import failure

    def parse(text: str) -> None:
        try:
            int(text)
        except ValueError as exc:
            raise RuntimeError(f"cannot parse {text!r}") from exc

    try:
        parse("secret prompt")
    except RuntimeError as exc:
        line = failure(exc)
    assert "secret" not in line
    assert line.startswith("RuntimeError at test_payload_at_rest.py:") and "in parse" in line
    assert "; caused by ValueError at" in line
    assert failure(KeyError("secret")) == "KeyError"            # never raised: no frames, still no message
