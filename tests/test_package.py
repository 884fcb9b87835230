"""headway.yaml validation: each error path, several errors at once, the exported schema."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from headway.package.load import PackageError, load_package, validate_config
from headway.package.schema import json_schema
from tests.conftest import EXAMPLES, ROOT, write_package

SCHEMA_FILE = ROOT / "headway" / "package" / "headway.schema.json"


def errors_of(data: object) -> dict[str, str]:
    with pytest.raises(PackageError) as info:
        validate_config(data)
    return {e.field: e.reason for e in info.value.errors}


@pytest.mark.parametrize("example", ["text-classifier", "streaming-story"])
def test_examples_are_valid(example: str) -> None:
    pkg = load_package(EXAMPLES / example)
    assert pkg.config.name == example
    assert pkg.has_model_file


def test_defaults() -> None:
    cfg = validate_config({"name": "m"})
    assert cfg.runtime == "custom"
    assert cfg.runtime_options.predict_concurrency == 1
    assert cfg.runtime_options.max_request_body == 10_000_000
    assert cfg.model.class_name == "Model"


@pytest.mark.parametrize(
    "data, field, fragment",
    [
        ({}, "name", "missing"),
        ({"name": "Bad Name"}, "name", "not a valid name"),
        ({"name": "m", "runtime": "vision"}, "runtime", "'custom'"),
        ({"name": "m", "nmae": 1}, "nmae", "did you mean"),
        ({"name": "m", "resources": {"cpu": 0}}, "resources.cpu", "greater than 0"),
        ({"name": "m", "resources": {"memory": "lots"}}, "resources.memory", "not a memory size"),
        ({"name": "m", "resources": {"accelerator": "H100"}}, "resources.accelerator", "KIND:COUNT"),
        ({"name": "m", "runtime_options": {"max_request_body": "big"}}, "runtime_options.max_request_body",
         "not a size"),
        ({"name": "m", "runtime_options": {"predict_concurrency": 0}}, "runtime_options.predict_concurrency",
         "greater than or equal to 1"),
        ({"name": "m", "secrets": ["BAD-NAME"]}, "secrets", "invalid secret name"),
        ({"name": "m", "environment": {"1X": "a"}}, "environment", "invalid environment variable"),
        ({"name": "m", "model": {"source": "ftp://x/y"}}, "model.source", "unsupported URL scheme"),
        ({"name": "m", "runtime": "llm"}, "model.source", "needs a model source"),
        ({"name": "m", "runtime": "llm", "model": {"source": "x"}, "engine": {"dtype": "fp16"}},
         "engine.dtype", "'bfloat16'"),
        ({"name": "m", "runtime": "llm", "model": {"source": "x"}, "engine": {"max_batch": 4}},
         "engine.max_batch", "unknown field"),
        ([1, 2], "(file)", "expected a mapping"),
    ],
)
def test_each_error_path(data: object, field: str, fragment: str) -> None:
    errors = errors_of(data)
    assert field in errors, errors
    assert fragment in errors[field]


def test_errors_carry_a_corrected_example() -> None:
    with pytest.raises(PackageError) as info:
        validate_config({"name": "m", "resources": {"memroy": "4"}})
    (err,) = info.value.errors
    assert "did you mean 'memory'" in err.reason
    assert err.example == "memory: 4Gi"
    assert "example: memory: 4Gi" in str(info.value)


def test_several_errors_reported_together() -> None:
    errors = errors_of({
        "name": "Bad Name", "runtime": "llm", "resources": {"cpu": -1},
        "runtime_options": {"queue_size": -3}, "engine": {"dtype": "fp8"},
    })
    assert set(errors) == {"name", "resources.cpu", "runtime_options.queue_size", "engine.dtype", "model.source"}


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    pkg = write_package(tmp_path / "p", "name: m\nruntime: [custom\n", "class Model: ...\n")
    with pytest.raises(PackageError) as info:
        load_package(pkg)
    assert "line" in info.value.errors[0].reason


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="no headway.yaml"):
        load_package(tmp_path)
    write_package(tmp_path / "p", "name: m\n", None)
    with pytest.raises(PackageError, match="model.py"):
        load_package(tmp_path / "p")
    with pytest.raises(PackageError, match="no such directory"):
        load_package(tmp_path / "missing")


def test_cli_validate_prints_every_error_and_exits_nonzero(tmp_path: Path) -> None:
    pkg = write_package(tmp_path / "p", "name: Bad Name\nresources: {cpu: 0}\nruntime_options: {queue_size: x}\n",
                        "class Model:\n    def predict(self, x): return x\n")
    proc = subprocess.run([sys.executable, "-m", "headway", "validate", str(pkg)], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "3 errors" in proc.stderr
    for field in ("name:", "resources.cpu:", "runtime_options.queue_size:"):
        assert field in proc.stderr
    ok = subprocess.run([sys.executable, "-m", "headway", "validate", str(EXAMPLES / "text-classifier")],
                        capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0 and "ok: text-classifier" in ok.stdout


def test_exported_json_schema_is_current() -> None:
    """The committed schema must equal the one the code exports: `python -m headway.package.export_schema`."""
    assert json.loads(SCHEMA_FILE.read_text()) == json_schema()
