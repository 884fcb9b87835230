"""The model package schema: what `headway.yaml` may say.

Owns the shape of a package's configuration. Loading and error messages live in `load.py`;
per-runtime engine options are validated here so a bad option fails before anything loads.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Runtime = Literal["custom", "llm", "embeddings", "asr", "tts"]
RUNTIMES: tuple[str, ...] = ("custom", "llm", "embeddings", "asr", "tts")

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_ACCEL_RE = re.compile(r"^[A-Za-z0-9_-]+:[1-9][0-9]*$")
_MEM_RE = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$")
_SIZE_RE = re.compile(r"^([0-9]+)\s*(B|KB|MB|GB|KiB|MiB|GiB)?$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
               "kib": 2**10, "mib": 2**20, "gib": 2**30}
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def parse_size(value: int | str) -> int:
    """'10MB' / '512KiB' / 1048576 -> bytes."""
    if isinstance(value, int):
        return value
    m = _SIZE_RE.match(value.strip())
    if not m:
        raise ValueError(f"'{value}' is not a size; use bytes or a unit such as 10MB, 512KiB, 1GiB")
    return int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()]


class ModelSource(_Strict):
    """Where the weights come from, and which class serves them."""

    source: str | None = Field(
        None,
        description="A model-library name (see `headway library list`), a local path (relative "
        "to the package), an s3:// URL or an https:// URL. Optional for custom models.",
        examples=["smollm2-135m-instruct", "./weights", "s3://bucket/models/m", "https://host/m.gguf"],
    )
    class_name: str = Field(
        "Model", description="The class in model.py that serves a custom model.", examples=["Model"]
    )

    @field_validator("source")
    @classmethod
    def _source_shape(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.strip():
            raise ValueError("source is empty; give a library name, a path, s3:// or https:// URL")
        scheme = v.split("://", 1)[0] if "://" in v else ""
        if scheme and scheme not in ("s3", "https", "http", "file"):
            raise ValueError(f"unsupported URL scheme '{scheme}://'; use s3://, https:// or a local path")
        return v


class Resources(_Strict):
    cpu: float = Field(1.0, gt=0, description="CPU cores for one replica.", examples=[2])
    memory: str = Field("2Gi", description="Memory for one replica.", examples=["4Gi"])
    accelerator: str | None = Field(
        None, description="Accelerator kind and count, KIND:COUNT.", examples=["H100:1"]
    )

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: str) -> str:
        if not _MEM_RE.match(v):
            raise ValueError(f"'{v}' is not a memory size; use a number with Ki/Mi/Gi/Ti, e.g. 4Gi")
        return v

    @field_validator("accelerator")
    @classmethod
    def _accel(cls, v: str | None) -> str | None:
        if v is not None and not _ACCEL_RE.match(v):
            raise ValueError(f"'{v}' is not KIND:COUNT, e.g. H100:1 or A10G:2")
        return v


class RuntimeOptions(_Strict):
    predict_concurrency: int = Field(
        1, ge=1, le=4096, description="Requests run at once inside predict.", examples=[4]
    )
    queue_size: int = Field(
        64, ge=0, le=100_000,
        description="Requests allowed to wait for a predict slot; past it, 429 with Retry-After.",
        examples=[64],
    )
    max_prompts_per_request: int = Field(
        16, ge=1, le=4096, examples=[16],
        description="Prompts one /v1/completions request may carry (`prompt` as a list); more gets 400. "
        "A request takes one admission slot whatever its prompts, so this bounds its work together "
        "with n (at most 16 choices per prompt).")
    streaming_read_timeout: float = Field(
        60.0, gt=0, description="Seconds a stream may stay silent before it is ended.", examples=[60]
    )
    max_request_body: int = Field(
        10 * 10**6, description="Largest request body; larger gets 413. Bytes or e.g. 10MB.",
        examples=["10MB"],
    )

    @field_validator("max_request_body", mode="before")
    @classmethod
    def _body(cls, v: Any) -> int:
        size = parse_size(v) if isinstance(v, (int, str)) else v
        if not isinstance(size, int) or size <= 0:
            raise ValueError("max_request_body must be a positive size such as 10MB")
        return size


class SpeculativeOptions(_Strict):
    """`engine.speculative`: lossless speculative decoding (greedy output unchanged; sampling
    keeps the target's distribution exactly)."""

    method: Literal["ngram", "draft"] = Field(
        "ngram", examples=["ngram"],
        description="ngram: propose the continuation of the last n tokens' earlier occurrence in the "
        "request's own prompt+output (free; pays on input-grounded tasks such as editing a given file). "
        "draft: a smaller model with the same tokenizer proposes.")
    num_tokens: int = Field(8, ge=1, le=32, examples=[8],
                            description="Most tokens proposed per step; the live length follows acceptance.")
    ngram_min: int = Field(2, ge=1, le=16, examples=[2], description="Shortest n-gram matched (ngram).")
    ngram_max: int = Field(4, ge=1, le=16, examples=[4], description="Longest n-gram matched, tried first (ngram).")
    draft_model: str | None = Field(
        None, examples=["qwen2.5-coder-0.5b-instruct"],
        description="Draft model (draft): a library name or a local path; it must share the target's tokenizer. "
        "Left out: the target itself cut to draft_layers.")
    draft_layers: int | None = Field(None, ge=1, examples=[4],
                                     description="Keep only the draft's first N layers (draft).")
    max_batch: int = Field(64, ge=1, examples=[8],
                           description="Speculate only while at most this many sequences run (measured default).")

    @model_validator(mode="after")
    def _consistent(self) -> SpeculativeOptions:
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"ngram_min ({self.ngram_min}) must be <= ngram_max ({self.ngram_max})")
        if self.method == "draft" and self.draft_model is None and self.draft_layers is None:
            raise ValueError("method 'draft' needs draft_model (e.g. qwen2.5-coder-0.5b-instruct) or "
                             "draft_layers (e.g. 4: the target cut to its first 4 layers)")
        return self


class LLMEngineOptions(_Strict):
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Weights and KV dtype; auto picks the faster one on the device.",
        examples=["float32"],
    )
    max_model_len: int | None = Field(None, ge=16, description="Longest context (prompt + output).",
                                      examples=[4096])
    kv_cache_tokens: int | None = Field(None, ge=16, description="KV pool size in tokens.",
                                        examples=[65536])
    kv_offload_tokens: int = Field(
        0, ge=0, examples=[65536],
        description="Host-memory KV tier in tokens (0 = off): prefixes evicted from the KV pool move there "
        "and are restored on a hit instead of recomputed. Needs enable_prefix_caching.")
    max_num_batched_tokens: int = Field(512, ge=16, description="Per-step token budget.",
                                        examples=[512])
    max_running: int = Field(64, ge=1, description="Sequences in the running batch at most.",
                             examples=[64])
    enable_prefix_caching: bool = Field(True, description="Reuse KV of shared prefixes.",
                                        examples=[True])
    num_threads: int | None = Field(None, ge=1, description="CPU threads for the forward pass.",
                                    examples=[2])
    prefill_itl_factor: float = Field(
        1.5, gt=1.0, le=10.0, examples=[1.5],
        description="While streams decode, a step carrying prefill may take at most this many times a "
        "decode-only step (lower: steadier streams, slower first token for long prompts).")
    served_model_name: str | None = Field(None, description="Name clients use in `model`.",
                                          examples=["smollm2"])
    quantization: Literal["none", "int8", "fp8"] = Field(
        "none", examples=["int8"],
        description="Quantization of the decoder layers' linear weights, one scale per output channel; "
        "embeddings and LM head stay unquantized. int8: weight-only. fp8 (e4m3): fp8 matmuls with "
        "activations quantized per row on GPUs that have them (compute capability 8.9+), weight-only "
        "elsewhere (memory saved, no speed-up). Off by default; when on, the server logs it and "
        "/headway/state reports it. `headway eval ppl` measures what it costs.")
    speculative: SpeculativeOptions | None = Field(
        None, examples=[{"method": "ngram", "num_tokens": 8}],
        description="Speculative decoding (off when left out). `headway serve --speculative ngram` turns it on "
        "with the defaults; a string is shorthand for {method: ...}.")

    @field_validator("speculative", mode="before")
    @classmethod
    def _speculative_shorthand(cls, v: Any) -> Any:
        return {"method": v} if isinstance(v, str) else v

    lora_adapters: dict[str, str] = Field(
        default_factory=dict, examples=[{"sql": "adapters/sql"}],
        description="LoRA adapters served at start: name (what clients put in `model`) -> PEFT directory "
        "(adapter_config.json + adapter_model.safetensors; relative to the package). More can be loaded at "
        "run time with POST /v1/load_lora_adapter from under lora_roots.")
    lora_roots: list[str] = Field(
        default_factory=list, examples=[["/srv/adapters"]],
        description="Directories POST /v1/load_lora_adapter may load adapters from (relative to the package; "
        "symlinks and '..' are resolved first). None (the default): loading from a path at run time is refused; "
        "adapters in lora_adapters are always served.")
    max_loras: int = Field(4, ge=1, le=64, examples=[4],
                           description="LoRA adapters resident in memory at most (least recently used evicted).")
    max_lora_rank: int = Field(64, ge=1, le=512, examples=[64], description="Largest LoRA rank accepted.")
    lora_memory_mb: float = Field(512, gt=0, examples=[512],
                                  description="Memory cap for resident LoRA adapters, in MiB.")


class EmbeddingsEngineOptions(_Strict):
    """`engine:` of an embeddings package (runtime: embeddings)."""

    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", examples=["float32"], description="Weights and activations dtype; auto is float32 on CPUs.")
    max_batch_tokens: int = Field(
        1024, ge=16, examples=[1024],
        description="Token budget of one forward pass: texts from many requests are packed into it "
        "(never less than the longest input allowed).")
    urgent_tokens: int = Field(
        256, ge=0, examples=[256],
        description="A request of at most this many tokens that has not started runs between two layers of "
        "a larger pass instead of after it (0 = off).")
    max_input_tokens: int | None = Field(
        None, ge=2, examples=[256],
        description="Longest input in tokens, special tokens included; default and upper bound: the model's "
        "sentence-transformers max_seq_length (else its position table).")
    num_threads: int | None = Field(None, ge=1, examples=[2],
                                    description="CPU threads for the forward pass; default: the CPUs this process may use.")
    max_concurrency: int = Field(256, ge=1, examples=[256],
                                 description="Requests in flight a router may send this replica at once.")
    normalize: bool | None = Field(
        None, examples=[True],
        description="L2-normalize /v1/embeddings vectors; default: as the model's modules.json says (a Normalize step).")
    served_model_name: str | None = Field(None, description="Name clients use in `model`.", examples=["minilm"])


class AsrEngineOptions(_Strict):
    compute_type: str = Field("int8", examples=["int8"])
    beam_size: int = Field(5, ge=1, examples=[5], description="5 (faster-whisper's default); 1 is faster, less accurate.")
    num_threads: int | None = Field(None, ge=1, examples=[2], description="CPU threads (default: the CPU share).")
    max_batch_size: int = Field(8, ge=1, le=64, examples=[8], description="30-s chunks per model batch, across requests.")
    max_concurrency: int = Field(16, ge=1, examples=[16], description="Requests decoded at once (more wait in the queue).")
    max_audio_seconds: float = Field(7200, gt=0, examples=[7200], description="Longest audio one request may send.")


class TtsEngineOptions(_Strict):
    sample_rate: int | None = Field(None, ge=8000, examples=[22050])
    num_threads: int | None = Field(None, ge=1, examples=[2], description="ONNX threads (default: the CPU share).")
    max_concurrency: int = Field(8, ge=1, le=1024, examples=[8], description="Requests synthesized at once.")


class CustomEngineOptions(_Strict):
    pass


ENGINE_OPTIONS: dict[str, type[BaseModel]] = {
    "custom": CustomEngineOptions,
    "llm": LLMEngineOptions,
    "embeddings": EmbeddingsEngineOptions,
    "asr": AsrEngineOptions,
    "tts": TtsEngineOptions,
}


class PackageConfig(_Strict):
    """`headway.yaml`: one model package."""

    name: str = Field(..., description="Lower-case name: letters, digits, '.', '_' or '-'.",
                      examples=["my-model"])
    runtime: Runtime = Field("custom", description="Which runtime serves the model.",
                             examples=["custom"])
    description: str | None = Field(None, examples=["Sentiment classifier"])
    model: ModelSource = Field(default_factory=ModelSource)
    requirements: list[str] = Field(
        default_factory=list, description="pip requirement specifiers, installed before load into a virtual "
        "environment of their own (one per requirement set on a node, inheriting torch and headway), never into "
        "the shared interpreter.",
        examples=[["numpy==2.1.0"]],
    )
    environment: dict[str, str] = Field(
        default_factory=dict, description="Environment variables set for the model.",
        examples=[{"LOG_LEVEL": "info"}],
    )
    secrets: list[str] = Field(
        default_factory=list,
        description="Secret names only; values come at run time from the environment or a secrets "
        "directory and are never written by Headway.",
        examples=[["HF_TOKEN"]],
    )
    resources: Resources = Field(default_factory=Resources)
    runtime_options: RuntimeOptions = Field(default_factory=RuntimeOptions)
    engine: dict[str, Any] = Field(
        default_factory=dict, description="Per-runtime engine options (see the runtime's schema).",
        examples=[{"dtype": "float32", "max_num_batched_tokens": 512}],
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(
                f"'{v}' is not a valid name: use 1-63 lower-case letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        return v

    @field_validator("environment")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [k for k in v if not _ENV_RE.match(k)]
        if bad:
            raise ValueError(f"invalid environment variable name(s): {', '.join(bad)}")
        return v

    @field_validator("secrets")
    @classmethod
    def _secrets(cls, v: list[str]) -> list[str]:
        bad = [k for k in v if not _ENV_RE.match(k)]
        if bad:
            raise ValueError(f"invalid secret name(s): {', '.join(bad)}; use letters, digits, '_'")
        return v

    def engine_options(self) -> BaseModel:
        """The validated engine options for this package's runtime."""
        return ENGINE_OPTIONS[self.runtime].model_validate(self.engine)


def json_schema() -> dict[str, Any]:
    """The JSON schema of headway.yaml, with each runtime's engine options attached."""
    schema = PackageConfig.model_json_schema()
    schema["$id"] = "https://headway.dev/schemas/headway.yaml.json"
    schema.setdefault("$defs", {})
    for runtime, opts in ENGINE_OPTIONS.items():
        schema["$defs"][f"engine-{runtime}"] = opts.model_json_schema()
    return schema
