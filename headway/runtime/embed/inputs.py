"""Request bodies of the embeddings API, validated into token ids: OpenAI's /v1/embeddings
(`input` as a string, a list of strings, token ids or a list of token-id lists) and /embed
(`inputs`, a string or a list of strings).

Owns what counts as a bad input (each a 4xx naming the field) and what a too-long input means:
a 400 naming the limit, or, with `truncate: true`, its first tokens kept ([CLS] and [SEP] stay,
as a Hugging Face tokenizer truncates). Token ids a client sends are the text's tokens without
special tokens; [CLS] ... [SEP] are added here.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer

MAX_INPUTS = 2048          # per request, as OpenAI's API
TOKENIZE_INLINE = 32       # up to this many texts are tokenized on the loop; more in a worker thread


class ApiError(Exception):
    """An error in OpenAI's shape; `status` is the HTTP status."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Query:
    texts: list[str] | None          # None: token ids were given
    ids: list[list[int]] | None
    truncate: bool
    normalize: bool
    dimensions: int | None
    encoding_format: str = "float"


def _flag(body: dict[str, Any], key: str, default: bool) -> bool:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(f"'{key}' must be true or false, got {v!r}", param=key)
    return v


def _dimensions(body: dict[str, Any], full: int) -> int | None:
    d = body.get("dimensions")
    if d is None:
        return None
    if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= full:
        raise ApiError(f"'dimensions' must be an integer from 1 to {full} (this model's size), got {d!r}",
                       param="dimensions")
    return d


def _is_ids(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


def parse_openai(body: Any, dimensions: int, default_normalize: bool) -> Query:
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object like {\"model\": \"...\", \"input\": \"text\"}")
    if "input" not in body:
        raise ApiError("'input' is required: a string, a list of strings, or token ids", param="input")
    inp = body["input"]
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise ApiError(f"'encoding_format' must be 'float' or 'base64', got {fmt!r}", param="encoding_format")
    common = dict(truncate=_flag(body, "truncate", False), normalize=default_normalize,
                  dimensions=_dimensions(body, dimensions), encoding_format=fmt)
    if isinstance(inp, str):
        return Query(texts=_texts([inp], "input"), ids=None, **common)  # type: ignore[arg-type]
    if _is_ids(inp):
        return Query(texts=None, ids=[inp], **common)  # type: ignore[arg-type]
    if isinstance(inp, list) and inp and all(_is_ids(x) for x in inp):
        _count(len(inp), "input")
        return Query(texts=None, ids=inp, **common)  # type: ignore[arg-type]
    if isinstance(inp, list) and inp and all(isinstance(x, str) for x in inp):
        return Query(texts=_texts(inp, "input"), ids=None, **common)  # type: ignore[arg-type]
    raise ApiError("'input' must be a non-empty string, a non-empty list of non-empty strings, a list of token ids, "
                   "or a list of non-empty lists of token ids", param="input")


def parse_embed(body: Any, dimensions: int) -> Query:
    """/embed: {"inputs": str | [str], "truncate": false, "normalize": true, "dimensions": null}."""
    if not isinstance(body, dict) or "inputs" not in body:
        raise ApiError("the request body must be a JSON object like {\"inputs\": \"text\"} or {\"inputs\": [\"a\", \"b\"]}",
                       param="inputs")
    inp = body["inputs"]
    if isinstance(inp, str):
        inp = [inp]
    if not isinstance(inp, list) or not inp or not all(isinstance(x, str) for x in inp):
        raise ApiError("'inputs' must be a non-empty string or a non-empty list of non-empty strings", param="inputs")
    return Query(texts=_texts(inp, "inputs"), ids=None, truncate=_flag(body, "truncate", False),
                 normalize=_flag(body, "normalize", True), dimensions=_dimensions(body, dimensions))


def _count(n: int, param: str) -> None:
    if n > MAX_INPUTS:
        raise ApiError(f"'{param}' holds {n} items; at most {MAX_INPUTS} per request (split it into several)",
                       param=param)


def _texts(items: list[str], param: str) -> list[str]:
    _count(len(items), param)
    empty = next((i for i, t in enumerate(items) if not t), None)
    if empty is not None:
        raise ApiError(f"'{param}' item {empty} is an empty string; every input must hold some text",
                       param=param)
    return items


class Tokenize:
    """Text or client token ids -> the model's token ids with specials, within `max_tokens`."""

    def __init__(self, tokenizer: Tokenizer, max_tokens: int, vocab_size: int):
        self.tokenizer, self.max_tokens, self.vocab_size = tokenizer, max_tokens, vocab_size
        wrapped = tokenizer.encode("", add_special_tokens=True).ids
        self.head, self.tail = wrapped[:1], wrapped[1:]

    async def __call__(self, q: Query, param: str) -> list[list[int]]:
        if q.texts is not None and len(q.texts) > TOKENIZE_INLINE:
            return await asyncio.to_thread(self.sync, q, param)
        return self.sync(q, param)

    def sync(self, q: Query, param: str) -> list[list[int]]:
        if q.texts is not None:
            seqs = [e.ids for e in self.tokenizer.encode_batch(q.texts)]
        else:
            assert q.ids is not None
            for i, ids in enumerate(q.ids):
                bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
                if bad is not None:
                    raise ApiError(f"'{param}' item {i} holds token id {bad}; ids must be in [0, {self.vocab_size})",
                                   param=param)
            seqs = [self.head + ids + self.tail for ids in q.ids]
        return [self._fit(s, i, q.truncate, param) for i, s in enumerate(seqs)]

    def _fit(self, ids: list[int], i: int, truncate: bool, param: str) -> list[int]:
        if len(ids) <= self.max_tokens:
            return ids
        if truncate:
            return ids[:self.max_tokens - len(self.tail)] + self.tail
        raise ApiError(f"'{param}' item {i} has {len(ids)} tokens; this model's limit is {self.max_tokens} tokens "
                       "(special tokens included). Shorten it, or send \"truncate\": true to embed its first "
                       f"{self.max_tokens} tokens", param=param, code="context_length_exceeded")
