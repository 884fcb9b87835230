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

from pathlib import Path
from typing import Any, Protocol


class PromptTokenizer(Protocol):
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]: ...
    def encode_chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]: ...


def load_prompt_tokenizer(source: str) -> PromptTokenizer:
    """A model directory with tokenizer.json, or a model-library name, as `headway serve` finds it."""
    from headway.runtime.llm.serving import model_dir_for
    from headway.runtime.llm.tokenizer import ModelTokenizer

    return ModelTokenizer(model_dir_for(source, Path.cwd()))


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
