"""GGUF -> Hugging Face model directory, once, through transformers' own GGUF loader.

The output is what `ModelRunner` and `AutoModelForCausalLM.from_pretrained(dir)` load:
`config.json`, `*.safetensors` (float32 weights exactly as transformers dequantizes them),
`tokenizer.json` + `tokenizer_config.json` (with the GGUF's chat template when it has one) and
`generation_config.json`. Checked with transformers 5.23: Llama (SmolLM2, tinycoder), Qwen2
(Qwen2.5 Coder) and Gemma 3 (text) GGUFs convert and generate. transformers is imported only
inside `convert_gguf_to_hf`, so the cache-hit path never pays for it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm

from headway.library.errors import ConversionError

REQUIRED_OUTPUTS = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


def gguf_chat_template(gguf_path: Path) -> str | None:
    """The `tokenizer.chat_template` string stored in a GGUF file's metadata, if any."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields.get("tokenizer.chat_template")
    if field is None:
        return None
    value = field.contents()
    return value if isinstance(value, str) and value.strip() else None


def _template_into_tokenizer_config(out_dir: Path, template: object) -> None:
    """transformers 5 saves the chat template as chat_template.jinja; also keep it in
    tokenizer_config.json, where older readers (and transformers 4) look for it."""
    if not isinstance(template, str) or not template:
        return
    path = out_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["chat_template"] = template
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, *, model_name: str, progress: bool = True) -> None:
    """Dequantize `gguf_path` into a float32 Hugging Face model directory at `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    steps = tqdm(total=4, desc=f"convert {model_name}", unit="step", disable=not progress,
                 file=sys.stderr, leave=False)
    try:
        src_dir, name = str(gguf_path.parent), gguf_path.name
        try:
            model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise ConversionError(
                f"transformers could not load {gguf_path} for model {model_name!r}: {exc}. "
                "Its architecture or quantization may be unsupported by this transformers version."
            ) from exc
        steps.update(1)
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
        if not getattr(tokenizer, "chat_template", None):
            template = gguf_chat_template(gguf_path)
            if template:
                tokenizer.chat_template = template
        steps.update(1)
        # The weights are already dequantized to float32 tensors; dropping the GGUF quantizer
        # (which refuses to serialize) saves them as the plain model they now are.
        setattr(model, "hf_quantizer", None)  # noqa: B010 (nn.Module typing of attributes)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = model_name
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir)
        steps.update(1)
        tokenizer.save_pretrained(out_dir)
        _template_into_tokenizer_config(out_dir, getattr(tokenizer, "chat_template", None))
        model.generation_config.save_pretrained(out_dir)
        steps.update(1)
    finally:
        steps.close()
        if bars_were_on and not progress:
            hf_logging.enable_progress_bar()
    missing = [f for f in REQUIRED_OUTPUTS if not (out_dir / f).is_file()]
    if missing or not any(out_dir.glob("*.safetensors")):
        raise ConversionError(
            f"converting {gguf_path} for {model_name!r} left an incomplete directory {out_dir}: "
            f"missing {missing or ['*.safetensors']}"
        )
