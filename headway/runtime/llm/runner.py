"""ModelRunner: owns the forward pass and the KV tensors of one loaded model
(docs/engine-internals.md, "The forward seam")."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from headway.runtime.llm.attention import KVCacheTensors
from headway.runtime.llm.batch import ForwardBatch
from headway.runtime.llm.config import ModelConfig
from headway.runtime.llm.models import build_model
from headway.runtime.llm.weights import WeightStore, parse_dtype

DEFAULT_KV_MEMORY_GB = 1.0


class ModelRunner:
    """Loads a Hugging Face model directory and runs ``forward(ForwardBatch)``.

    KV capacity: ``num_slots`` if given, else as many slots as fit in ``kv_memory_gb``
    (default 1 GiB), capped at 16 x ``max_position_embeddings``. ``num_layers`` keeps only the
    first layers (then the final norm and LM head): a cheap draft model for speculation.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str | torch.dtype = "float32",
        device: str | torch.device = "cpu",
        num_slots: int | None = None,
        kv_memory_gb: float | None = None,
        num_threads: int | None = None,
        quantization: str | None = None,
        num_layers: int | None = None,
    ) -> None:
        if num_threads is not None:
            if num_threads < 1:
                raise ValueError(f"num_threads must be >= 1, got {num_threads}")
            torch.set_num_threads(num_threads)
        self.model_dir = Path(model_dir)
        self.dtype = parse_dtype(dtype)
        self.device = torch.device(device)
        self.config = ModelConfig.from_model_dir(self.model_dir)
        self.quantization = None if quantization in (None, "none") else quantization
        weights = WeightStore(self.model_dir, self.dtype, self.device, self.quantization)
        if num_layers is not None:
            n = self.config.num_layers
            if not 1 <= num_layers <= n:
                raise ValueError(f"num_layers must be in [1, {n}] for {self.model_dir.name}, got {num_layers}")
            self.config = dataclasses.replace(self.config, num_layers=num_layers,
                                              layer_windows=self.config.layer_windows[:num_layers],
                                              layer_ropes=self.config.layer_ropes[:num_layers])
            weights.skip_layers_from(num_layers)
        with torch.inference_mode():
            self.model = build_model(self.config, weights)
        self.num_slots = self._slot_count(num_slots, kv_memory_gb)
        self.kv = KVCacheTensors(
            self.config.num_layers,
            self.num_slots,
            self.config.num_kv_heads,
            self.config.head_dim,
            self.dtype,
            self.device,
        )

    def _slot_count(self, num_slots: int | None, kv_memory_gb: float | None) -> int:
        if num_slots is not None:
            if num_slots < 1:
                raise ValueError(f"num_slots must be >= 1, got {num_slots}")
            return int(num_slots)
        gb = DEFAULT_KV_MEMORY_GB if kv_memory_gb is None else kv_memory_gb
        if gb <= 0:
            raise ValueError(f"kv_memory_gb must be > 0, got {kv_memory_gb}")
        per_slot = self.config.kv_bytes_per_token * torch.finfo(self.dtype).bits // 8
        slots = int(gb * (1 << 30)) // per_slot
        if slots < 1:
            raise ValueError(f"kv_memory_gb={gb} holds no KV slot ({per_slot} bytes per slot)")
        return min(slots, 16 * self.config.max_position)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Write the batch's K/V into its slots and return float32 logits ``[N, vocab]``."""
        batch.validate(self.num_slots)
        with torch.inference_mode():
            return self.model.forward(batch, self.kv)
