"""Qwen2 family (Qwen2.5, Qwen2.5-Coder): Llama's block with q/k/v biases (no o_proj bias);
tied embeddings for the small sizes come from ``tie_word_embeddings`` in config.json."""

from __future__ import annotations

from headway.runtime.llm.config import ModelConfig
from headway.runtime.llm.models.decoder import DecoderLayer, DecoderModel
from headway.runtime.llm.weights import WeightStore


class Qwen2Model(DecoderModel):
    layer_cls = DecoderLayer

    def __init__(self, cfg: ModelConfig, w: WeightStore) -> None:
        if not cfg.attention_bias:
            raise ValueError("Qwen2 config must have q/k/v projection biases (attention_bias)")
        super().__init__(cfg, w)
