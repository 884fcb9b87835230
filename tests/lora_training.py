"""Training a LoRA adapter for a few steps with torch autograd on the Hugging Face model (no
``peft``): the LoRA parameters ride on forward hooks of the targeted ``nn.Linear`` modules, and
the result is saved as a PEFT directory."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from headway.runtime.llm.lora.peft import peft_key, save_peft_adapter

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def train_adapter(model_dir: Path, out: Path, text_ids: list[int], *, r: int = 8, alpha: float = 16,
                  lr: float = 3e-3, max_steps: int = 40, target_loss: float = 0.05, max_s: float = 120) -> dict:
    """Fit a LoRA to ``text_ids`` (next-token loss) for at most ``max_steps`` steps / ``max_s``
    seconds, stopping once the loss is under ``target_loss``; returns {"steps", "loss"}."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.requires_grad_(False)
    scale = alpha / r
    params: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(model.model.layers):
        for name in TARGETS:
            lin = layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
            lin = getattr(lin, name)
            a = (torch.randn(r, lin.in_features) / lin.in_features ** 0.5).requires_grad_()
            b = torch.zeros(lin.out_features, r, requires_grad=True)  # PEFT's init: the adapter starts as a no-op
            params[peft_key(i, name, "A")], params[peft_key(i, name, "B")] = a, b
            lin.register_forward_hook(lambda m, inp, y, a=a, b=b: y + (inp[0] @ a.t() @ b.t()) * scale)
    opt = torch.optim.Adam(params.values(), lr=lr)
    ids = torch.tensor([text_ids])
    started, loss, step = time.monotonic(), float("inf"), 0
    while step < max_steps and loss > target_loss and time.monotonic() - started < max_s:
        res = model(ids, labels=ids)
        opt.zero_grad()
        res.loss.backward()
        opt.step()
        loss, step = float(res.loss.detach()), step + 1
    save_peft_adapter(out, params, r=r, lora_alpha=alpha, target_modules=TARGETS, base_model=str(model_dir))
    return {"steps": step, "loss": loss}
