"""Loading a model package: read headway.yaml, validate it, report every error at once.

Owns the translation from a directory on disk to a validated `Package`. Errors are collected
over the whole file (schema, engine options, cross-field rules) and reported together, each with
the field, the reason and a corrected example taken from the schema.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from headway.package.schema import ENGINE_OPTIONS, RUNTIMES, PackageConfig

CONFIG_FILE = "headway.yaml"
MODEL_FILE = "model.py"


@dataclass(frozen=True)
class FieldError:
    field: str
    reason: str
    example: str | None = None

    def render(self) -> str:
        line = f"  - {self.field}: {self.reason}"
        if self.example:
            line += f"\n      example: {self.example}"
        return line


class PackageError(Exception):
    """A package that cannot be used; `errors` lists every problem found."""

    def __init__(self, path: Path | str, errors: list[FieldError], what: str = "the model package"):
        self.path = Path(path)
        self.errors = errors
        n = len(errors)
        head = f"{self.path}: {n} error{'s' if n != 1 else ''} in {what}"
        super().__init__(head + "\n" + "\n".join(e.render() for e in errors))


@dataclass(frozen=True)
class Package:
    root: Path
    config: PackageConfig

    @property
    def model_file(self) -> Path:
        return self.root / MODEL_FILE

    @property
    def has_model_file(self) -> bool:
        return self.model_file.is_file()


def _nested_model(model: type[BaseModel] | None, name: Any) -> type[BaseModel] | None:
    info = model.model_fields.get(name) if model is not None and isinstance(name, str) else None
    ann = info.annotation if info else None
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _example_for(model: type[BaseModel], loc: tuple[Any, ...]) -> str | None:
    """The schema's example for the field at `loc`, rendered as one line of YAML."""
    parent: type[BaseModel] | None = model
    for part in loc[:-1]:
        parent = _nested_model(parent, part)
    name = loc[-1] if loc else None
    if parent is None or not isinstance(name, str) or name not in parent.model_fields:
        return None
    examples = parent.model_fields[name].examples
    if not examples:
        return None
    return yaml.safe_dump({name: examples[0]}, default_flow_style=True, width=1000).strip()[1:-1]


def _field_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(file)"


def _errors_from(exc: ValidationError, model: type[BaseModel], prefix: tuple[Any, ...] = ()) -> list[FieldError]:
    errors: list[FieldError] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        example = _example_for(model, loc)
        if err["type"] == "extra_forbidden":
            parent: type[BaseModel] | None = model
            for part in loc[:-1]:
                parent = _nested_model(parent, part)
            known = sorted(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            msg = f"unknown field '{loc[-1]}'"
            msg += f"; did you mean '{close[0]}'?" if close else ""
            msg += f"; allowed here: {', '.join(known)}" if known else ""
            if close:
                example = _example_for(model, loc[:-1] + (close[0],))
        elif err["type"] == "missing":
            msg = "required field is missing"
        errors.append(FieldError(_field_path(prefix + loc), msg, example))
    return errors


def validate_config(data: Any, path: Path | str = CONFIG_FILE) -> PackageConfig:
    """Validate parsed headway.yaml data; raise PackageError listing every problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PackageError(path, [FieldError("(file)", f"expected a mapping of fields, got {type(data).__name__}",
                                             "name: my-model")])
    errors: list[FieldError] = []
    config: PackageConfig | None = None
    try:
        config = PackageConfig.model_validate(data)
    except ValidationError as exc:
        errors.extend(_errors_from(exc, PackageConfig))
    runtime = data.get("runtime", "custom")
    engine = data.get("engine", {}) or {}
    if runtime in RUNTIMES and isinstance(engine, dict):
        opts = ENGINE_OPTIONS[runtime]
        try:
            opts.model_validate(engine)
        except ValidationError as exc:
            for e in _errors_from(exc, opts, ("engine",)):
                errors.append(FieldError(e.field, f"{e.reason} (runtime '{runtime}')", e.example))
    model = data.get("model") or {}
    if runtime in RUNTIMES and runtime != "custom" and isinstance(model, dict) and not model.get("source"):
        errors.append(FieldError("model.source", f"runtime '{runtime}' needs a model source",
                                 "source: smollm2-135m-instruct"))
    if errors or config is None:
        raise PackageError(path, errors)
    return config


def load_package(path: str | os.PathLike[str]) -> Package:
    """Read and validate the package at `path` (a directory or its headway.yaml)."""
    p = Path(path)
    root = p.parent if p.name == CONFIG_FILE else p
    cfg_path = root / CONFIG_FILE
    if not root.exists():
        raise PackageError(root, [FieldError("(path)", "no such directory", "headway init ./my-model")])
    if not cfg_path.is_file():
        raise PackageError(root, [FieldError(CONFIG_FILE, "the package has no headway.yaml",
                                             "headway init ./my-model  (scaffolds one)")])
    try:
        data = yaml.safe_load(cfg_path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise PackageError(cfg_path, [FieldError("(yaml)", f"not valid YAML{where}: {problem}",
                                                 "name: my-model")]) from None
    config = validate_config(data, cfg_path)
    pkg = Package(root=root.resolve(), config=config)
    if config.runtime == "custom" and not pkg.has_model_file:
        raise PackageError(cfg_path, [FieldError(MODEL_FILE, "a custom runtime needs model.py with a "
                                                 f"class '{config.model.class_name}'",
                                                 "headway init ./my-model  (scaffolds one)")])
    return pkg
