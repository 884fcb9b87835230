"""The grammar compiler service: owns one xgrammar ``GrammarCompiler`` per tokenizer, the
thread pool that compiles off the engine's step loop, and the cache of compiled grammars.

A request's constraint (``GrammarSpec``) is compiled at most once per key: ``submit`` returns
the cached future when the key was seen before (a *hit*, also while the first compile is still
running), or starts a compile on the pool (a *miss*). The API awaits ``compile`` before it hands
the request to the engine, so the step loop only ever sees compiled grammars and never waits
for one. xgrammar releases the GIL while compiling (measured: a 0.35 s compile in a thread left
at most 2.8 ms between iterations of a pure-Python loop), so compiles do not stall the loop.

Invariants (under ``_lock``): ``len(_cache) <= max_entries`` (least recently used evicted; a
request holding a ``Grammar`` keeps it alive); a key whose compile failed is dropped from the
cache, so a bad constraint is reported every time and never cached;
``hits + misses == number of submit calls``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer

from headway.runtime.llm.grammar.spec import GrammarError, GrammarSpec

log = logging.getLogger("headway.llm.grammar")

_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+?:\d+: ")


@dataclass(frozen=True, eq=False)
class Grammar:
    """A compiled grammar (``compiled`` is an ``xgrammar.CompiledGrammar``), shared read-only by
    every request with the same key; each sequence matches it with its own ``GrammarState``."""

    key: tuple[str, str, bool]
    kind: str
    compiled: Any
    vocab_size: int


def _clean(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [_CPP_PREFIX.sub("", ln).strip() for ln in text.splitlines() if ln.strip()]
    return "; ".join(lines) or type(exc).__name__


class GrammarCompiler:
    """Compiles ``GrammarSpec``s for one tokenizer; thread-safe (see module docstring)."""

    def __init__(self, tokenizer: Tokenizer, *, vocab_size: int, stop_token_ids: list[int],
                 max_workers: int = 2, max_entries: int = 256):
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's logits width (may exceed the tokenizer's vocab)
        self.stop_token_ids = sorted(stop_token_ids)
        self.max_entries = max_entries
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="headway-grammar")
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str, bool], Future[Grammar]] = OrderedDict()
        self._xgr: Any = None  # the xgrammar GrammarCompiler, built on first use (in the pool)
        self._xgr_lock = threading.Lock()
        self.hits = self.misses = self.errors = 0

    # ---- public -----------------------------------------------------------------------------

    def submit(self, spec: GrammarSpec) -> Future[Grammar]:
        """The future of ``spec``'s compiled grammar: cached, or compiling on the pool."""
        with self._lock:
            fut = self._cache.get(spec.key)
            if fut is not None:
                self._cache.move_to_end(spec.key)
                self.hits += 1
                return fut
            self.misses += 1
            fut = self._pool.submit(self._compile, spec)
            self._cache[spec.key] = fut
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        fut.add_done_callback(functools.partial(self._forget_failed, spec.key))
        return fut

    async def compile(self, spec: GrammarSpec) -> Grammar:
        """Await ``spec``'s grammar without blocking the event loop; ``GrammarError`` if it is
        invalid (the message says what was wrong, ``param`` which field)."""
        return await asyncio.wrap_future(self.submit(spec))

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"cache_hits": self.hits, "compiles": self.misses, "errors": self.errors,
                    "cached": len(self._cache), "compiling": sum(not f.done() for f in self._cache.values())}

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- the pool's side --------------------------------------------------------------------

    def _forget_failed(self, key: tuple[str, str, bool], fut: Future[Grammar]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            with self._lock:
                if self._cache.get(key) is fut:
                    del self._cache[key]
                self.errors += 1

    def _compiler(self) -> Any:
        with self._xgr_lock:
            if self._xgr is None:
                try:
                    import xgrammar as xgr
                except ImportError as exc:
                    raise RuntimeError("structured output needs xgrammar: pip install --no-deps xgrammar==0.1.27 "
                                       "(scripts/setup does; its triton dependency is only for GPU kernels)") from exc
                from transformers import PreTrainedTokenizerFast

                # transformers leaves this constructor unannotated
                hf = PreTrainedTokenizerFast(tokenizer_object=self.tokenizer)  # type: ignore[no-untyped-call]
                info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.stop_token_ids or None)
                # our cache is the only one: xgrammar's own would hold a second copy
                self._xgr = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._xgr

    def _compile(self, spec: GrammarSpec) -> Grammar:
        try:
            comp = self._compiler()
            if spec.kind == "json_object":
                compiled = comp.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            elif spec.kind == "json_schema":
                compiled = comp.compile_json_schema(spec.source, any_whitespace=False, strict_mode=spec.strict)
            elif spec.kind == "regex":
                compiled = comp.compile_regex(spec.source)
            elif spec.kind == "ebnf":
                compiled = comp.compile_grammar(spec.source)
            else:
                compiled = comp.compile_structural_tag(_compact_json_contents(spec.source))
        except Exception as exc:  # xgrammar raises RuntimeError / ValueError / pydantic errors
            what = {"json_object": "JSON object grammar", "json_schema": "JSON schema", "regex": "regex",
                    "ebnf": "grammar", "structural_tag": "tool-call grammar"}[spec.kind]
            raise GrammarError(f"invalid {what}: {_clean(exc)}", spec.param) from None
        return Grammar(spec.key, spec.kind, compiled, self.vocab_size)


def _compact_json_contents(tag_source: str) -> str:
    """The structural tag with each JSON-schema content (a tool call's arguments) as the grammar of
    compact single-line JSON: xgrammar compiles a tag's `json_schema` content allowing any
    whitespace, and models then spend tokens on newlines and indentation. The grammar is the one
    `response_format` JSON gets (`any_whitespace=False`: `{"city": "Oslo", "unit": "c"}`), strict
    as the tag's own JSON schema content is (no property the schema does not name)."""
    from xgrammar.grammar import Grammar as XGrammar

    def compact(node: Any) -> Any:
        if isinstance(node, dict):
            if node.get("type") == "json_schema" and "json_schema" in node:
                grammar = XGrammar.from_json_schema(json.dumps(node["json_schema"]), any_whitespace=False,
                                                    strict_mode=True)
                return {"type": "grammar", "grammar": str(grammar)}
            return {k: compact(v) for k, v in node.items()}
        if isinstance(node, list):
            return [compact(v) for v in node]
        return node

    return json.dumps(compact(json.loads(tag_source)))
