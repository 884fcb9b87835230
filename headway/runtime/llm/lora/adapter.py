"""Reading a PEFT LoRA directory into the engine's fused layout (``LoraWeights``).

A PEFT LoRA directory holds ``adapter_config.json`` (``r``, ``lora_alpha``, ``target_modules``,
optionally ``use_rslora``) and ``adapter_model.safetensors`` with tensors named like
``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`` (``[r, in]``) and
``...lora_B.weight`` (``[out, r]``). The delta of a module is ``x @ A.T @ B.T * scale`` with
``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rslora).

The engine fuses q/k/v and gate/up into one matmul, so the adapter is laid out the same way at
load: per layer and fused module, ``a`` is ``[in, parts * r]`` (the parts' A matrices side by
side, transposed) and ``bs[i]`` is part i's ``B.T * scale`` (``[r, out_i]``), which adds to the
columns of the fused output that part owns. A targeted module missing from a layer, or a part
not targeted, is zeros.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from headway.runtime.llm.config import ModelConfig

# fused module -> its parts, in the order the engine concatenates them
FUSED: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
PART_OF = {p: (kind, i) for kind, parts in FUSED.items() for i, p in enumerate(parts)}
KNOWN_MODULES = tuple(PART_OF)
_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[A-Za-z_]\w*)?\.weight$")
_UNSUPPORTED_FLAGS = {"use_dora": "DoRA adapters", "fan_in_fan_out": "fan_in_fan_out (Conv1D) adapters"}


class AdapterError(ValueError):
    """A LoRA adapter request that cannot be served; ``status`` is the HTTP status it maps to."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def part_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every LoRA-targetable projection of ``cfg``."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    h, inter = cfg.hidden_size, cfg.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


@dataclass
class LoraWeights:
    """One adapter in the fused layout: ``modules[kind][layer] = (a [in, parts*r], [b_i [r, out_i]])``
    for every fused module kind it targets (all layers present; zeros where PEFT had none)."""

    name: str
    path: Path
    rank: int
    scale: float
    modules: dict[str, list[tuple[torch.Tensor, list[torch.Tensor]]]]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layers in self.modules.values() for a, bs in layers
                   for t in (a, *bs))


def _config(path: Path) -> dict[str, Any]:
    f = path / "adapter_config.json"
    if not f.is_file():
        raise AdapterError(f"{path}: no adapter_config.json; a LoRA adapter is a PEFT directory with "
                           "adapter_config.json and adapter_model.safetensors")
    try:
        cfg = json.loads(f.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{f}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{f}: expected a JSON object")
    peft_type = cfg.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise AdapterError(f"{f}: peft_type is {peft_type!r}; only LORA adapters are supported")
    for key, what in _UNSUPPORTED_FLAGS.items():
        if cfg.get(key):
            raise AdapterError(f"{f}: {what} are not supported ({key}: true); use a plain LoRA adapter")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{f}: bias={cfg['bias']!r} is not supported; allowed is 'none'")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"{f}: modules_to_save {cfg['modules_to_save']} is not supported; only LoRA "
                           f"deltas on {', '.join(KNOWN_MODULES)}")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise AdapterError(f"{f}: {key} is not supported; every module must share r and lora_alpha")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterError(f"{f}: r must be an int >= 1, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise AdapterError(f"{f}: lora_alpha must be a number, got {alpha!r}")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        unknown = sorted(set(map(str, targets)) - set(KNOWN_MODULES))
        if unknown:
            raise AdapterError(f"{f}: target_modules {unknown} are not supported; allowed are "
                               f"{', '.join(KNOWN_MODULES)}")
    return cfg


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    st = path / "adapter_model.safetensors"
    if not st.is_file():
        if (path / "adapter_model.bin").is_file():
            raise AdapterError(f"{path / 'adapter_model.bin'}: pickle (.bin) adapters are refused (loading "
                               "them can run arbitrary code); save it as adapter_model.safetensors "
                               "(PEFT: save_pretrained(..., safe_serialization=True))")
        raise AdapterError(f"{path}: no adapter_model.safetensors")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(st))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{st}: cannot be read as safetensors ({exc})") from None


def load_adapter(name: str, path: str | Path, cfg: ModelConfig, *, max_rank: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> LoraWeights:
    """Read and validate the PEFT directory ``path`` against the base model ``cfg``; raises
    ``AdapterError`` naming the file and what is wrong."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise AdapterError(f"{path}: not a directory; a LoRA adapter is a PEFT directory with "
                           "adapter_config.json and adapter_model.safetensors")
    conf = _config(path)
    r = int(conf["r"])
    if r > max_rank:
        raise AdapterError(f"{path}: rank r={r} exceeds max_lora_rank={max_rank}; raise max_lora_rank or "
                           "use a smaller adapter")
    scale = float(conf.get("lora_alpha", r)) / (math.sqrt(r) if conf.get("use_rslora") else r)
    st = path / "adapter_model.safetensors"
    shapes = part_shapes(cfg)
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in _tensors(path).items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"{st}: tensor {key!r} is not a LoRA A/B weight of a decoder layer projection; "
                               f"supported are lora_A/lora_B of {', '.join(KNOWN_MODULES)}")
        layer, module, which = int(m.group(1)), m.group(2), m.group(3)
        if module not in PART_OF:
            raise AdapterError(f"{st}: tensor {key!r} targets {module!r}; supported are {', '.join(KNOWN_MODULES)}")
        if layer >= cfg.num_layers:
            raise AdapterError(f"{st}: tensor {key!r} is for layer {layer} but the base model has "
                               f"{cfg.num_layers} layers (0..{cfg.num_layers - 1})")
        fin, fout = shapes[module]
        want = (r, fin) if which == "A" else (fout, r)
        if tuple(t.shape) != want:
            raise AdapterError(f"{st}: tensor {key!r} has shape {tuple(t.shape)}, expected {want} "
                               f"(r={r}; the base model's {module} is {fin} -> {fout}); is the adapter for "
                               "another base model?")
        found.setdefault((layer, module), {})[which] = t
    if not found:
        raise AdapterError(f"{st}: holds no LoRA weights")
    for (layer, module), ab in found.items():
        if len(ab) != 2:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise AdapterError(f"{st}: layer {layer} {module} has no {missing} weight")
    kinds = sorted({PART_OF[m][0] for _, m in found}, key=list(FUSED).index)
    modules: dict[str, list[tuple[torch.Tensor, list[torch.Tensor]]]] = {}
    for kind in kinds:
        parts = FUSED[kind]
        fin = shapes[parts[0]][0]
        layers = []
        for layer in range(cfg.num_layers):
            a = torch.zeros(fin, len(parts) * r, dtype=torch.float32)
            bs = []
            for i, p in enumerate(parts):
                b = torch.zeros(r, shapes[p][1], dtype=torch.float32)
                pair = found.get((layer, p))
                if pair is not None:
                    a[:, i * r:(i + 1) * r] = pair["A"].float().t()
                    b[:] = pair["B"].float().t() * scale
                bs.append(b.to(device=device, dtype=dtype).contiguous())
            layers.append((a.to(device=device, dtype=dtype).contiguous(), bs))
        modules[kind] = layers
    return LoraWeights(name, path, r, scale, modules)
