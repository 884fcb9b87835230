"""Code runs only where its owner put it, and secrets stay secret: a deployment spec's package
must be a library name, remote weights, or a directory under an allowed --package-root; secret
env values never show in a status answer, `headway status` or the control plane's log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from headway.infra.fleet.roots import PackageNotAllowed, allowed_package, normalize_roots
from headway.infra.fleet.spec import validate_spec
from headway.package.load import PackageError
from tests.conftest import ROOT, write_package
from tests.test_fleet import Plane

SECRET = "hf_s3cr3t-do-not-leak-4711"

# model.py that leaves a marker the moment it is imported: proof that its code ran
MARKING = '''
import os, pathlib
pathlib.Path({marker!r}).write_text(str(os.getpid()))

class Model:
    def load(self):
        if os.environ.get("LEAK_AND_FAIL"):
            print("token is", os.environ.get("HF_TOKEN"), flush=True)
            raise RuntimeError("bad token " + os.environ.get("HF_TOKEN", ""))

    def predict(self, inputs: dict):
        return {{"token_ok": os.environ.get("HF_TOKEN") == {secret!r}}}
'''


def marking_package(path: Path, marker: Path) -> Path:
    return write_package(path, f"name: {path.name}\n", MARKING.format(marker=str(marker), secret=SECRET))


# ---- the check itself ----------------------------------------------------------------------------

def test_package_must_be_library_remote_or_under_a_root(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    pkg = marking_package(allowed / "m", tmp_path / "marker")
    outside = marking_package(tmp_path / "outside", tmp_path / "marker")
    (allowed / "link").symlink_to(outside)
    roots = normalize_roots([allowed])
    assert allowed_package(str(pkg), roots) == str(pkg.resolve())
    assert allowed_package(str(pkg / "headway.yaml"), roots) == str(pkg.resolve())
    assert allowed_package("tinycoder-test", ()) == "tinycoder-test"
    assert allowed_package("s3://models/tiny/", ()) == "s3://models/tiny/"
    assert allowed_package("https://host/m.gguf", ()) == "https://host/m.gguf"
    for bad in (str(outside), str(allowed / "link"), str(allowed / ".." / "outside"), "file:///etc/x",
                "relative/dir", "no-such-model"):
        with pytest.raises(PackageNotAllowed) as err:
            allowed_package(bad, roots)
        assert bad in str(err.value)
    msg = str(pytest.raises(PackageNotAllowed, allowed_package, str(outside), roots).value)
    assert str(allowed.resolve()) in msg and "--package-root" in msg
    msg = str(pytest.raises(PackageNotAllowed, allowed_package, str(outside), ()).value)
    assert "allowed: none" in msg and f"--package-root {outside.parent.resolve()}" in msg


def test_spec_secret_env_is_masked_and_code_env_refused() -> None:
    spec = validate_spec({"name": "a", "package": "p", "env": {"HF_TOKEN": {"secret": True, "value": SECRET},
                                                                "LOG_LEVEL": "info"}})
    assert spec.env_values() == {"HF_TOKEN": SECRET, "LOG_LEVEL": "info"}
    public = json.dumps(spec.public_dump())
    assert SECRET not in public and SECRET not in repr(spec) and SECRET not in str(spec)
    assert spec.public_dump()["env"] == {"HF_TOKEN": {"secret": True, "value": "***"}, "LOG_LEVEL": "info"}
    assert spec.redact(f"oops {SECRET}!") == "oops ***!"
    for env in ({"PYTHONPATH": "/tmp/x"}, {"LD_PRELOAD": "/tmp/x.so"}, {"HEADWAY_CACHE": "/tmp"}):
        with pytest.raises(PackageError) as err:
            validate_spec({"name": "a", "package": "p", "env": env})
        assert next(iter(env)) in str(err.value)
    with pytest.raises(PackageError, match="--lora-root"):
        validate_spec({"name": "a", "package": "p", "serve_args": ["--lora-root", "/"]})


# ---- against a real `headway up` ---------------------------------------------------------------

def _headway(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "headway", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "300"}, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def test_rce_chain_is_refused_and_secrets_never_leak(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    evil_marker, good_marker = tmp_path / "evil-ran", tmp_path / "good-ran"
    evil = marking_package(tmp_path / "evil", evil_marker)
    good = marking_package(allowed / "good", good_marker)
    (allowed / "sneaky").symlink_to(evil)         # a link under the root to a directory outside it
    plane = Plane(tmp_path / "state", tmp_path / "plane.log", extra=["--no-standby"], package_roots=[allowed])
    secret_env = {"HF_TOKEN": {"secret": True, "value": SECRET}, "LOG_LEVEL": "info"}
    try:
        for package, env in [(p, e) for p in (str(evil), str(allowed / "sneaky"), str(allowed / ".." / "evil"))
                             for e in ({"LOG_LEVEL": "info"}, secret_env)]:
            err = plane.api("POST", "/deployments", {"name": "evil", "package": package, "env": env,
                                                     "replicas": {"min": 1, "max": 1}}, status=400)
            msg = err["error"]["message"]
            assert package in msg and str(allowed.resolve()) in msg and "--package-root" in msg, msg
            assert SECRET not in msg
        time.sleep(3)
        assert not evil_marker.exists()
        assert plane.api("GET", "/deployments")["deployments"] == []
        assert not [f for f in (tmp_path / "state" / "logs").glob("*.log") if f.name != "standby.log"]

        # the same package under the allowed root is served, and gets the secret
        created = plane.deploy({"name": "good", "package": str(good), "env": secret_env,
                                "replicas": {"min": 1, "max": 1}})
        plane.wait(lambda: plane.status("good")["ready"] == 1, what="a ready replica")
        assert good_marker.exists()
        r = httpx.post(f"{plane.url}/v1/models/good:predict", json={}, timeout=30)
        assert r.status_code == 200 and r.json() == {"token_ok": True}, r.text

        # a replica that prints the secret and fails with it in its error
        plane.deploy({"name": "leaky", "package": str(good), "env": {**secret_env, "LEAK_AND_FAIL": "1"},
                      "replicas": {"min": 1, "max": 1}})
        plane.wait(lambda: any(x["phase"] == "failed" for x in plane.status("leaky")["replicas"]),
                   what="a failed replica")
        leaky = plane.status("leaky")
        assert "bad token ***" in json.dumps(leaky), leaky

        answers = [json.dumps(created), json.dumps(plane.api("GET", "/deployments")), json.dumps(leaky),
                   json.dumps(plane.status("good")),
                   _headway("status", "--control", plane.url), _headway("status", "--json", "--control", plane.url),
                   _headway("status", "leaky", "--control", plane.url)]
        for text in answers:
            assert SECRET not in text
            assert '"***"' in text or "***" in text or "good" in text
        assert plane.status("good")["spec"]["env"]["HF_TOKEN"] == {"secret": True, "value": "***"}
    finally:
        plane.stop()
    plane_log = (tmp_path / "plane.log").read_text(errors="replace")
    assert "leaky" in plane_log and SECRET not in plane_log
    assert (tmp_path / "state" / "headway.db").stat().st_mode & 0o077 == 0


async def test_replica_start_rechecks_the_package_and_gets_its_resolved_path(tmp_path: Path) -> None:
    """A directory swapped for a symlink out of the root after the deploy starts no replica; a
    replica is given the resolved directory, not the name it was deployed with."""
    from headway.infra.fleet.manager import ReplicaManager
    from headway.infra.fleet.store import Store
    from headway.infra.router.proxy import RouterApp
    from headway.infra.router.replicas import ReplicaSet

    class Recording:
        name = "recording"

        def __init__(self) -> None:
            self.launches: list = []

        def start(self, launch):
            self.launches.append(launch)
            return {"id": launch.replica_id}

        def url(self, handle):
            return None

        def alive(self, handle):
            return True

        def stop(self, handle, grace_s):
            pass

        def log_tail(self, handle, lines=20):
            return ""

        def close(self) -> None:
            pass

    allowed = tmp_path / "allowed"
    pkg = marking_package(allowed / "m", tmp_path / "marker")
    outside = marking_package(tmp_path / "outside", tmp_path / "marker")
    (allowed / "alias").symlink_to(pkg)
    provider = Recording()
    m = ReplicaManager(Store(tmp_path / "s.db"), provider, RouterApp(ReplicaSet([])),
                       package_roots=normalize_roots([allowed]))
    m.apply(validate_spec({"name": "d", "package": str(allowed / "alias"), "replicas": {"min": 1, "max": 1},
                           "env": {"HF_TOKEN": {"secret": True, "value": SECRET}}}))
    m._reconcile(m.deployments["d"])
    [launch] = provider.launches
    assert launch.package == str(pkg.resolve()) and launch.env == {"HF_TOKEN": SECRET}
    (allowed / "alias").unlink()
    (allowed / "alias").symlink_to(outside)            # swapped after the deploy
    m.live.clear()
    m._reconcile(m.deployments["d"])
    assert len(provider.launches) == 1
    events = [e for _, e in m.deployments["d"].events]
    assert any("not starting a replica" in e and "--package-root" in e for e in events), events


def test_a_remote_source_is_weights_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An s3:// or https:// package becomes an `llm` package rooted at the replica's working
    directory: a model.py among the source's objects is never imported (it is not the root)."""
    from headway.server.serve import resolve_target

    monkeypatch.chdir(tmp_path)
    for url in ("s3://models/with-code/", "https://host/m.gguf"):
        pkg = resolve_target(url)
        assert pkg.config.runtime == "llm" and pkg.config.model.source == url and pkg.root == tmp_path
        assert pkg.config.requirements == []
