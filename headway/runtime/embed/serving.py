"""The embeddings runtime inside the replica server: resolves the model directory (a library
name such as minilm-l6, a local sentence-transformers / Hugging Face directory, or a remote
source through the CLI's fetcher), starts the engine, mounts the API and reports the engine's
state (in flight, queued, its throughput) to the infrastructure.

The predict endpoint takes /embed's body and answers with its list of vectors.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import torch
from fastapi import APIRouter

from headway.package.load import Package
from headway.package.schema import EmbeddingsEngineOptions
from headway.runtime.base import Runtime
from headway.runtime.embed.api import EmbeddingsAPI, finish
from headway.runtime.embed.engine import EmbedEngine
from headway.runtime.embed.inputs import ApiError, Tokenize, parse_embed
from headway.runtime.gate import Gate
from headway.runtime.host import cpu_share
from headway.runtime.llm.serving import RemoteFetch, _model_dir


def default_threads() -> int:
    """The replica's CPU share: OMP_NUM_THREADS when set (the fleet sets it from the deployment's
    `resources.cpu`), else the CPUs this process may run on (its affinity), not the machine's."""
    return cpu_share()


class EmbeddingsRuntime(Runtime):
    kind = "embeddings"

    def __init__(self, package: Package, fetch: RemoteFetch | None = None):
        opts = package.config.engine_options()
        assert isinstance(opts, EmbeddingsEngineOptions)
        self.options, self.package, self.fetch = opts, package, fetch
        name = opts.served_model_name or package.config.name
        super().__init__(name, opts.max_concurrency)
        self.aliases = sorted({name, package.config.name, package.config.model.source or name})
        self.engine: EmbedEngine | None = None
        self.tokenize: Tokenize | None = None
        self._api = EmbeddingsAPI(self.aliases, lambda: self.engine, lambda: self.tokenize)

    async def load(self) -> None:
        from headway.runtime.embed.spec import load_tokenizer, read_spec

        source = self.package.config.model.source
        if source is None:
            raise ValueError("an embeddings package needs model.source (a library name or a model directory)")
        model_dir, fetched = await asyncio.to_thread(_model_dir, source, self.package.root, self.fetch)
        self.mark_phase("fetched_s")
        if fetched:
            self.startup["fetch"] = fetched
        o = self.options
        spec = await asyncio.to_thread(read_spec, model_dir, o.max_input_tokens)
        tokenizer = await asyncio.to_thread(load_tokenizer, model_dir)
        dtype = torch.bfloat16 if o.dtype == "bfloat16" else torch.float32
        engine = await asyncio.to_thread(
            EmbedEngine, spec, dtype=dtype, max_batch_tokens=o.max_batch_tokens, urgent_tokens=o.urgent_tokens,
            num_threads=o.num_threads or default_threads(), model_name=self.name)
        self.mark_phase("loaded_s")
        tokenize = Tokenize(tokenizer, spec.max_tokens, spec.vocab_size)
        await engine.embed(await tokenize(parse_embed({"inputs": ["warm up", "a longer warm-up text " * 8]},
                                                      spec.dimensions), "inputs"))
        if o.normalize is not None:
            engine.spec = dataclasses.replace(spec, normalize=o.normalize)
        self.engine, self.tokenize = engine, tokenize
        self.mark_phase("warmed_s")

    async def shutdown(self) -> None:
        if self.engine is not None:
            await asyncio.to_thread(self.engine.stop)

    def router(self, gate: Gate | None = None) -> APIRouter:
        self._api.gate = gate
        return self._api.router()

    def failure(self) -> str | None:
        if self.engine is not None and not self.engine.alive():
            return "the embeddings engine thread stopped"
        return None

    def input_schema(self) -> dict[str, Any]:
        return {"type": "object", "required": ["inputs"], "properties": {
            "inputs": {"anyOf": [{"type": "string", "minLength": 1},
                                 {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}]},
            "truncate": {"type": "boolean", "default": False}, "normalize": {"type": "boolean", "default": True},
            "dimensions": {"type": "integer", "minimum": 1}}}

    def parse(self, body: Any) -> Any:
        """An /embed body, validated and tokenized (a too-long input is a 422 here, not a 500 later)."""
        from headway.package.model_file import InputError

        assert self.engine is not None and self.tokenize is not None   # the server parses only once ready
        try:
            q = parse_embed(body, self.engine.spec.dimensions)
            return q, self.tokenize.sync(q, "inputs")
        except ApiError as exc:
            raise InputError([{"loc": (exc.param or "body",), "msg": exc.message}]) from None

    async def predict(self, inputs: Any) -> Any:
        q, ids = inputs
        assert self.engine is not None
        return finish(await self.engine.embed(ids), q).tolist()

    def state(self) -> dict[str, Any]:
        return self.engine.state() if self.engine is not None else {}

    def metrics_text(self) -> bytes:
        return self.engine.metrics.render() if self.engine is not None else b""
