"""Reference LoRA math for the tests, independent of the engine's loader: a Hugging Face model
with an adapter's ``scale * B @ A`` merged into its weights (what ``peft``'s merge_and_unload does)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file


def merge_into(model: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    conf = json.loads((adapter_dir / "adapter_config.json").read_text())
    r = conf["r"]
    scale = conf["lora_alpha"] / (math.sqrt(r) if conf.get("use_rslora") else r)
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    with torch.no_grad():
        for key, a in tensors.items():
            if ".lora_A." not in key:
                continue
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            lin = model.get_submodule(module)
            lin.weight += scale * (b.double() @ a.double()).to(lin.weight.dtype)
    return model


def hf_model(model_dir: Path, adapter_dir: Path | None = None) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return merge_into(model, adapter_dir) if adapter_dir is not None else model


def hf_greedy(model: torch.nn.Module, prompt_ids: list[int], max_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False,
                             min_new_tokens=max_tokens, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()
