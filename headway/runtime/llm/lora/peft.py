"""Writing PEFT LoRA directories (what ``peft``'s ``save_pretrained`` writes): used by the
benchmark and the tests to make adapters, random or trained, that the loader reads like any
PEFT output."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from headway.runtime.llm.config import ModelConfig
from headway.runtime.llm.lora.adapter import KNOWN_MODULES, part_shapes


def peft_key(layer: int, module: str, which: str) -> str:
    """PEFT's saved tensor name, e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``."""
    block = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return f"base_model.model.model.layers.{layer}.{block}.{module}.lora_{which}.weight"


def save_peft_adapter(path: str | Path, tensors: Mapping[str, torch.Tensor], *, r: int, lora_alpha: float,
                      target_modules: Sequence[str], base_model: str = "", use_rslora: bool = False) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": lora_alpha,
              "target_modules": list(target_modules), "lora_dropout": 0.0, "bias": "none",
              "use_rslora": use_rslora, "use_dora": False, "fan_in_fan_out": False,
              "base_model_name_or_path": base_model, "inference_mode": True}
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.detach().float().contiguous() for k, v in tensors.items()},
              str(path / "adapter_model.safetensors"))
    return path


def random_adapter(path: str | Path, cfg: ModelConfig, *, r: int = 8, lora_alpha: float = 16,
                   target_modules: Sequence[str] = KNOWN_MODULES, seed: int = 0, std: float = 0.02) -> Path:
    """A PEFT adapter with random A and B (PEFT initialises B to zero; a random B makes the
    adapter change the output)."""
    g = torch.Generator().manual_seed(seed)
    shapes = part_shapes(cfg)
    tensors = {}
    for layer in range(cfg.num_layers):
        for m in target_modules:
            fin, fout = shapes[m]
            tensors[peft_key(layer, m, "A")] = torch.randn(r, fin, generator=g) / fin ** 0.5
            tensors[peft_key(layer, m, "B")] = torch.randn(fout, r, generator=g) * std
    return save_peft_adapter(path, tensors, r=r, lora_alpha=lora_alpha, target_modules=target_modules)
