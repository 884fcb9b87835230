"""The runtime for a package's own model.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from headway.package.load import Package
from headway.package.model_file import ModelAdapter
from headway.runtime.base import Runtime


class CustomRuntime(Runtime):
    kind = "custom"

    def __init__(self, package: Package, secrets_dir: str | None = None):
        super().__init__(package.config.name, package.config.runtime_options.predict_concurrency)
        self.package = package
        self._secrets_dir = secrets_dir
        self.adapter: ModelAdapter | None = None

    async def load(self) -> None:
        adapter = ModelAdapter.from_package(self.package, self._secrets_dir)
        await adapter.load()
        self.adapter = adapter

    def _ready_adapter(self) -> ModelAdapter:
        if self.adapter is None:
            raise RuntimeError("model is not loaded")
        return self.adapter

    def input_schema(self) -> dict[str, Any]:
        return self._ready_adapter().input_schema()

    def parse(self, body: Any) -> Any:
        return self._ready_adapter().parse(body)

    def streams(self, inputs: Any) -> bool:
        return self._ready_adapter().streams

    async def predict(self, inputs: Any) -> Any:
        return await self._ready_adapter().predict(inputs)

    def stream(self, inputs: Any) -> AsyncIterator[Any]:
        return self._ready_adapter().stream(inputs)
