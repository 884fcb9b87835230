"""LoRA adapters through a real tinycoder replica and the official `openai` client: `--lora` at
start, selection by `model`, /v1/models, the load/unload endpoints and their errors, and the
adapters on /headway/state."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from headway.library import resolve
from headway.runtime.llm.config import ModelConfig
from headway.runtime.llm.lora.peft import random_adapter
from tests.conftest import running_server

TINY = "tinycoder-test"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    cfg = ModelConfig.from_model_dir(resolve(TINY).path)
    return {n: random_adapter(root / n, cfg, r=4, std=0.5, seed=i) for i, n in enumerate(("sql", "chat", "late"))}


@pytest.fixture(scope="module")
def server(tmp_path_factory, adapters):
    args = ["serve", TINY, "--threads", "1", "--lora", f"sql={adapters['sql']}", "--lora", f"chat={adapters['chat']}",
            "--lora-root", str(adapters["late"].parent)]
    with running_server(args, tmp_path_factory.mktemp("lora-server")) as s:
        yield s


def complete(c: OpenAI, model: str, prompt: str = "def add(a, b):") -> str:
    r = c.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0,
                             extra_body={"ignore_eos": True})
    assert r.model == model and r.usage.completion_tokens == 10
    return r.choices[0].text


def test_adapters_selected_by_model_name(server) -> None:
    c = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    models = {m.id: m for m in c.models.list().data}
    assert set(models) == {TINY, "sql", "chat"}
    assert models["sql"].model_extra["parent"] == TINY
    texts = {m: complete(c, m) for m in (TINY, "sql", "chat")}
    assert len(set(texts.values())) == 3, texts
    assert complete(c, "sql") == texts["sql"]
    with pytest.raises(openai.NotFoundError) as nf:
        complete(c, "nope")
    assert "'sql'" in str(nf.value) and "'chat'" in str(nf.value)
    state = httpx.get(f"{server.url}/headway/state").json()
    assert state["adapters"] == ["sql", "chat"] and state["lora"]["requests"]["sql"] >= 2
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'headway_llm_lora_requests_total{adapter="sql"' in metrics


def test_load_and_unload_at_run_time(server, adapters, tmp_path) -> None:
    c = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    post = lambda path, body: httpx.post(f"{server.url}/v1/{path}", json=body, timeout=60)  # noqa: E731
    bad_body = post("load_lora_adapter", {"lora_name": "late"})
    assert bad_body.status_code == 400 and "lora_path" in bad_body.json()["error"]["message"]
    not_json = httpx.post(f"{server.url}/v1/load_lora_adapter", content=b"{", timeout=10)
    assert not_json.status_code == 400
    (adapters["late"].parent / "empty").mkdir(exist_ok=True)
    bad_dir = post("load_lora_adapter", {"lora_name": "late", "lora_path": str(adapters["late"].parent / "empty")})
    assert bad_dir.status_code == 400 and "adapter_config.json" in bad_dir.json()["error"]["message"]
    exists = post("load_lora_adapter", {"lora_name": "sql", "lora_path": str(adapters["late"])})
    assert exists.status_code == 409
    unknown = post("unload_lora_adapter", {"lora_name": "nope"})
    assert unknown.status_code == 404 and "'sql'" in unknown.json()["error"]["message"]

    ok = post("load_lora_adapter", {"lora_name": "late", "lora_path": str(adapters["late"])})
    assert ok.status_code == 200, ok.text
    assert "late" in {m.id for m in c.models.list().data}
    late = complete(c, "late")
    assert late != complete(c, TINY)
    assert "late" in httpx.get(f"{server.url}/headway/state").json()["adapters"]

    assert post("unload_lora_adapter", {"lora_name": "late"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        complete(c, "late")
    assert "late" not in httpx.get(f"{server.url}/headway/state").json()["adapters"]
    # loaded again under the same name: served again, same weights, same output
    assert post("load_lora_adapter", {"lora_name": "late", "lora_path": str(adapters["late"])}).status_code == 200
    assert complete(c, "late") == late


def test_run_time_loading_only_from_under_the_adapter_roots(server, adapters, tmp_path) -> None:
    """An adapter outside --lora-root, or reached through a symlink or '..' from inside it, is refused
    with 403 naming the roots; nothing is loaded."""
    import shutil

    root = adapters["late"].parent
    outside = tmp_path / "outside"
    shutil.copytree(adapters["late"], outside)
    link = root / f"link-{tmp_path.name}"
    link.symlink_to(outside)
    post = lambda body: httpx.post(f"{server.url}/v1/load_lora_adapter", json=body, timeout=60)  # noqa: E731
    dotdot = f"{root}/../{tmp_path.name}/outside"          # both live in pytest's base temp directory
    assert Path(dotdot).resolve() == outside.resolve()
    for path in (str(outside), str(link), dotdot):
        r = post({"lora_name": "evil", "lora_path": path})
        assert r.status_code == 403, r.text
        err = r.json()["error"]
        assert str(root) in err["message"] and "--lora-root" in err["message"] and err["param"] == "lora_path"
    assert "evil" not in httpx.get(f"{server.url}/headway/state").json()["adapters"]


def test_no_adapter_roots_refuses_run_time_paths(tmp_path) -> None:
    """A server started without --lora-root loads no adapter from a path at run time."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from headway.runtime.llm.lora.api import lora_router

    class Engine:
        loaded: list[str] = []

        async def load_adapter(self, name: str, path: str) -> None:
            self.loaded.append(path)

    eng = Engine()
    app = FastAPI()
    app.include_router(lora_router(lambda: eng))
    r = TestClient(app).post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path)})
    assert r.status_code == 403 and "--lora-root" in r.json()["error"]["message"] and eng.loaded == []


def test_bad_lora_flag_is_refused(tmp_path) -> None:
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = subprocess.run([sys.executable, "-m", "headway", "serve", TINY, "--lora", "nopath"], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "NAME=PATH" in out.stderr
