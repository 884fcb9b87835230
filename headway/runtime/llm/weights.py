"""Weight loading: owns reading ``*.safetensors`` from a model directory (mmap'd via
``safe_open``), casting to the run dtype/device, and checking that every tensor is used.

Model code asks for tensors by Hugging Face name with ``WeightStore.take``; ``finish`` raises if
any checkpoint tensor was never taken (unexpected), ``take`` raises if one is missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# buffers some exporters write that carry no learned weights
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class _SafetensorsFile(Protocol):
    """What we use of a ``safe_open`` handle (safetensors' own stub leaves these unannotated)."""

    def keys(self) -> list[str]: ...
    def get_tensor(self, name: str) -> torch.Tensor: ...


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
        raise ValueError(f"dtype {dtype} not supported: allowed are {', '.join(_DTYPES)}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} not supported: allowed are {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


class WeightStore:
    """Lazy view over every tensor in a model directory's safetensors files."""

    def __init__(self, model_dir: str | Path, dtype: torch.dtype, device: torch.device,
                 quantization: str | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.quantization = quantization  # for the decoder layers' linear weights (embeddings, LM head: never)
        files = sorted(self.model_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(
                f"no *.safetensors files in {self.model_dir}: a model directory needs its "
                "weights as safetensors (convert GGUF/bin checkpoints first)"
            )
        self.dtype = dtype
        self.device = device
        self._handles: list[_SafetensorsFile] = [safe_open(str(f), framework="pt", device="cpu") for f in files]
        self._where: dict[str, int] = {}
        for i, h in enumerate(self._handles):
            for name in h.keys():
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                if name in self._where:
                    raise ValueError(f"tensor {name!r} appears in more than one safetensors file")
                self._where[name] = i
        self._taken: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def take(self, name: str, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor ``name`` cast to the run dtype (or ``dtype``) on the run device."""
        if name not in self._where:
            raise KeyError(
                f"checkpoint in {self.model_dir} is missing tensor {name!r} "
                f"(has {len(self._where)} tensors, e.g. {sorted(self._where)[:3]})"
            )
        self._taken.add(name)
        t = self._handles[self._where[name]].get_tensor(name)
        return t.to(device=self.device, dtype=dtype or self.dtype).contiguous()

    def skip(self, name: str) -> None:
        """Mark ``name`` as deliberately unused (e.g. ``lm_head.weight`` of a tied model)."""
        self._taken.add(name)

    def skip_layers_from(self, n: int) -> None:
        """Mark the tensors of decoder layers ``n`` and up as deliberately unused (a model cut
        to its first ``n`` layers)."""
        for name in self._where:
            parts = name.split(".")
            if name.startswith("model.layers.") and len(parts) > 2 and parts[2].isdigit() and int(parts[2]) >= n:
                self._taken.add(name)

    def finish(self) -> None:
        """Raise if the checkpoint has tensors the model did not use."""
        unexpected = sorted(set(self._where) - self._taken)
        if unexpected:
            raise ValueError(
                f"checkpoint in {self.model_dir} has {len(unexpected)} unexpected tensor(s) the "
                f"model does not use: {unexpected[:8]}"
            )
