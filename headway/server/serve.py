"""From a target on the command line (a package path or a model-library name) to a running
replica server."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
from packaging.requirements import Requirement

from headway.package.load import FieldError, Package, PackageError, load_package, validate_config
from headway.runtime.base import Runtime
from headway.server.app import create_app
from headway.server.venv import normalize, reexec_in_venv
from headway.tls import ServerTLS

if TYPE_CHECKING:
    from headway.runtime.llm.serving import RemoteFetch

log = logging.getLogger("headway.server")


def _is_package_path(target: str) -> bool:
    p = Path(target)
    return p.is_dir() or p.name == "headway.yaml" or "/" in target or target.startswith(".")


def _is_encoder_dir(target: str) -> bool:
    """A sentence-transformers or Hugging Face BERT directory (no headway.yaml): served as embeddings."""
    p = Path(target).expanduser()
    if not p.is_dir() or (p / "headway.yaml").exists() or not (p / "config.json").exists():
        return False
    if (p / "modules.json").exists():
        return True
    try:
        return json.loads((p / "config.json").read_text()).get("model_type") == "bert"
    except (OSError, ValueError):
        return False


def _name_from_url(url: str) -> str:
    """s3://bucket/models/tiny-llama/ -> 'tiny-llama'; https://h/x/Model.Q4.gguf -> 'model.q4'."""
    segments = [p for p in url.split("://", 1)[1].split("?", 1)[0].split("/") if p]
    last = segments[-1] if segments else ""
    name = re.sub(r"[^a-z0-9._-]+", "-", last.lower().removesuffix(".gguf")).strip("-._")[:63]
    return name or "model"


def resolve_target(target: str, engine_overrides: dict[str, Any] | None = None, name: str | None = None) -> Package:
    """A package directory, a remote model URL (s3://, https://) or a library name, the last
    two turned into a package that serves that model; `name` replaces the package's name (what
    clients put in `model`)."""
    overrides = {k: v for k, v in (engine_overrides or {}).items() if v is not None}
    if "://" in target:
        config = validate_config({"name": name or _name_from_url(target), "runtime": "llm", "model": {"source": target},
                                  "engine": overrides}, f"url:{target}")
        return Package(Path.cwd(), config)
    if _is_encoder_dir(target):
        local = Path(target).expanduser().resolve()
        config = validate_config({"name": name or _name_from_url(f"file://{local}"), "runtime": "embeddings",
                                  "model": {"source": str(local)}, "engine": overrides}, f"dir:{target}")
        return Package(local, config)
    if _is_package_path(target):
        pkg = load_package(target)
        if overrides or name:
            data = pkg.config.model_dump(mode="json")
            data["engine"] = {**data.get("engine", {}), **overrides}
            if name:
                data["name"] = name
            pkg = Package(pkg.root, validate_config(data, pkg.root / "headway.yaml"))
        return pkg
    from headway.library import UnknownModelError, get_entry

    try:
        entry = get_entry(target)
    except UnknownModelError as exc:
        raise PackageError(target, [FieldError(
            "target", f"'{target}' is neither a package directory nor a model-library name: {exc}",
            "headway serve smollm2-135m-instruct")]) from None
    config = validate_config({"name": name or entry.name, "runtime": entry.runtime,
                              "model": {"source": entry.name}, "engine": overrides}, f"library:{target}")
    return Package(Path.cwd(), config)


def check_requirements(requirements: list[str]) -> None:
    """Raise a PackageError naming the requirements this interpreter does not satisfy. Nothing is
    installed here: `headway serve` runs a package with requirements in its own virtual
    environment (venv.py), never pip-installing into the shared interpreter."""
    missing: list[str] = []
    for spec in normalize(requirements):
        req = Requirement(spec)
        try:
            have = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(spec)
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            missing.append(spec)
    if missing:
        raise PackageError("headway.yaml", [FieldError(
            "requirements", f"{', '.join(missing)} not installed in {sys.prefix}; `headway serve PACKAGE` installs a "
            "package's requirements into its own virtual environment under $HEADWAY_CACHE/venvs and runs there",
            "requirements: [numpy==2.1.0]")])


def build_runtime(package: Package, secrets_dir: str | None = None, fetch: RemoteFetch | None = None) -> Runtime:
    cfg = package.config
    os.environ.update(cfg.environment)
    check_requirements(cfg.requirements)
    if cfg.runtime == "custom":
        from headway.runtime.custom import CustomRuntime

        return CustomRuntime(package, secrets_dir)
    if cfg.runtime == "llm":
        from headway.runtime.llm.serving import LLMRuntime

        return LLMRuntime(package, fetch)
    if cfg.runtime == "embeddings":
        from headway.runtime.embed.serving import EmbeddingsRuntime

        return EmbeddingsRuntime(package, fetch)
    if cfg.runtime == "tts":
        from headway.runtime.tts.serving import TTSRuntime

        return TTSRuntime(package)
    if cfg.runtime == "asr":
        from headway.runtime.asr.serving import AsrRuntime

        return AsrRuntime(package)
    raise PackageError(package.root, [FieldError(
        "runtime", f"runtime '{cfg.runtime}' is not available in this version of Headway yet "
        "(available: custom, llm, embeddings, tts, asr)", "runtime: custom")])


def serve(target: str, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info",
          engine_overrides: dict[str, Any] | None = None, secrets_dir: str | None = None,
          fetch: RemoteFetch | None = None, name: str | None = None, replica_id: str | None = None,
          requirements_venv: bool = False, tls: ServerTLS | None = None) -> None:
    """requirements_venv: when the package has requirements, re-execute this process (the `headway
    serve` CLI, same argv) with the python of their own virtual environment (venv.py).
    `tls`: serve HTTPS only (from headway.tls.server_tls, checked by the caller before this)."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    package = resolve_target(target, engine_overrides, name)
    if requirements_venv:
        reexec_in_venv(package.config.requirements)
    runtime = build_runtime(package, secrets_dir, fetch)
    app = create_app(runtime, package.config.runtime_options, replica_id=replica_id)
    log.info("serving '%s' (%s) on %s://%s:%d", runtime.name, package.config.runtime, "https" if tls else "http",
             host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5,
                **(tls.uvicorn_options() if tls else {}))
