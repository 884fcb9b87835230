"""What an encoder directory says about itself: the BERT shape (config.json), the
sentence-transformers pipeline (modules.json, 1_Pooling/config.json, sentence_bert_config.json)
and the tokenizer (tokenizer.json, or vocab.txt for older directories).

Owns reading those files into one `EncoderSpec`. Invariants: `max_tokens` never exceeds the
model's position table; `pooling` is one of POOLING_MODES; a pipeline step Headway cannot run
exactly (e.g. a Dense layer) is refused at load time with the file that names it, never
silently skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len")
_KNOWN_MODULES = ("Transformer", "Pooling", "Normalize")


class EncoderLoadError(ValueError):
    """The directory is not an encoder Headway can serve; the message names the file and field."""


@dataclass(frozen=True)
class EncoderSpec:
    path: Path
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str
    pooling: str            # one of POOLING_MODES
    normalize: bool         # a Normalize step follows pooling (modules.json)
    max_tokens: int         # longest input in tokens, [CLS] and [SEP] included
    pad_token_id: int

    @property
    def dimensions(self) -> int:
        return self.hidden_size


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EncoderLoadError(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise EncoderLoadError(f"{path}: expected a JSON object")
    return data


def _pooling(root: Path, modules: list[dict[str, Any]]) -> str:
    pool_dir = next((m.get("path", "") for m in modules if str(m.get("type", "")).endswith("Pooling")), None)
    if pool_dir is None:
        return "mean"      # a plain Hugging Face directory: sentence-transformers' default pooling
    cfg_file = root / pool_dir / "config.json"
    cfg: dict[str, Any] = _read(cfg_file) if cfg_file.exists() else {"pooling_mode_mean_tokens": True}
    modes = [m for m, key in (("cls", "pooling_mode_cls_token"), ("mean", "pooling_mode_mean_tokens"),
                              ("max", "pooling_mode_max_tokens"), ("mean_sqrt_len", "pooling_mode_mean_sqrt_len_tokens"))
             if cfg.get(key)]
    if isinstance(cfg.get("pooling_mode"), str):
        modes = [cfg["pooling_mode"].replace("lasttoken", "last")]
    others = [k for k in ("pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken") if cfg.get(k)]
    if len(modes) != 1 or others or modes[0] not in POOLING_MODES:
        raise EncoderLoadError(f"{cfg_file}: pooling {modes + others or 'none'} is not supported; Headway pools "
                               f"with exactly one of {', '.join(POOLING_MODES)}")
    return modes[0]


def read_spec(path: str | Path, max_tokens: int | None = None) -> EncoderSpec:
    """The spec of an encoder directory; `max_tokens` lowers (never raises past the position
    table) the input limit the sentence-transformers config gives."""
    root = Path(path)
    cfg = _read(root / "config.json")
    model_type = cfg.get("model_type", "bert")
    if model_type != "bert" or cfg.get("position_embedding_type", "absolute") != "absolute":
        raise EncoderLoadError(f"{root / 'config.json'}: model_type '{model_type}' with "
                               f"{cfg.get('position_embedding_type', 'absolute')} positions is not a BERT encoder "
                               "Headway runs (bert with absolute positions)")
    modules = json.loads((root / "modules.json").read_text()) if (root / "modules.json").exists() else []
    unknown = [m.get("type") for m in modules if str(m.get("type", "")).rsplit(".", 1)[-1] not in _KNOWN_MODULES]
    if unknown:
        raise EncoderLoadError(f"{root / 'modules.json'}: pipeline step(s) {unknown} are not supported "
                               f"(Headway runs {', '.join(_KNOWN_MODULES)})")
    normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
    max_position = int(cfg.get("max_position_embeddings", 512))
    st_cfg = _read(root / "sentence_bert_config.json") if (root / "sentence_bert_config.json").exists() else {}
    limit = int(st_cfg.get("max_seq_length") or max_position)
    limit = min(limit, max_position, max_tokens or max_position)
    return EncoderSpec(
        path=root, vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
        num_layers=int(cfg["num_hidden_layers"]), num_heads=int(cfg["num_attention_heads"]),
        intermediate_size=int(cfg["intermediate_size"]), max_position=max_position,
        type_vocab_size=int(cfg.get("type_vocab_size", 2)), layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
        hidden_act=str(cfg.get("hidden_act", "gelu")), pooling=_pooling(root, modules), normalize=normalize,
        max_tokens=limit, pad_token_id=int(cfg.get("pad_token_id", 0)))


def load_tokenizer(root: str | Path) -> Tokenizer:
    """The fast tokenizer with truncation and padding off (the engine packs; the API decides
    what a too-long input means)."""
    root = Path(root)
    if (root / "tokenizer.json").exists():
        tok = Tokenizer.from_file(str(root / "tokenizer.json"))
    elif (root / "vocab.txt").exists():
        from tokenizers.implementations import BertWordPieceTokenizer

        lower = bool(_read(root / "tokenizer_config.json").get("do_lower_case", True)) \
            if (root / "tokenizer_config.json").exists() else True
        tok = BertWordPieceTokenizer(str(root / "vocab.txt"), lowercase=lower)._tokenizer
    else:
        raise EncoderLoadError(f"{root}: no tokenizer.json or vocab.txt")
    tok.no_truncation()
    tok.no_padding()
    return tok
