"""The ASR runtime inside the replica server: resolves the Whisper model (a library name or a
CTranslate2 directory), runs the engine, mounts /v1/audio/transcriptions, and reports its
throughput (audio seconds, real-time factor) to /headway/state and /metrics.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter

from headway.package.load import Package
from headway.package.schema import AsrEngineOptions
from headway.runtime.base import EngineRuntime
from headway.runtime.gate import Gate
from headway.tokenization import model_dir as find_model_dir


class AsrRuntime(EngineRuntime):
    kind = "asr"

    def __init__(self, package: Package):
        opts = package.config.engine_options()
        assert isinstance(opts, AsrEngineOptions)
        self.options = opts
        self.package = package
        super().__init__(package.config.name, opts.max_concurrency)
        self.aliases = sorted({package.config.name, package.config.model.source or package.config.name})
        self.engine: Any = None

    async def load(self) -> None:
        from headway.runtime.asr.engine import AsrEngine

        source = self.package.config.model.source
        if source is None:
            raise ValueError("an asr package needs model.source (e.g. whisper-base, or a CTranslate2 directory)")
        model_dir = await asyncio.to_thread(find_model_dir, source, self.package.root)
        self.mark_phase("fetched_s")
        o = self.options
        engine = AsrEngine(model_dir, compute_type=o.compute_type, num_threads=o.num_threads,
                           max_batch_size=o.max_batch_size, beam_size=o.beam_size, model_name=self.name)
        await asyncio.to_thread(engine.start)
        self.engine = engine
        self.mark_phase("loaded_s")

    def router(self, gate: Gate | None = None) -> APIRouter:
        from headway.runtime.asr.api import TranscriptionServer

        return TranscriptionServer(lambda: self.engine, self.aliases, gate, self.options.max_audio_seconds).router()

    def state(self) -> dict[str, Any]:
        return self.engine.state() if self.engine is not None else {}

    def metrics_text(self) -> bytes:
        return self.engine.metrics.render() if self.engine is not None else b""
