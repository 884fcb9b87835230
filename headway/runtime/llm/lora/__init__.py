"""Multi-LoRA serving: PEFT adapters read into the fused layout (``adapter``), applied per row
inside the forward pass (``linear``), kept resident under an LRU with a memory cap (``cache``)."""

from headway.runtime.llm.lora.adapter import AdapterError, LoraWeights, load_adapter
from headway.runtime.llm.lora.cache import AdapterCache, Registration

__all__ = ["AdapterCache", "AdapterError", "LoraWeights", "Registration", "load_adapter"]
