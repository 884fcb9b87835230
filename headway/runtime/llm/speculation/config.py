"""The engine's speculative-decoding settings (``engine.speculative`` in headway.yaml)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

# Measured (docs/benchmarks.md, "Speculative decoding"): on 2 CPU cores n-gram speculation
# paid at every batch measured, up to 64 (2.92x; 64 = the default max_running); lower it where
# extra verify rows cost more than they save (a GPU at large batch).
DEFAULT_MAX_BATCH = 64


@dataclass(frozen=True)
class SpeculativeConfig:
    """How the engine proposes tokens for one target forward to verify.

    ``method``: ``ngram`` (prompt lookup in the request's own prompt + output) or ``draft`` (a
    smaller model with the same tokenizer: ``draft_model_dir``, optionally cut to its first
    ``draft_layers`` layers; with no ``draft_model_dir`` the target itself, cut, is the draft).
    ``num_tokens``: most tokens proposed per step (the live length adapts below it).
    ``max_batch``: speculation is off in steps with more running sequences than this."""

    method: Literal["ngram", "draft"] = "ngram"
    num_tokens: int = 8
    ngram_min: int = 2
    ngram_max: int = 4
    draft_model_dir: Path | None = None
    draft_layers: int | None = None
    max_batch: int = DEFAULT_MAX_BATCH

    def __post_init__(self) -> None:
        errs: list[str] = []
        if self.method not in ("ngram", "draft"):
            errs.append(f"method must be 'ngram' or 'draft', got {self.method!r}")
        if not 1 <= self.num_tokens <= 32:
            errs.append(f"num_tokens must be in [1, 32], got {self.num_tokens}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            errs.append(f"need 1 <= ngram_min <= ngram_max, got ngram_min={self.ngram_min}, "
                        f"ngram_max={self.ngram_max}")
        if self.draft_layers is not None and self.draft_layers < 1:
            errs.append(f"draft_layers must be >= 1, got {self.draft_layers}")
        if self.method == "draft" and self.draft_model_dir is None and self.draft_layers is None:
            errs.append("method 'draft' needs draft_model (a smaller model with the same tokenizer, e.g. "
                        "qwen2.5-coder-0.5b-instruct) or draft_layers (the target cut to its first N layers)")
        if self.max_batch < 1:
            errs.append(f"max_batch must be >= 1, got {self.max_batch}")
        if errs:
            raise ValueError("invalid speculative config: " + "; ".join(errs))

    def describe(self) -> str:
        limits = f"up to {self.num_tokens} tokens, batch <= {self.max_batch}"
        if self.method == "ngram":
            return f"ngram (n={self.ngram_min}..{self.ngram_max}, {limits})"
        d = self.draft_model_dir  # a library model's directory is .../<entry>-<hash>/model
        src = "target" if d is None else (d.parent.name if d.name == "model" else d.name)
        layers = f", first {self.draft_layers} layers" if self.draft_layers else ""
        return f"draft ({src}{layers}, {limits})"
