"""Loading a package's `model.py` and calling it the way its author wrote it.

Owns the adaptation of a user's class (sync or async, plain or generator predict, optional
preprocess/postprocess, an optional pydantic input type) into one async calling convention the
replica server uses. Secrets are read here at run time (environment first, then a secrets
directory) and handed to the model; they are never written anywhere.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_type_hints

from pydantic import BaseModel, ValidationError

from headway.package.load import Package

SECRETS_DIR_ENV = "HEADWAY_SECRETS_DIR"


class ModelCodeError(Exception):
    """model.py cannot be used as written (import error, missing class or method)."""


class InputError(Exception):
    """The request body does not match the model's input type; `errors` are pydantic's."""

    def __init__(self, errors: Sequence[Mapping[str, Any]]):
        self.errors = errors
        super().__init__("; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in errors))


def read_secrets(names: list[str], secrets_dir: str | None = None) -> dict[str, str]:
    """Values for the declared secret names: env var NAME, else file SECRETS_DIR/NAME."""
    directory = Path(secrets_dir or os.environ.get(SECRETS_DIR_ENV, "/secrets"))
    values: dict[str, str] = {}
    for name in names:
        if name in os.environ:
            values[name] = os.environ[name]
        elif (directory / name).is_file():
            values[name] = (directory / name).read_text().strip()
    return values


def _import_model_module(path: Path) -> Any:
    mod_name = f"headway_user_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ModelCodeError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's import-time error, reported once and clearly
        raise ModelCodeError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        if sys.path and sys.path[0] == str(path.parent):
            sys.path.pop(0)
    return module


@dataclass
class ModelAdapter:
    """One user model instance and how to call it."""

    instance: Any
    input_type: type[BaseModel] | None
    streams: bool

    @classmethod
    def from_package(cls, package: Package, secrets_dir: str | None = None) -> ModelAdapter:
        module = _import_model_module(package.model_file)
        class_name = package.config.model.class_name
        klass = getattr(module, class_name, None)
        if klass is None or not inspect.isclass(klass):
            found = [n for n, v in vars(module).items() if inspect.isclass(v) and v.__module__ == module.__name__]
            raise ModelCodeError(
                f"{package.model_file} has no class '{class_name}' (classes found: {', '.join(found) or 'none'}); "
                "set model.class_name in headway.yaml or rename the class"
            )
        if not callable(getattr(klass, "predict", None)):
            raise ModelCodeError(f"class '{class_name}' in {package.model_file} has no predict(inputs) method")
        kwargs: dict[str, Any] = {}
        params = inspect.signature(klass).parameters
        offered = {
            "config": package.config,
            "secrets": read_secrets(package.config.secrets, secrets_dir),
            "data_dir": package.root / "data",
        }
        accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        for name, value in offered.items():
            if name in params or accepts_any:
                kwargs[name] = value
        instance = klass(**kwargs)
        predict = instance.predict
        return cls(instance=instance, input_type=_input_type(predict),
                   streams=inspect.isgeneratorfunction(predict) or inspect.isasyncgenfunction(predict))

    async def load(self) -> None:
        load = getattr(self.instance, "load", None)
        if load is None:
            return
        if inspect.iscoroutinefunction(load):
            await load()
        else:
            await asyncio.to_thread(load)

    def input_schema(self) -> dict[str, Any]:
        if self.input_type is None:
            return {"type": "object", "description": "Any JSON; the model declares no input type."}
        return self.input_type.model_json_schema()

    def parse(self, body: Any) -> Any:
        if self.input_type is None:
            return body
        try:
            return self.input_type.model_validate(body)
        except ValidationError as exc:
            raise InputError(exc.errors(include_url=False, include_context=False)) from None

    async def _call_hook(self, name: str, value: Any) -> Any:
        hook: Callable[..., Any] | None = getattr(self.instance, name, None)
        if hook is None:
            return value
        if inspect.iscoroutinefunction(hook):
            return await hook(value)
        return await asyncio.to_thread(hook, value)

    async def predict(self, inputs: Any) -> Any:
        """Non-streaming call: preprocess -> predict -> postprocess."""
        inputs = await self._call_hook("preprocess", inputs)
        predict = self.instance.predict
        if inspect.iscoroutinefunction(predict):
            out = await predict(inputs)
        else:
            out = await asyncio.to_thread(predict, inputs)
        return await self._call_hook("postprocess", out)

    async def stream(self, inputs: Any) -> AsyncIterator[Any]:
        """Streaming call. Closing the iterator closes the model's generator (cancellation)."""
        inputs = await self._call_hook("preprocess", inputs)
        predict = self.instance.predict
        if inspect.isasyncgenfunction(predict):
            agen = predict(inputs)
            try:
                async for item in agen:
                    yield item
            finally:
                await agen.aclose()
            return
        gen = predict(inputs)
        done = object()
        lock = threading.Lock()  # a sync generator may be closed only when no next() is running

        def step() -> Any:
            with lock:
                return next(gen, done)

        def close() -> None:
            with lock:
                gen.close()

        try:
            while True:
                item = await asyncio.to_thread(step)
                if item is done:
                    break
                yield item
        finally:
            # On cancellation a step may still run in its thread: close after it, off the loop.
            asyncio.get_running_loop().run_in_executor(None, close)


def _input_type(predict: Callable[..., Any]) -> type[BaseModel] | None:
    try:
        hints = get_type_hints(predict)
    except Exception:
        return None
    params = [p for p in inspect.signature(predict).parameters.values() if p.name != "self"]
    if not params:
        raise ModelCodeError("predict must take one argument: the request inputs")
    ann = hints.get(params[0].name)
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
