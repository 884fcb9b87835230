"""Compute roofline for decode: measured matmul FLOP/s at the engine's GEMM shapes.

Owns (1) the list of GEMMs one decoder layer and the LM head run for a batch of ``M`` tokens,
(2) timing ``torch.matmul`` of ``[M, K] x [K, N]`` at those shapes on a device, and (3) turning a
measured decode throughput (tokens/s) into a fraction of that measured roofline, given the
model's FLOPs per token.

The roofline here is the *achieved* matmul rate at the engine's own shapes (small ``M`` makes
decode GEMMs memory-bound, so this is far below the chip's peak); a fraction near 1 means the
engine spends its time in useful matmuls at the speed the hardware gives them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DecoderShape:
    """The sizes that set a Llama-style decoder's matmuls."""

    hidden: int
    intermediate: int
    vocab: int
    n_heads: int
    head_dim: int
    n_kv_heads: int
    n_layers: int

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")


    @classmethod
    def from_hf_config(cls, config: object) -> DecoderShape:
        """From a Llama-style config (``hidden_size``, ``num_attention_heads``, ...): a transformers
        config object or the dict of a config.json."""
        def get(name: str, required: bool = True) -> int | None:
            value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
            if value is None and required:
                raise ValueError(f"config {type(config).__name__} has no {name!r}; a Llama-style decoder config is needed")
            return None if value is None else int(value)

        n_heads, hidden = get("num_attention_heads"), get("hidden_size")
        assert n_heads is not None and hidden is not None
        return cls(hidden=hidden, intermediate=get("intermediate_size") or 0, vocab=get("vocab_size") or 0,
                   n_heads=n_heads, head_dim=get("head_dim", False) or hidden // n_heads,
                   n_kv_heads=get("num_key_value_heads", False) or n_heads, n_layers=get("num_hidden_layers") or 0)


SMOLLM2_135M = DecoderShape(hidden=576, intermediate=1536, vocab=49152, n_heads=9, head_dim=64,
                            n_kv_heads=3, n_layers=30)


@dataclass(frozen=True)
class Gemm:
    """One ``[M, K] x [K, N]`` matmul, run ``count`` times per forward pass."""

    name: str
    m: int
    k: int
    n: int
    count: int = 1

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n * self.count


@dataclass(frozen=True)
class GemmTiming:
    gemm: Gemm
    seconds: float  # per single matmul (median of the timed repeats)

    @property
    def flops_per_s(self) -> float:
        return 2 * self.gemm.m * self.gemm.k * self.gemm.n / self.seconds


def decoder_gemms(shape: DecoderShape, batch: int) -> list[Gemm]:
    """The weight GEMMs of one decode step for ``batch`` sequences (attention scores excluded)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    h, q, kv, L = shape.hidden, shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim, shape.n_layers
    return [
        Gemm("q_proj", batch, h, q, L),
        Gemm("kv_proj", batch, h, 2 * kv, L),
        Gemm("o_proj", batch, q, h, L),
        Gemm("gate_up_proj", batch, h, 2 * shape.intermediate, L),
        Gemm("down_proj", batch, shape.intermediate, h, L),
        Gemm("lm_head", batch, h, shape.vocab, 1),
    ]


def flops_per_token(shape: DecoderShape, context: int = 0) -> float:
    """Forward FLOPs for one decoded token: weight GEMMs plus attention over ``context`` tokens."""
    weights = sum(g.flops for g in decoder_gemms(shape, 1))
    attention = 2 * 2 * shape.n_heads * shape.head_dim * context * shape.n_layers  # QK^T and PV
    return float(weights + attention)


def time_gemm(gemm: Gemm, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              repeats: int = 5, min_time_s: float = 0.02, max_iters: int = 10_000) -> GemmTiming:
    """Median time of one ``torch.matmul`` at ``gemm``'s shape (batched until ``min_time_s``)."""
    dev = torch.device(device)
    a = torch.randn(gemm.m, gemm.k, device=dev, dtype=dtype)
    b = torch.randn(gemm.k, gemm.n, device=dev, dtype=dtype)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    torch.matmul(a, b)  # warm-up
    sync()
    iters = 1
    while True:  # find an iteration count that runs at least min_time_s (bounded)
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b)
        sync()
        if time.perf_counter() - t0 >= min_time_s or iters >= max_iters:
            break
        iters = min(iters * 4, max_iters)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b)
        sync()
        samples.append((time.perf_counter() - t0) / iters)
    samples.sort()
    return GemmTiming(gemm=gemm, seconds=samples[len(samples) // 2])


@dataclass(frozen=True)
class Roofline:
    """Measured decode-step matmul time for a model at one batch size."""

    shape: DecoderShape
    batch: int
    timings: tuple[GemmTiming, ...]

    @property
    def step_seconds(self) -> float:
        """Time of all weight GEMMs of one decode step, each run ``count`` times."""
        return sum(t.seconds * t.gemm.count for t in self.timings)

    @property
    def flops_per_s(self) -> float:
        """Achieved matmul FLOP/s over the whole decode step."""
        return sum(t.gemm.flops for t in self.timings) / self.step_seconds

    @property
    def tokens_per_s(self) -> float:
        """Decode tokens/s if the step were nothing but these GEMMs."""
        return self.batch / self.step_seconds


def measure_roofline(shape: DecoderShape, batch: int, *, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32, repeats: int = 5) -> Roofline:
    """Time every decode GEMM of ``shape`` at batch ``batch``."""
    timings = tuple(time_gemm(g, device=device, dtype=dtype, repeats=repeats) for g in decoder_gemms(shape, batch))
    return Roofline(shape=shape, batch=batch, timings=timings)


def roofline_fraction(decode_tokens_per_s: float, flops_per_tok: float, roofline_flops_per_s: float) -> float:
    """Share of the measured roofline a decode throughput achieves: (tok/s * FLOPs/tok) / FLOP/s."""
    if decode_tokens_per_s < 0 or flops_per_tok <= 0 or roofline_flops_per_s <= 0:
        raise ValueError("need decode_tokens_per_s >= 0, flops_per_tok > 0 and roofline_flops_per_s > 0; got "
                         f"{decode_tokens_per_s}, {flops_per_tok}, {roofline_flops_per_s}")
    return decode_tokens_per_s * flops_per_tok / roofline_flops_per_s


def decode_roofline_report(shape: DecoderShape, batch: int, decode_tokens_per_s: float, *, context: int = 0,
                           device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Measure the roofline at ``batch`` and place ``decode_tokens_per_s`` on it (JSON-ready)."""
    roof = measure_roofline(shape, batch, device=device, dtype=dtype)
    fpt = flops_per_token(shape, context)
    return {"batch": float(batch), "context": float(context), "flops_per_token": fpt,
            "roofline_flops_per_s": roof.flops_per_s, "roofline_tokens_per_s": roof.flops_per_s / fpt,
            "decode_tokens_per_s": decode_tokens_per_s,
            "fraction": roofline_fraction(decode_tokens_per_s, fpt, roof.flops_per_s)}
