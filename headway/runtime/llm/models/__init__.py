"""Model code per architecture family; ``build_model`` picks the class for a config."""

from __future__ import annotations

from headway.runtime.llm.config import ModelConfig
from headway.runtime.llm.models.decoder import DecoderModel
from headway.runtime.llm.weights import WeightStore


def build_model(cfg: ModelConfig, weights: WeightStore) -> DecoderModel:
    """Construct the model for ``cfg.family`` from ``weights``; every tensor must be used."""
    from headway.runtime.llm.models.gemma3 import Gemma3Model
    from headway.runtime.llm.models.llama import LlamaModel
    from headway.runtime.llm.models.qwen2 import Qwen2Model

    classes: dict[str, type[DecoderModel]] = {"llama": LlamaModel, "qwen2": Qwen2Model, "gemma3": Gemma3Model}
    if cfg.family not in classes:
        raise ValueError(f"no model code for family {cfg.family!r}: have {', '.join(classes)}")
    model = classes[cfg.family](cfg, weights)
    weights.finish()
    return model
