"""Model configuration: owns the translation of a Hugging Face ``config.json`` into one typed
``ModelConfig`` that the model code reads (Llama / SmolLM2, Qwen2 / Qwen2.5, Gemma 3 text).

Both config styles are accepted: transformers 5 (``rope_parameters``, ``layer_types``) and
older files (``rope_theta`` / ``rope_scaling``, ``rope_local_base_freq``,
``sliding_window_pattern``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Gemma3ForCausalLM": "gemma3",
}
_MODEL_TYPE_TO_FAMILY = {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}
_SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    """The config names an architecture or option this engine does not implement."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters for one kind of layer."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Everything the forward pass needs to know about a decoder-only model."""

    family: str  # "llama" | "qwen2" | "gemma3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position: int
    tie_word_embeddings: bool
    activation: str  # "silu" | "gelu_pytorch_tanh"
    attention_bias: bool
    mlp_bias: bool
    attn_scale: float  # multiplies q.k
    # per layer: None for global attention, else the sliding window (keys with q - k < window)
    layer_windows: tuple[int | None, ...]
    # per layer: the rope parameters that layer uses
    layer_ropes: tuple[RopeConfig, ...]
    # Gemma specifics
    embed_scale: float | None = None  # multiply embeddings by this (sqrt(hidden) for Gemma)
    norm_offset_one: bool = False  # RMSNorm weight applied as (1 + w), computed in float32
    qk_norm: bool = False
    sandwich_norms: bool = False  # pre/post feed-forward norms + post-attention norm on the branch
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @property
    def kv_bytes_per_token(self) -> int:
        """K+V elements per token over all layers (multiply by the dtype size for bytes)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: a model directory needs a config.json")
        return cls.from_dict(json.loads(path.read_text()))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        family = _family_of(raw)
        if family == "gemma3" and "text_config" in raw:
            raw = {**raw["text_config"], "model_type": "gemma3_text"}
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        head_dim = int(raw.get("head_dim") or hidden // heads)
        n_layers = int(raw["num_hidden_layers"])
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        common: dict[str, Any] = dict(
            family=family,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=n_layers,
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position=int(raw.get("max_position_embeddings", 8192)),
            eos_token_ids=eos_ids,
        )
        layer_types = _layer_types(raw, n_layers, family)
        window = raw.get("sliding_window")
        windows = tuple(
            (int(window) if (t == "sliding_attention" and window) else None) for t in layer_types
        )
        if family == "gemma3":
            global_rope, local_rope = _gemma_ropes(raw)
            return cls(
                **common,
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
                activation=_activation(raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh"),
                attention_bias=bool(raw.get("attention_bias", False)),
                mlp_bias=False,
                attn_scale=float(raw.get("query_pre_attn_scalar", head_dim)) ** -0.5,
                layer_windows=windows,
                layer_ropes=tuple(
                    local_rope if t == "sliding_attention" else global_rope for t in layer_types
                ),
                embed_scale=math.sqrt(hidden),
                norm_offset_one=True,
                qk_norm=True,
                sandwich_norms=True,
                attn_logit_softcap=_opt_float(raw.get("attn_logit_softcapping")),
                final_logit_softcap=_opt_float(raw.get("final_logit_softcapping")),
            )
        rope = _rope_from(raw.get("rope_parameters") or raw.get("rope_scaling"), raw)
        if family == "qwen2" and not raw.get("use_sliding_window", False):
            windows = tuple(None for _ in layer_types)
        return cls(
            **common,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            activation=_activation(raw.get("hidden_act", "silu")),
            attention_bias=True if family == "qwen2" else bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            attn_scale=head_dim**-0.5,
            layer_windows=windows,
            layer_ropes=tuple(rope for _ in range(n_layers)),
        )


def _family_of(raw: dict[str, Any]) -> str:
    archs = raw.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[arch]
    model_type = raw.get("model_type")
    if not archs and model_type in _MODEL_TYPE_TO_FAMILY:
        return _MODEL_TYPE_TO_FAMILY[model_type]
    raise UnsupportedModelError(
        f"unsupported architecture {archs or model_type!r}: supported architectures are "
        f"{', '.join(SUPPORTED_ARCHITECTURES)} (model_type {', '.join(_MODEL_TYPE_TO_FAMILY)})"
    )


def _layer_types(raw: dict[str, Any], n_layers: int, family: str) -> list[str]:
    types = raw.get("layer_types")
    if types is not None:
        if len(types) != n_layers:
            raise ValueError(
                f"config layer_types has {len(types)} entries but num_hidden_layers={n_layers}"
            )
        bad = sorted({t for t in types if t not in ("full_attention", "sliding_attention")})
        if bad:
            raise UnsupportedModelError(
                f"layer_types {bad} not supported: allowed are full_attention, sliding_attention"
            )
        return list(types)
    pattern = raw.get("sliding_window_pattern") or raw.get("_sliding_window_pattern")
    if family == "gemma3" and pattern:
        p = int(pattern)
        return ["full_attention" if (i + 1) % p == 0 else "sliding_attention" for i in range(n_layers)]
    return ["full_attention"] * n_layers


def _activation(name: str | None) -> str:
    if name in ("silu", "swish"):
        return "silu"
    if name in ("gelu_pytorch_tanh", "gelu_tanh"):
        return "gelu_pytorch_tanh"
    raise UnsupportedModelError(
        f"activation {name!r} not supported: allowed are silu, gelu_pytorch_tanh"
    )


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _rope_from(params: dict[str, Any] | None, raw: dict[str, Any], default_theta: float = 10000.0) -> RopeConfig:
    params = dict(params or {})
    theta = float(params.get("rope_theta", raw.get("rope_theta", default_theta)))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in _SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope type {rope_type!r} not supported: allowed are {', '.join(_SUPPORTED_ROPE_TYPES)}"
        )
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position=int(params.get("original_max_position_embeddings", 8192)),
    )


def _gemma_ropes(raw: dict[str, Any]) -> tuple[RopeConfig, RopeConfig]:
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:
        full = _rope_from(params["full_attention"], {}, 1_000_000.0)
        local = _rope_from(params.get("sliding_attention"), {}, 10_000.0)
        return full, local
    full = _rope_from(raw.get("rope_scaling"), {"rope_theta": raw.get("rope_theta", 1_000_000.0)})
    local = RopeConfig(theta=float(raw.get("rope_local_base_freq", 10_000.0)))
    return full, local
