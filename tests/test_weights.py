"""Weights fetched fast and once: parallel byte ranges from a real S3 API server (moto on
127.0.0.1) and from local http servers, the node cache's single flight across threads and
processes, crash safety, clear errors, and `headway serve s3://...` / `http://...gguf` end to end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from headway.infra.weights import (
    BadSourceError,
    FetchError,
    HttpStore,
    IntegrityError,
    NodeCache,
    S3Store,
    SourceNotFoundError,
    TransferError,
    TransferOptions,
    fetch_file,
    fetch_source,
)
from headway.infra.weights.localstore import FileServer, S3Server
from headway.infra.weights.ranges import plan_parts
from tests.conftest import ROOT, running_server

PART = 64 * 1024
OPTS = TransferOptions(part_size=PART, concurrency=4, retries=2, backoff_s=0.01, progress=False)
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "models"


@pytest.fixture(scope="module", autouse=True)
def aws_env():
    mp = pytest.MonkeyPatch()
    for k, v in CREDS.items():
        mp.setenv(k, v)
    mp.delenv("AWS_ENDPOINT_URL", raising=False)
    mp.delenv("AWS_PROFILE", raising=False)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def s3():
    import boto3

    with S3Server() as server:
        boto3.client("s3", endpoint_url=server.url).create_bucket(Bucket=BUCKET)
        yield server


@pytest.fixture
def files(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    return root


def put(s3: S3Server, key: str, data: bytes) -> None:
    import boto3

    boto3.client("s3", endpoint_url=s3.url).put_object(Bucket=BUCKET, Key=key, Body=data)


def payload(n: int) -> bytes:
    return (bytes(range(251)) * (n // 251 + 1))[:n]  # period 251: a misplaced part shows


def cache_is_clean(cache: NodeCache) -> bool:
    return not any((cache.root / "blobs").iterdir()) and not any((cache.root / "tmp").iterdir())


# ---- byte ranges -----------------------------------------------------------------------------

@given(size=st.integers(0, 10**8), part=st.integers(64 * 1024, 10**7))
def test_parts_tile_the_object(size, part) -> None:
    parts = plan_parts(size, part)
    assert [p.start for p in parts] == list(range(0, size, part))
    assert all(p.end == q.start for p, q in zip(parts, parts[1:])) and sum(p.length for p in parts) == size
    assert all(0 < p.length <= part for p in parts)


@pytest.mark.parametrize("size", [0, 1, PART - 1, PART, 3 * PART + 7])
def test_s3_ranges_reassemble_odd_sizes(s3, tmp_path, size) -> None:
    data = payload(size)
    put(s3, f"odd/{size}.bin", data)
    store = S3Store(s3.url)
    [f] = store.files(f"s3://{BUCKET}/odd/{size}.bin")
    s3.shaper.reset()
    blob = fetch_file(store, f, NodeCache(tmp_path / "c"), OPTS)
    assert blob.path.read_bytes() == data and blob.size == size and not blob.hit
    assert s3.shaper.gets == len(plan_parts(size, PART))  # one GET per part, none for 0 bytes
    assert f.md5 is not None  # single-part upload: the ETag is the MD5, and it was checked


@pytest.mark.parametrize("size", [0, 1, 3 * PART + 7])
def test_http_ranges_reassemble_odd_sizes(files, tmp_path, size) -> None:
    data = payload(size)
    (files / "w.bin").write_bytes(data)
    with FileServer(files) as server:
        store = HttpStore()
        [f] = store.files(f"{server.url}/w.bin")
        assert f.ranged and f.size == size
        blob = fetch_file(store, f, NodeCache(tmp_path / "c"), OPTS)
        assert blob.path.read_bytes() == data
        assert server.shaper.gets == len(plan_parts(size, PART))


def test_http_without_ranges_is_one_stream(files, tmp_path) -> None:
    data = payload(5 * PART + 3)
    (files / "w.bin").write_bytes(data)
    with FileServer(files, ranges=False) as server:
        store = HttpStore()
        [f] = store.files(f"{server.url}/w.bin")
        assert not f.ranged
        server.shaper.reset()  # the probe was a GET too
        server.shaper.cut_next = 1  # a retry of a whole-file stream starts again from byte 0
        blob = fetch_file(store, f, NodeCache(tmp_path / "c"), OPTS)
        assert blob.path.read_bytes() == data
        assert server.shaper.gets == 2


def test_http_probe_without_head_and_through_a_redirect(files, tmp_path) -> None:
    data = payload(2 * PART + 1)
    (files / "m.gguf").write_bytes(data)
    with FileServer(files, head_allowed=False) as server:
        store = HttpStore()
        [f] = store.files(f"{server.url}/redirect/m.gguf")
        assert f.ranged and f.size == len(data) and f.url == f"{server.url}/m.gguf" and f.rel == "m.gguf"
        assert fetch_file(store, f, NodeCache(tmp_path / "c"), OPTS).path.read_bytes() == data


@pytest.mark.parametrize("kind", ["s3", "http"])
def test_a_part_cut_short_once_is_retried(s3, files, tmp_path, kind) -> None:
    data = payload(4 * PART + 11)
    (files / "w.bin").write_bytes(data)
    put(s3, "retry/w.bin", data)
    with FileServer(files) as http:
        server, store, url = ((s3, S3Store(s3.url), f"s3://{BUCKET}/retry/w.bin") if kind == "s3"
                              else (http, HttpStore(), f"{http.url}/w.bin"))
        [f] = store.files(url)
        server.shaper.reset()
        server.shaper.cut_next = 1
        blob = fetch_file(store, f, NodeCache(tmp_path / "c"), OPTS)
        assert blob.path.read_bytes() == data
        assert server.shaper.gets == len(plan_parts(len(data), PART)) + 1
        server.shaper.cut_next = 0


def test_a_part_that_keeps_failing_is_an_error_and_caches_nothing(s3, tmp_path) -> None:
    put(s3, "bad/w.bin", payload(3 * PART))
    store = S3Store(s3.url)
    [f] = store.files(f"s3://{BUCKET}/bad/w.bin")
    cache = NodeCache(tmp_path / "c")
    s3.shaper.cut_next = 100
    try:
        with pytest.raises(TransferError, match=r"s3://models/bad/w\.bin: bytes .* failed after 3 attempts"):
            fetch_file(store, f, cache, OPTS)
    finally:
        s3.shaper.cut_next = 0
    assert cache_is_clean(cache)


def test_corrupted_bytes_fail_the_md5_check_and_leave_no_blob(s3, tmp_path) -> None:
    put(s3, "corrupt/w.bin", payload(2 * PART + 5))
    store = S3Store(s3.url)
    [f] = store.files(f"s3://{BUCKET}/corrupt/w.bin")
    cache = NodeCache(tmp_path / "c")
    s3.shaper.corrupt_next = 1
    try:
        with pytest.raises(IntegrityError, match=r"s3://models/corrupt/w\.bin: MD5 .*nothing was cached"):
            fetch_file(store, f, cache, OPTS)
    finally:
        s3.shaper.corrupt_next = 0
    assert cache_is_clean(cache)


def test_an_object_shorter_than_listed_is_an_error_naming_it(files, tmp_path) -> None:
    (files / "w.bin").write_bytes(payload(3 * PART))
    with FileServer(files) as server:
        store = HttpStore()
        [f] = store.files(f"{server.url}/w.bin")
        (files / "w.bin").write_bytes(payload(PART + 3))  # shrinks after it was listed
        cache = NodeCache(tmp_path / "c")
        with pytest.raises(FetchError, match=r"/w\.bin"):
            fetch_file(store, f, cache, OPTS)
        assert cache_is_clean(cache)


def test_a_wrong_sha256_is_refused(files, tmp_path) -> None:
    (files / "w.bin").write_bytes(payload(PART))
    with FileServer(files) as server:
        store = HttpStore()
        [f] = store.files(f"{server.url}/w.bin")
        cache = NodeCache(tmp_path / "c")
        with pytest.raises(IntegrityError, match="expected 00000"):
            fetch_file(store, f, cache, OPTS, sha256="0" * 64)
        assert cache_is_clean(cache)


def test_bad_sources_get_clear_errors(s3, files) -> None:
    store = S3Store(s3.url)
    with pytest.raises(SourceNotFoundError, match="bucket 'no-such-bucket' does not exist"):
        store.files("s3://no-such-bucket/m/")
    with pytest.raises(SourceNotFoundError, match=r"no object s3://models/nothing/here"):
        store.files(f"s3://{BUCKET}/nothing/here")
    with pytest.raises(BadSourceError, match="names no bucket"):
        store.files("s3:///key")
    with pytest.raises(FetchError, match="cannot reach the S3 endpoint"):
        S3Store("http://127.0.0.1:9").files(f"s3://{BUCKET}/m/")
    with FileServer(files) as server:
        with pytest.raises(SourceNotFoundError, match=r"/missing\.gguf: not found \(404\)"):
            HttpStore().files(f"{server.url}/missing.gguf")
    with pytest.raises(BadSourceError, match="names no file"):
        HttpStore().files("https://example.invalid/models/")
    with pytest.raises(BadSourceError, match="allowed: s3://"):
        fetch_source("ftp://host/m.gguf")
    with pytest.raises(ValueError, match="part_size 10 is too small"):
        TransferOptions(part_size=10)


# ---- the node cache: once per node -----------------------------------------------------------

def test_second_fetch_is_a_cache_hit_and_downloads_nothing(files, tmp_path) -> None:
    data = payload(3 * PART)
    (files / "w.bin").write_bytes(data)
    with FileServer(files) as server:
        store, cache = HttpStore(), NodeCache(tmp_path / "c")
        [f] = store.files(f"{server.url}/w.bin")
        first = fetch_file(store, f, cache, OPTS)
        gets = server.shaper.gets
        second = fetch_file(store, f, NodeCache(tmp_path / "c"), OPTS)
        assert (second.hit, second.fetched_bytes, second.path) == (True, 0, first.path)
        assert server.shaper.gets == gets
        assert first.path.name == first.sha256 and first.path.stat().st_mode & 0o222 == 0  # read-only


def test_single_flight_across_threads(files, tmp_path) -> None:
    data = payload(8 * PART)
    (files / "w.bin").write_bytes(data)
    with FileServer(files, rate=1_000_000) as server:  # ~0.15 s a part: the threads overlap
        store = HttpStore()
        [f] = store.files(f"{server.url}/w.bin")
        results = []
        threads = [threading.Thread(target=lambda: results.append(fetch_file(store, f, NodeCache(tmp_path / "c"),
                                                                             OPTS))) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(results) == 3 and {r.path for r in results} == {results[0].path}
        assert sorted(r.fetched_bytes for r in results) == [0, 0, len(data)]
        assert server.shaper.bytes_sent == len(data) and server.shaper.gets == 8


def _fetch_process(source: str, cache: Path, endpoint: str) -> subprocess.Popen:
    env = {**os.environ, **CREDS, "PYTHONPATH": str(ROOT), "HEADWAY_CACHE": str(cache),
           "AWS_ENDPOINT_URL": endpoint}
    return subprocess.Popen([sys.executable, "-m", "headway.infra.weights", source],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)


@pytest.fixture(scope="module")
def tiny_dir():
    from headway.library import resolve

    return resolve("tinycoder-test", progress=False)


def upload_dir(s3: S3Server, prefix: str, directory: Path) -> int:
    import boto3

    client, total = boto3.client("s3", endpoint_url=s3.url), 0
    for p in sorted(directory.iterdir()):
        if p.is_file():
            client.upload_file(str(p), BUCKET, f"{prefix}/{p.name}")
            total += p.stat().st_size
    return total


@pytest.mark.slow
def test_single_flight_across_two_processes(s3, tmp_path, tiny_dir) -> None:
    total = upload_dir(s3, "flight", tiny_dir.path)
    s3.shaper.reset()
    s3.shaper.rate = 3_000_000  # ~1.5 s for the 4 MB of weights: both processes are in flight
    try:
        procs = [_fetch_process(f"s3://{BUCKET}/flight/", tmp_path / "cache", s3.url) for _ in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        s3.shaper.rate = None
    assert all(p.returncode == 0 for p in procs), outs
    reports = [json.loads(o[0]) for o in outs]
    assert reports[0]["path"] == reports[1]["path"]
    assert sum(r["fetched_bytes"] for r in reports) == total  # every file downloaded by exactly one
    assert max(r["lock_wait_s"] for r in reports) > 0.2  # one waited for the other's download in flight
    assert s3.shaper.bytes_sent == total  # ... and served once
    model = Path(reports[0]["path"])
    assert (model / "model.safetensors").read_bytes() == (tiny_dir.path / "model.safetensors").read_bytes()


def test_a_killed_fetcher_leaves_no_blob_and_no_wedged_lock(s3, tmp_path, tiny_dir) -> None:
    upload_dir(s3, "killed", tiny_dir.path)
    cache = tmp_path / "cache"
    s3.shaper.rate = 500_000  # the 4 MB safetensors takes ~8 s: killed mid-download
    try:
        proc = _fetch_process(f"s3://{BUCKET}/killed/", cache, s3.url)
        tmp = cache / "weights" / "tmp"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (tmp.is_dir() and any(p.stat().st_size > 1_000_000
                                                                        for p in tmp.glob("*/part"))):
            time.sleep(0.05)
        assert tmp.is_dir() and any(tmp.glob("*/part")), "the fetcher never started its big download"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        s3.shaper.rate = None
    sizes = {p.stat().st_size for p in (cache / "weights" / "blobs").iterdir()}
    assert tiny_dir.path.joinpath("model.safetensors").stat().st_size not in sizes  # the partial never became a blob
    got = fetch_source(f"s3://{BUCKET}/killed/", cache_dir=cache, endpoint_url=s3.url, options=OPTS)
    assert (got.path / "model.safetensors").read_bytes() == (tiny_dir.path / "model.safetensors").read_bytes()
    assert not any(tmp.iterdir())


def test_safetensors_are_mapped_not_copied(tiny_dir) -> None:
    import torch

    from headway.runtime.llm.weights import WeightStore

    if not Path("/proc/self/maps").exists():
        pytest.skip("needs /proc/self/maps (Linux)")
    store = WeightStore(tiny_dir.path, torch.float32, torch.device("cpu"))
    target = str((tiny_dir.path / "model.safetensors").resolve())
    regions = [tuple(int(x, 16) for x in line.split()[0].split("-"))
               for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(target)]
    assert regions, "the safetensors file is not memory-mapped"
    t = store.take("model.embed_tokens.weight")
    assert any(a <= t.data_ptr() < b for a, b in regions)  # a view of the mapping, not a copy


# ---- end to end: headway serve <url> ---------------------------------------------------------

def _complete(server) -> dict:
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "def add(a, b):", "max_tokens": 5,
                                                          "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.slow
def test_serve_s3_model_directory_then_cache_hit(s3, tmp_path, tiny_dir) -> None:
    total = upload_dir(s3, "serve/tiny", tiny_dir.path)
    env = {**CREDS, "AWS_ENDPOINT_URL": s3.url, "HEADWAY_CACHE": str(tmp_path / "cache")}
    source = f"s3://{BUCKET}/serve/tiny/"
    for expect_hit in (False, True):
        with running_server(["serve", source, "--threads", "1"], tmp_path, env=env) as server:
            assert len(_complete(server)["choices"][0]["text"]) > 0
            startup = httpx.get(f"{server.url}/headway/state").json()["startup"]
            fetch = startup["fetch"]
            assert fetch["source"] == source and fetch["total_bytes"] == total
            assert (fetch["cache_hit"], fetch["fetched_bytes"]) == ((True, 0) if expect_hit else (False, total))
            assert 0 < startup["fetched_s"] <= startup["loaded_s"] <= startup["ready_s"]
    with running_server(["serve", f"s3://{BUCKET}/absent/"], tmp_path, env=env, ready=False) as server:
        deadline, body = time.monotonic() + 60, {}
        while time.monotonic() < deadline and body.get("reason") != "load_failed":
            body = httpx.get(f"{server.url}/health/ready").json()
            time.sleep(0.1)
        assert "SourceNotFoundError: no object s3://models/absent" in body["error"], body


@pytest.mark.slow
def test_serve_https_gguf_converted_once(files, tmp_path, tiny_dir) -> None:
    (files / "tiny.gguf").write_bytes(tiny_dir.gguf_file.read_bytes())
    env = {"HEADWAY_CACHE": str(tmp_path / "cache")}
    with FileServer(files) as http:
        with running_server(["serve", f"{http.url}/tiny.gguf", "--threads", "1"], tmp_path, env=env) as server:
            assert _complete(server)["model"] == "tiny"
            fetch = httpx.get(f"{server.url}/headway/state").json()["startup"]["fetch"]
            assert fetch["fetched_bytes"] == tiny_dir.gguf_file.stat().st_size and fetch["convert_s"] > 0
        # the same bytes under another URL: fetched (a new source key) but not converted again
        (files / "copy.gguf").write_bytes(tiny_dir.gguf_file.read_bytes())
        got = fetch_source(f"{http.url}/copy.gguf", cache_dir=tmp_path / "cache", options=OPTS)
        assert got.convert_s == 0 and (got.path / "config.json").is_file()
