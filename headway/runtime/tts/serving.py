"""The TTS runtime inside the replica server: resolves the voice (a model-library name such as
piper-joe, or a local directory holding a Piper `*.onnx` + `*.onnx.json`), starts the
synthesizer, mounts the speech endpoints (api.py) and reports its figures to /headway/state
and /metrics.

State for routers and autoscalers (the server adds ready, in_flight, queued, max_concurrency):
`chars_per_s` and `audio_s_per_s` (measured synthesis throughput), and a `tts` block with the
voice, sample rate, threads, active jobs and pending sentences.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter

from headway.package.load import Package
from headway.package.schema import TtsEngineOptions
from headway.runtime.base import Runtime
from headway.runtime.gate import Gate
from headway.tokenization import model_dir as find_model_dir
from headway.runtime.tts.encode import available_formats
from headway.runtime.tts.metrics import TTSMetrics
from headway.runtime.tts.request import Limits
from headway.runtime.tts.synth import Synthesizer

WARM_UP = "Hello there."




class TTSRuntime(Runtime):
    kind = "tts"

    def __init__(self, package: Package):
        opts = package.config.engine_options()
        assert isinstance(opts, TtsEngineOptions)
        self.options = opts
        self.package = package
        name = package.config.name
        super().__init__(name, opts.max_concurrency)
        self.aliases = sorted({name, package.config.model.source or name})
        self.synth: Synthesizer | None = None
        self.metrics = TTSMetrics(name)
        self._api: Any = None

    async def load(self) -> None:
        source = self.package.config.model.source or self.name
        model_dir = await asyncio.to_thread(find_model_dir, source, self.package.root)
        self.mark_phase("fetched_s")
        self.synth = await asyncio.to_thread(Synthesizer, model_dir, self.options.num_threads)
        self.synth.on_sentence = self.metrics.sentence
        self.mark_phase("loaded_s")
        started = time.perf_counter()
        await asyncio.to_thread(self.synth.speak, WARM_UP)   # the first run pays ONNX's one-time costs
        self.startup["warm_up_s"] = round(time.perf_counter() - started, 3)
        self.mark_phase("warmed_s")

    async def shutdown(self) -> None:
        if self.synth is not None:
            await asyncio.to_thread(self.synth.stop)

    def failure(self) -> str | None:
        return self.synth.failure if self.synth is not None else None

    def voices(self) -> list[str]:
        """What `voice` may say: the voice's short name (joe), its full name, and the speakers of a
        multi-speaker voice."""
        assert self.synth is not None
        full = self.synth.voice_name
        short = full.split("-")[1] if full.count("-") >= 2 else full
        speakers = list(getattr(self.synth.voice.config, "speaker_id_map", None) or {})
        return list(dict.fromkeys([short, full, *speakers]))

    def limits(self) -> Limits:
        return Limits(self.aliases, self.voices(), available_formats())

    def out_rate(self) -> int:
        assert self.synth is not None
        return self.options.sample_rate or self.synth.sample_rate

    def _synth(self) -> Synthesizer:
        assert self.synth is not None, "the voice is not loaded"
        return self.synth

    def router(self, gate: Gate | None = None) -> APIRouter:
        from headway.runtime.tts.api import SpeechAPI

        self._api = SpeechAPI(self._synth, self.limits, gate, self.metrics, self.out_rate,
                              idle_s=self.package.config.runtime_options.streaming_read_timeout)
        return self._api.router()

    def parse(self, body: Any) -> Any:
        from headway.package.model_file import InputError

        raise InputError([{"loc": ("body",), "msg": "a TTS model speaks through POST /v1/audio/speech "
                           "(OpenAI's API) or the WebSocket /v1/audio/speech/stream, not predict"}])

    def state(self) -> dict[str, Any]:
        if self.synth is None:
            return {}
        s = self.synth
        figures = s.figures()
        return {"chars_per_s": figures["chars_per_s"], "audio_s_per_s": figures["audio_s_per_s"],
                "tts": {"voice": s.voice_name, "voices": self.voices(), "sample_rate": self.out_rate(),
                        "threads": s.threads, "formats": list(available_formats()), "active": s.active,
                        "pending_sentences": s.pending_sentences, **figures}}

    def metrics_text(self) -> bytes:
        if self.synth is not None:
            self.metrics.active.set(self.synth.active)
        return self.metrics.render()
