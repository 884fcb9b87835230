"""Layers shared by every decoder family: RMSNorm, rotary tables, fused MLP, fused QKV.

Layers are plain classes over tensors (no ``nn.Module``): the forward pass is inference-only and
module ``__call__`` hooks are per-layer Python overhead we do not want on the decode hot path.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from headway.runtime.llm.config import RopeConfig


class RMSNorm:
    """RMSNorm over the last dim.

    ``offset_one`` (Gemma): ``x_f32 * rsqrt(mean(x^2) + eps) * (1 + w)`` in float32, then cast.
    Otherwise (Llama/Qwen2): normalise in float32, cast to the input dtype, then ``* w``.
    """

    def __init__(self, weight: torch.Tensor, eps: float, *, offset_one: bool = False) -> None:
        self.offset_one = offset_one
        self.eps = eps
        self.weight = (1.0 + weight.float()) if offset_one else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused kernel, same math as below for float32 input
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset_one:
            return (normed * self.weight).to(x.dtype)
        return self.weight * normed.to(x.dtype)


def _inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.rope_type == "linear":
        return inv / rope.factor
    if rope.rope_type == "llama3":
        low_wavelen = rope.original_max_position / rope.low_freq_factor
        high_wavelen = rope.original_max_position / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv


class RotaryTable:
    """Precomputed cos/sin ``[max_pos, head_dim]`` (HF rotate-half layout), grown on demand.

    ``lookup(positions)`` is called once per forward per distinct rope config; every layer using
    that config reuses the gathered result.
    """

    def __init__(self, rope: RopeConfig, head_dim: int, max_position: int, device: torch.device) -> None:
        self.inv_freq = _inv_freq(rope, head_dim).to(device)
        self.max_position = max_position
        self.device = device
        self.cos = torch.empty(0, head_dim, device=device)
        self.sin = torch.empty(0, head_dim, device=device)
        self._grow(min(max_position, 4096))

    def _grow(self, n: int) -> None:
        t = torch.arange(n, device=self.device, dtype=torch.int64).float()
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()

    def lookup(self, positions: torch.Tensor, max_pos: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape ``[T, 1, head_dim]`` in ``dtype`` for ``positions`` (max ``max_pos``)."""
        if max_pos >= self.cos.shape[0]:
            if max_pos >= self.max_position:
                raise ValueError(
                    f"position {max_pos} exceeds the model's max_position_embeddings "
                    f"({self.max_position})"
                )
            self._grow(min(self.max_position, max(2 * self.cos.shape[0], max_pos + 1)))
        cos = self.cos.index_select(0, positions).to(dtype).unsqueeze(1)
        sin = self.sin.index_select(0, positions).to(dtype).unsqueeze(1)
        return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: ``[T, H, D]``; cos/sin: ``[T, 1, D]``. HF's ``x*cos + rotate_half(x)*sin``."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name == "silu":
        return F.silu
    if name == "gelu_pytorch_tanh":
        return lambda t: F.gelu(t, approximate="tanh")
    raise ValueError(f"activation {name!r} not supported: allowed are silu, gelu_pytorch_tanh")


FP8_MAX = 448.0   # largest finite float8_e4m3fn


def fp8_matmul_available(device: torch.device) -> bool:
    """fp8 tensor-core matmuls: CUDA compute capability 8.9 (Ada) or 9.0+ (Hopper)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Linear:
    """``x @ W.T + b`` with the weight laid out for the fastest CPU kernel of its dtype.

    float32 weights are stored transposed (``[in, out]`` contiguous): MKL's sgemm on the
    transposed layout is 1.2-2.3x faster for the small row counts of decode batches (measured
    at M=8..32, K=576). bfloat16 keeps the ``[out, in]`` layout that oneDNN/AMX prefers.

    With ``quantize="int8"`` the weight is stored as int8 with one float scale per output
    channel (symmetric, round to nearest: ``W ~= q * scale``, ``|q| <= 127``) and multiplied
    by the int8 kernel on the CPU for 16-bit activations (``aten._weight_int8pack_mm``), by a
    matmul on the weight converted per call otherwise. Activations and outputs keep the run dtype.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, quantize: str | None = None) -> None:
        if quantize not in (None, "none", "int8", "fp8"):
            raise ValueError(f"quantization {quantize!r} is not supported: allowed are none, int8, fp8")
        self.bias = bias
        self.out_features = weight.shape[0]
        self.quantized = quantize == "int8"
        self.fp8 = quantize == "fp8"
        self.transposed = False
        if self.fp8:
            self._init_fp8(weight)
            return
        if self.quantized:
            w = weight.float()
            scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
            self.weight = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
            self.scales = scales.to(weight.dtype)
            # the CPU int8 kernel is fast for 16-bit activations; with float32 ones it ran 25-35x
            # slower than converting the weight per call (measured: 10.8 vs 0.44 ms at 32x576x1536)
            self.int8_kernel = weight.device.type == "cpu" and weight.dtype != torch.float32
            return
        self.transposed = weight.dtype == torch.float32
        self.weight = weight.t().contiguous() if self.transposed else weight

    def _init_fp8(self, weight: torch.Tensor) -> None:
        """fp8 (e4m3) weight with one float32 scale per output channel (``W ~= q * scale``,
        ``|q| <= 448``). On a GPU with fp8 matmuls (compute capability 8.9+: Ada, Hopper) the
        activations are quantized per row on the fly and multiplied by ``torch._scaled_mm``;
        anywhere else the weight is converted per call (memory saved, no speed-up)."""
        w = weight.float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
        self.weight = (w / scales[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).contiguous()
        self.scales = scales.to(weight.dtype)
        self.fp8_scales = scales[None, :].contiguous()          # float32 [1, out] for _scaled_mm
        self.fp8_kernel = fp8_matmul_available(weight.device)

    def _fp8(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if self.fp8_kernel and x2.dtype in (torch.bfloat16, torch.float16):
            xs = x2.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
            xq = (x2.float() / xs).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=xs, scale_b=self.fp8_scales, out_dtype=x2.dtype)
        else:
            y = F.linear(x2, self.weight.to(x2.dtype)) * self.scales.to(x2.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    @property
    def nbytes(self) -> int:
        extra = self.scales.numel() * self.scales.element_size() if self.quantized or self.fp8 else 0
        bias = self.bias.numel() * self.bias.element_size() if self.bias is not None else 0
        return self.weight.numel() * self.weight.element_size() + extra + bias

    def _int8(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if self.int8_kernel:
            y: torch.Tensor = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight, self.scales)
        else:
            y = F.linear(x2, self.weight.to(x.dtype)) * self.scales
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized:
            return self._int8(x)
        if self.fp8:
            return self._fp8(x)
        if not self.transposed:
            return F.linear(x, self.weight, self.bias)
        if self.bias is None:
            return torch.matmul(x, self.weight)
        return torch.addmm(self.bias, x, self.weight)


class GatedMLP:
    """``down(act(gate(x)) * up(x))`` with gate and up fused into one matmul at load."""

    def __init__(
        self,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        activation: str,
        gate_up_bias: torch.Tensor | None = None,
        down_bias: torch.Tensor | None = None,
        quantize: str | None = None,
    ) -> None:
        self.gate_up = Linear(gate_up, gate_up_bias, quantize)
        self.down = Linear(down, down_bias, quantize)
        self.inter = down.shape[1]
        self.act = activation_fn(activation)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = torch.split(self.gate_up(x), self.inter, dim=-1)
        return self.down(self.act(gate) * up)
