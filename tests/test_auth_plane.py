"""Keys against a real `headway up`: the scope matrix on every control and model route, the
official OpenAI client, rate limits, redaction, the keyless loopback guard (Host / Origin), and
refusing to start off loopback without an admin key."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import ROOT, free_port
from tests.test_fleet import Plane as FleetPlane

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
TINY = {"name": "tiny", "package": "tinycoder-test", "replicas": {"min": 1, "max": 1}, "serve_args": ["--threads", "1"],
        "env": {"HF_TOKEN": "s3cret", "MODE": "plain"}}
OTHER = {"name": "other", "package": "tinycoder-test", "replicas": {"min": 0, "max": 1}}


def headway(*args: str, key: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**ENV, **({"HEADWAY_KEY": key} if key else {})}
    return subprocess.run([sys.executable, "-m", "headway", *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


class Plane(FleetPlane):
    """test_fleet's real `headway up`, without a standby; requests carry a key."""

    def __init__(self, state: Path, log: Path, extra: tuple[str, ...] = ()):
        super().__init__(state, log, extra=["--no-standby", *extra])

    def call(self, method: str, path: str, key: str | None = None, body: object = None,
             headers: dict[str, str] | None = None) -> httpx.Response:
        h = {**({"authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
        return httpx.request(method, self.url + path, json=body, headers=h, timeout=60)

    def stop(self, key: str | None = None) -> None:
        if self.proc.poll() is None:
            try:
                self.call("POST", "/headway/control/shutdown", key, {"stop_replicas": True})
                self.proc.wait(30)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Plane, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("keyed")
    state = tmp / "state"
    made = headway("keys", "create", "--state-dir", str(state), "--scope", "admin", "--name", "ops")  # the bootstrap
    assert made.returncode == 0, made.stderr
    admin = made.stdout.strip()
    plane = Plane(state, tmp / "plane.log")
    keys = {"admin": admin}
    try:
        for spec in (TINY, OTHER):
            assert plane.call("POST", "/headway/control/deployments", admin, spec).status_code == 201, plane.log()
        for name, body in (("deploy", {"scope": "deploy"}), ("invoke", {"scope": "invoke", "name": "app"}),
                           ("invoke_other", {"scope": "invoke", "deployments": ["other"]}),
                           ("revoked", {"scope": "admin"}), ("expired", {"scope": "admin", "expires": "1s"}),
                           ("limited", {"scope": "invoke", "rpm": 3}), ("tokens", {"scope": "invoke", "tpm": 5})):
            r = plane.call("POST", "/headway/control/keys", admin, body)
            assert r.status_code == 201, r.text
            keys[name] = r.json()["key"]
            if name == "revoked":
                assert plane.call("DELETE", f"/headway/control/keys/{r.json()['id']}", admin).status_code == 200
        keys["wrong"] = "hw_" + "A" * 43
        deadline = time.monotonic() + 180
        while plane.call("GET", "/headway/control/deployments/tiny", admin).json()["ready"] < 1:
            assert time.monotonic() < deadline, plane.log()
            time.sleep(0.3)
        time.sleep(max(0.0, 1.1 - (time.monotonic() - deadline + 180)))   # the 1 s key has expired by now
        yield plane, keys
    finally:
        plane.stop(admin)


WHO = ("admin", "deploy", "invoke", "invoke_other", None, "wrong", "revoked", "expired")
BAD = {None: 401, "wrong": 401, "revoked": 401, "expired": 401}


def expect(admin: int, deploy: int, invoke: int, invoke_other: int | None = None) -> dict[str | None, int]:
    return {"admin": admin, "deploy": deploy, "invoke": invoke,
            "invoke_other": invoke if invoke_other is None else invoke_other, **BAD}


CONTROL = [
    ("GET", "/headway/control/deployments", None, expect(200, 200, 403)),
    ("GET", "/headway/control/deployments/tiny", None, expect(200, 200, 403)),
    ("POST", "/headway/control/deployments", OTHER, expect(200, 200, 403)),          # same spec again: 200
    ("POST", "/headway/control/deployments/other/scale", {"replicas": None}, expect(200, 200, 403)),
    ("DELETE", "/headway/control/deployments/ghost", None, expect(404, 404, 403)),    # past auth: no such one
    ("GET", "/headway/control/keys", None, expect(200, 403, 403)),
    ("POST", "/headway/control/keys", {"scope": "invoke", "name": "matrix"}, expect(201, 403, 403)),
    ("DELETE", "/headway/control/keys/k_ghost", None, expect(404, 403, 403)),
    ("GET", "/headway/control/openapi.json", None, expect(200, 200, 403)),
    ("POST", "/headway/control/shutdown", {"stop_replicas": True}, {**expect(0, 403, 403), "admin": 0}),  # not run
]
MODEL = [
    ("POST", "/v1/completions", {"model": "tiny", "prompt": "def", "max_tokens": 2}, expect(200, 403, 200, 403)),
    ("POST", "/v1/completions", {"model": "other", "prompt": "def", "max_tokens": 2}, None),  # see below
    ("GET", "/v1/models", None, expect(200, 403, 200, 200)),
    ("GET", "/metrics", None, expect(200, 200, 403)),
    ("GET", "/headway/router", None, expect(200, 200, 403)),
]


@pytest.mark.slow
def test_control_routes_scope_matrix(keyed: tuple[Plane, dict[str, str]]) -> None:
    plane, keys = keyed
    wrong = []
    for method, path, body, want in CONTROL:
        for who in WHO:
            if want[who] == 0:
                continue
            r = plane.call(method, path, keys.get(who) if who else None, body)
            if r.status_code != want[who]:
                wrong.append(f"{method} {path} as {who}: {r.status_code} (want {want[who]}) {r.text[:200]}")
            elif r.status_code >= 400:
                err = r.json()["error"]
                assert err["message"] and err["type"] and err["code"], r.text
                if r.status_code == 401:
                    assert r.headers["www-authenticate"].startswith("Bearer")
    assert not wrong, "\n".join(wrong)


@pytest.mark.slow
def test_model_routes_scope_matrix(keyed: tuple[Plane, dict[str, str]]) -> None:
    plane, keys = keyed
    wrong = []
    for method, path, body, want in MODEL:
        if want is None:
            continue
        for who in WHO:
            r = plane.call(method, path, keys.get(who) if who else None, body)
            if r.status_code != want[who]:
                wrong.append(f"{method} {path} as {who}: {r.status_code} (want {want[who]}) {r.text[:200]}")
            elif r.status_code >= 400:
                err = r.json()["error"]
                assert set(err) == {"message", "type", "code"}, r.text
    # an invoke key limited to 'other' may call 'other' (it waits for a replica; 'other' has none: scale 0 -> 1)
    r = plane.call("POST", "/v1/completions", keys["invoke_other"], {"model": "nope", "prompt": "x"})
    assert r.status_code == 404, r.text                        # an unknown model is still a 404 once past the key
    assert plane.call("GET", "/health/live").status_code == 200        # health stays open
    assert plane.call("GET", "/health/ready").status_code == 200
    assert not wrong, "\n".join(wrong)


@pytest.mark.slow
def test_openai_client_with_keys(keyed: tuple[Plane, dict[str, str]]) -> None:
    plane, keys = keyed

    def client(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=plane.url + "/v1", api_key=key, max_retries=0)

    done = client(keys["invoke"]).completions.create(model="tiny", prompt="def", max_tokens=3, temperature=0)
    assert done.usage is not None and done.usage.completion_tokens >= 1
    chunks = list(client(keys["admin"]).completions.create(model="tiny", prompt="def", max_tokens=3, stream=True))
    assert chunks
    with pytest.raises(openai.AuthenticationError, match="unknown key"):
        client(keys["wrong"]).completions.create(model="tiny", prompt="def", max_tokens=2)
    with pytest.raises(openai.AuthenticationError, match="revoked"):
        client(keys["revoked"]).completions.create(model="tiny", prompt="def", max_tokens=2)
    with pytest.raises(openai.PermissionDeniedError, match="may call only other; not 'tiny'"):
        client(keys["invoke_other"]).completions.create(model="tiny", prompt="def", max_tokens=2)
    with pytest.raises(openai.PermissionDeniedError, match="scope 'deploy'"):
        client(keys["deploy"]).models.list()


@pytest.mark.slow
def test_rate_limit_429_with_retry_after_on_the_fourth_request(keyed: tuple[Plane, dict[str, str]]) -> None:
    plane, keys = keyed
    body = {"model": "tiny", "prompt": "def", "max_tokens": 1}
    assert [plane.call("POST", "/v1/completions", keys["limited"], body).status_code for _ in range(3)] == [200] * 3
    r = plane.call("POST", "/v1/completions", keys["limited"], body)
    assert r.status_code == 429, r.text
    assert 1 <= int(r.headers["retry-after"]) <= 20
    assert r.json()["error"]["type"] == "rate_limit_error" and "3 requests per minute" in r.json()["error"]["message"]
    with pytest.raises(openai.RateLimitError):
        openai.OpenAI(base_url=plane.url + "/v1", api_key=keys["limited"], max_retries=0).completions.create(
            model="tiny", prompt="def", max_tokens=1)
    assert plane.call("POST", "/v1/completions", keys["invoke"], body).status_code == 200   # other keys unaffected
    # 5 tokens a minute: the first answer's usage (prompt + 5 completion tokens) spends more than that
    body = {"model": "tiny", "prompt": "def", "max_tokens": 5, "ignore_eos": True}
    first = plane.call("POST", "/v1/completions", keys["tokens"], body)
    assert first.status_code == 200 and first.json()["usage"]["total_tokens"] > 5, first.text
    r = plane.call("POST", "/v1/completions", keys["tokens"], body)
    assert r.status_code == 429 and "5 tokens per minute" in r.json()["error"]["message"], r.text
    assert int(r.headers["retry-after"]) >= 12


@pytest.mark.slow
def test_status_redacts_env_by_scope(keyed: tuple[Plane, dict[str, str]]) -> None:
    plane, keys = keyed
    as_admin = plane.call("GET", "/headway/control/deployments/tiny", keys["admin"]).json()["spec"]["env"]
    assert as_admin == {"HF_TOKEN": "***", "MODE": "plain"}
    as_deploy = plane.call("GET", "/headway/control/deployments", keys["deploy"]).json()["deployments"]
    assert [d["spec"]["env"] for d in as_deploy if d["name"] == "tiny"] == [{"HF_TOKEN": "***", "MODE": "***"}]
    assert "s3cret" not in plane.call("GET", "/headway/control/deployments", keys["admin"]).text


@pytest.mark.slow
def test_cli_uses_keys_and_keys_written_to_the_state_take_effect(keyed: tuple[Plane, dict[str, str]]) -> None:
    plane, keys = keyed
    control = ("--control", plane.url)
    refused = headway("status", *control)
    assert refused.returncode == 2 and "needs an API key" in refused.stderr and "HEADWAY_KEY" in refused.stderr
    assert headway("status", "tiny", "--json", *control, key=keys["deploy"]).returncode == 0
    made = headway("keys", "create", "--scope", "invoke", "--deployment", "tiny", "--name", "cli", *control,
                   key=keys["admin"])
    assert made.returncode == 0 and made.stdout.startswith("hw_"), made.stderr
    listed = headway("keys", "list", *control, key=keys["admin"])
    assert "cli" in listed.stdout and made.stdout.strip() not in listed.stdout
    assert headway("keys", "list", *control, key=keys["deploy"]).returncode == 2
    # written straight into the state while the plane runs: usable within about a second
    direct = headway("keys", "create", "--state-dir", str(plane.state), "--scope", "deploy").stdout.strip()
    deadline = time.monotonic() + 5
    while plane.call("GET", "/headway/control/deployments", direct).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    key_id = [k["id"] for k in plane.call("GET", "/headway/control/keys", keys["admin"]).json()["keys"]
              if k["name"] == "cli"][0]
    assert headway("keys", "revoke", key_id, *control, key=keys["admin"]).returncode == 0
    r = plane.call("POST", "/v1/completions", made.stdout.strip(), {"model": "tiny", "prompt": "a", "max_tokens": 1})
    assert r.status_code == 401 and "revoked" in r.text


# ---- no keys: one user on loopback ------------------------------------------------------------

def test_keyless_plane_refuses_cross_origin_and_foreign_host(tmp_path: Path) -> None:
    plane = Plane(tmp_path / "state", tmp_path / "plane.log")
    try:
        spec = {"name": "evil", "package": "tinycoder-test", "replicas": {"min": 0, "max": 1}}
        path = "/headway/control/deployments"
        cross = plane.call("POST", path, body=spec, headers={"origin": "http://evil.example"})
        assert cross.status_code == 403 and "Origin 'http://evil.example'" in cross.json()["error"]["message"]
        rebound = plane.call("POST", path, body=spec, headers={"host": f"evil.example:{plane.port}"})
        assert rebound.status_code == 403 and "Host 'evil.example:" in rebound.json()["error"]["message"]
        model = plane.call("POST", "/v1/completions", body={"model": "evil", "prompt": "x"},
                           headers={"host": f"evil.example:{plane.port}"})
        assert model.status_code == 403
        assert plane.call("GET", "/headway/router", headers={"origin": "http://evil.example"}).status_code == 403
        assert plane.call("GET", path).json() == {"deployments": []}          # nothing was created
        own = plane.call("POST", path, body=spec, headers={"origin": f"http://127.0.0.1:{plane.port}"})
        assert own.status_code == 201, own.text                                # same origin, loopback: allowed
        assert plane.call("GET", path, headers={"host": f"localhost:{plane.port}"}).status_code == 200
        # the first key, made through the keyless API, closes it: from then on, no key no answer
        first = plane.call("POST", "/headway/control/keys", body={"scope": "admin"}).json()["key"]
        assert plane.call("GET", path).status_code == 401
        assert plane.call("GET", path, first).status_code == 200
        plane.stop(first)
    finally:
        plane.stop()


def test_up_off_loopback_refuses_to_start_without_an_admin_key(tmp_path: Path) -> None:
    state = tmp_path / "state"
    port = str(free_port())
    up = subprocess.run([sys.executable, "-m", "headway", "up", "--host", "0.0.0.0", "--port", port, "--state-dir",
                         str(state)], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=60)
    assert up.returncode == 2
    assert "refusing to listen on 0.0.0.0" in up.stderr and f"headway keys create --state-dir {state}" in up.stderr
    # a deploy key is not enough; an admin key is
    assert headway("keys", "create", "--state-dir", str(state), "--scope", "deploy").returncode == 0
    assert subprocess.run([sys.executable, "-m", "headway", "up", "--host", "0.0.0.0", "--port", port, "--state-dir",
                           str(state)], capture_output=True, env=ENV, cwd=ROOT, timeout=60).returncode == 2
    admin = headway("keys", "create", "--state-dir", str(state), "--scope", "admin").stdout.strip()
    proc = subprocess.Popen([sys.executable, "-m", "headway", "up", "--host", "0.0.0.0", "--port", port, "--state-dir",
                             str(state), "--no-standby", "--log-level", "warning"], env=ENV, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None and time.monotonic() < deadline
            try:
                httpx.get(url + "/health/live", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert httpx.get(url + "/headway/control/deployments").status_code == 401
        assert httpx.get(url + "/headway/control/deployments",
                         headers={"authorization": f"Bearer {admin}"}).status_code == 200
    finally:
        proc.kill()
        proc.wait()


# ---- `headway route --key-file` --------------------------------------------------------------

ECHO = '''
class Model:
    def load(self):
        pass

    def predict(self, inputs: dict):
        return {"echo": inputs}
'''


def test_route_with_key_file_checks_keys(tmp_path: Path) -> None:
    from tests.conftest import ServerProcess, running_server, write_package

    pkg = write_package(tmp_path / "echo", "name: echo\n", ECHO)
    state = tmp_path / "keys"
    keys = {scope: headway("keys", "create", "--state-dir", str(state), "--scope", scope).stdout.strip()
            for scope in ("admin", "deploy", "invoke")}
    keys["elsewhere"] = headway("keys", "create", "--state-dir", str(state), "--scope", "invoke", "--deployment",
                                "chat").stdout.strip()
    with running_server(["serve", str(pkg)], tmp_path) as replica:
        router = ServerProcess(["route", "--replica", replica.url, "--key-file", str(state), "--health-interval",
                                "0.2"], tmp_path / "router.log")
        try:
            router.wait_live()
            url = router.url

            def status(method: str, path: str, who: str | None) -> int:
                h = {"authorization": f"Bearer {keys[who]}"} if who else {}
                return httpx.request(method, url + path, json={"x": 1}, headers=h, timeout=30).status_code

            predict = "/v1/models/echo:predict"
            assert [status("POST", predict, w) for w in ("admin", "invoke", "deploy", "elsewhere", None)] == \
                [200, 200, 403, 403, 401]
            assert [status("GET", "/metrics", w) for w in ("admin", "deploy", "invoke", None)] == [200, 200, 403, 401]
            assert [status("GET", "/headway/router", w) for w in ("deploy", "invoke")] == [200, 403]
            assert status("GET", "/health/live", None) == 200
            # revoked in the state: refused within about a second
            listed = headway("keys", "list", "--state-dir", str(state), "--json").stdout
            import json
            invoke_id = [k["id"] for k in json.loads(listed) if k["scope"] == "invoke" and not k["deployments"]][0]
            assert headway("keys", "revoke", invoke_id, "--state-dir", str(state)).returncode == 0
            deadline = time.monotonic() + 5
            while status("POST", predict, "invoke") != 401:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        finally:
            router.stop()
    refused = headway("route", "--replica", "http://127.0.0.1:1", "--key-file", str(tmp_path / "none"))
    assert refused.returncode == 2 and "no such state file" in refused.stderr
