"""From an HTTP request to a deployment name and the RouteRequest a policy sees.

A request reaches a deployment by its path (`/v1/models/NAME:predict`, `/v1/models/NAME/...`)
or by the `model` field of its JSON body (the OpenAI API); a router with one deployment also
takes requests that name none.
"""

from __future__ import annotations

import json
from typing import Any

PREFIX = "/v1/models/"


def model_from_path(path: str) -> str | None:
    if not path.startswith(PREFIX) or len(path) <= len(PREFIX):
        return None
    name = path[len(PREFIX):].split("/", 1)[0].split(":", 1)[0]
    return name or None


def parse_body(body: bytes) -> dict[str, Any] | None:
    if not body or body[:1] not in (b"{", b" ", b"\n", b"\t", b"\r"):
        return None
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def prompt_of(body: dict[str, Any] | None) -> tuple[str, tuple[int, ...] | None]:
    """The prompt text (chat messages joined in order) and token ids when the client sent them."""
    if body is None:
        return "", None
    messages = body.get("messages")
    if isinstance(messages, list):
        parts: list[str] = []
        for m in messages:
            if not isinstance(m, dict):
                continue
            content = m.get("content")
            if isinstance(content, list):  # OpenAI content parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            parts.append(f"{m.get('role', '')}:{content if isinstance(content, str) else ''}\n")
        return "".join(parts), None
    prompt = body.get("prompt", body.get("input", body.get("text")))
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) for t in prompt):
            return "", tuple(prompt)
        if isinstance(prompt[0], str):
            return prompt[0], None
    return "", None


def model_from_form(body: bytes, headers: list[tuple[bytes, bytes]]) -> str | None:
    """The `model` field of a multipart/form-data body (OpenAI audio uploads), else None."""
    from headway.multipart import field_value

    for k, v in headers:
        if k.lower() == b"content-type" and v[:19].lower() == b"multipart/form-data":
            return field_value(body, v.decode("latin-1"), "model")
    return None
