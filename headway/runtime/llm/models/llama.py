"""Llama family (Llama 2/3, SmolLM2): the plain pre-norm decoder with SwiGLU and rotary."""

from __future__ import annotations

from headway.runtime.llm.models.decoder import DecoderLayer, DecoderModel


class LlamaModel(DecoderModel):
    layer_cls = DecoderLayer
