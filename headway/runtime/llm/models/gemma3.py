"""Gemma 3 text (``Gemma3ForCausalLM``): sandwich norms, q/k RMSNorm, (1+w) norms in float32,
sqrt(hidden)-scaled embeddings, local/global rope and sliding-window layers (from the config's
``layer_windows`` / ``layer_ropes``), GELU-tanh MLP, optional logit softcaps."""

from __future__ import annotations

import torch

from headway.runtime.llm.attention import AttentionMetadata, KVCacheTensors
from headway.runtime.llm.models.decoder import DecoderLayer, DecoderModel
from headway.runtime.llm.weights import WeightStore


class Gemma3Layer(DecoderLayer):
    def load_norms(self, w: WeightStore, p: str) -> None:
        self.input_norm = self.norm(w, p + "input_layernorm.weight")
        self.post_attn_norm = self.norm(w, p + "post_attention_layernorm.weight")
        self.pre_ff_norm = self.norm(w, p + "pre_feedforward_layernorm.weight")
        self.post_ff_norm = self.norm(w, p + "post_feedforward_layernorm.weight")
        self.q_norm = self.norm(w, p + "self_attn.q_norm.weight")
        self.k_norm = self.norm(w, p + "self_attn.k_norm.weight")

    def qk_transform(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_norm(q), self.k_norm(k)

    def forward(
        self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv: KVCacheTensors, meta: AttentionMetadata
    ) -> torch.Tensor:
        h = h + self.post_attn_norm(self.attention(self.input_norm(h), rope, kv, meta))
        return h + self.post_ff_norm(self.mlp(self.pre_ff_norm(h)))


class Gemma3Model(DecoderModel):
    layer_cls = Gemma3Layer
