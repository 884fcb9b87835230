"""Exact prompt token ids at the router, for deployments whose tokenizer it is given.

With a deployment's tokenizer (`headway route --tokenizer DEPLOYMENT=SOURCE`, SOURCE a model
directory with tokenizer.json or a model-library name), the router turns an OpenAI chat or
completion body into the token ids the replica will compute — chat through the model's own chat
template, as the replica renders it — so prefix affinity works on token ids and matches the
prefix digests replicas publish exactly, instead of estimating from characters (an adapter's
requests are matched against the chain root the replica publishes for that adapter). Requests
it cannot tokenize the same way as the replica (a cache salt, which seeds the replica's digest
chain with a key the router does not know; tools; a template error) keep the character estimate.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

from tokenizers import Tokenizer

log = logging.getLogger("headway.router")


class PromptTokenizer(Protocol):
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]: ...
    def encode_chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]: ...


class ChatTokenizer(Protocol):
    """What the segment cache uses of a model's tokenizer (a ``ModelTokenizer``)."""

    @property
    def tokenizer(self) -> Tokenizer: ...
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]: ...
    def render_chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> str: ...


def load_prompt_tokenizer(source: str) -> PromptTokenizer:
    """A model directory with tokenizer.json, or a model-library name, as `headway serve` finds it."""
    from headway.tokenization import ModelTokenizer, model_dir

    return SegmentCachedTokenizer(ModelTokenizer(model_dir(source, Path.cwd())))


class SegmentCachedTokenizer:
    """A chat prompt's token ids in pieces: the rendered prompt is cut at the special tokens the
    template writes (message boundaries), and each piece's ids are cached (LRU), so a turn of a
    conversation tokenizes only its new message; its system prompt and history come from the
    cache. Encoding a ~1,800-token chat prompt whole costs ~4 ms on the router's event loop.

    Cutting at special tokens gives the same ids as encoding whole when the tokenizer splits on
    them first (byte-level BPE does). The first `verify` prompts are also encoded whole and
    compared; on any difference the cache is switched off for good (a logged warning).
    """

    def __init__(self, tokenizer: ChatTokenizer, max_entries: int = 2048, verify: int = 64) -> None:
        import re
        from collections import OrderedDict

        self.tokenizer = tokenizer
        raw = tokenizer.tokenizer
        specials = sorted({t.content for t in raw.get_added_tokens_decoder().values() if t.special}, key=len, reverse=True)
        self._ids = {s: raw.token_to_id(s) for s in specials}
        self._split = re.compile("(" + "|".join(re.escape(s) for s in specials) + ")") if specials else None
        self._cache: OrderedDict[str, list[int]] = OrderedDict()
        self.max_entries = max_entries
        self.verify_left = verify
        self.enabled = self._split is not None
        self.hits = self.misses = 0

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def encode_chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        text = self.tokenizer.render_chat(messages, **kwargs)
        if not self.enabled:
            return self.tokenizer.encode(text, add_special_tokens=False)
        assert self._split is not None
        out: list[int] = []
        for piece in self._split.split(text):
            if not piece:
                continue
            special = self._ids.get(piece)
            if special is not None:
                out.append(special)
                continue
            ids = self._cache.get(piece)
            if ids is None:
                self.misses += 1
                ids = self.tokenizer.encode(piece, add_special_tokens=False)
                self._cache[piece] = ids
                if len(self._cache) > self.max_entries:
                    self._cache.popitem(last=False)
            else:
                self.hits += 1
                self._cache.move_to_end(piece)
            out.extend(ids)
        if self.verify_left > 0:
            self.verify_left -= 1
            whole = self.tokenizer.encode(text, add_special_tokens=False)
            if whole != out:
                self.enabled = False
                self._cache.clear()
                log.warning("this tokenizer does not encode chat prompts piece by piece the same as whole; "
                            "the router encodes every prompt whole from now on")
                return whole
        return out


def prompt_token_ids(tokenizer: PromptTokenizer, body: dict[str, Any] | None) -> tuple[int, ...] | None:
    """The prompt's token ids as the replica computes them, or None where that is not certain."""
    if body is None or body.get("cache_salt") or body.get("tools"):
        return None
    try:
        messages = body.get("messages")
        if isinstance(messages, list):
            kwargs = body.get("chat_template_kwargs") or {}
            return tuple(tokenizer.encode_chat(messages, add_generation_prompt=body.get("add_generation_prompt", True),
                                               **(kwargs if isinstance(kwargs, dict) else {})))
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return tuple(tokenizer.encode(prompt))
    except Exception:  # a body the replica will reject anyway: it answers with the reason
        return None
    return None
