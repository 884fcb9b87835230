"""What client traffic the router forwards to replicas: the public model API, nothing else.

`PUBLIC` is the one list of (method, path template) pairs a client may reach on a replica through
the router, over HTTP, WebSocket (method "WS") and gRPC alike. A replica's admin surfaces (LoRA
adapter loading, `/headway/*` state and tokenizer) stay reachable on the replica itself, not
through the model-traffic path (DESIGN.md principle 5); the router's own calls to
`/headway/state` and `/headway/tokenizer` (health checks, tokenizer fetch) do not come here.

Paths are normalised before matching (`normalize`): percent-decoding (repeated, so `%252e`
is caught too), `//` collapsed, `.` and `..` segments resolved. The normalised path is what is
matched and what is forwarded, so a replica never sees a path other than the one allowed.

To serve a new endpoint through the router, add one `Endpoint` to `PUBLIC`; `{name}` stands for
a model, deployment or adapter name (one path segment of `NAME_CHARS`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

NAME_CHARS = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"


@dataclass(frozen=True)
class Endpoint:
    method: str          # POST, GET, or WS for a WebSocket path
    template: str        # the path, with {name} for a model name

    @property
    def pattern(self) -> re.Pattern[str]:
        return re.compile("^" + re.escape(self.template).replace(re.escape("{name}"), f"({NAME_CHARS})") + "$")


PUBLIC: tuple[Endpoint, ...] = (
    Endpoint("POST", "/v1/chat/completions"),
    Endpoint("POST", "/v1/completions"),
    Endpoint("POST", "/v1/embeddings"),
    Endpoint("POST", "/embed"),                      # the embeddings runtime's own (truncate, normalize)
    Endpoint("POST", "/v1/audio/transcriptions"),
    Endpoint("POST", "/v1/audio/translations"),
    Endpoint("POST", "/v1/audio/speech"),
    Endpoint("POST", "/v1/models/{name}:predict"),
    Endpoint("GET", "/v1/models/{name}/schema"),
    Endpoint("WS", "/v1/models/{name}/ws"),         # a model's own WebSocket (custom runtimes)
    Endpoint("WS", "/v1/audio/speech/stream"),      # text in as it arrives, speech out per sentence (tts)
)

# Replica paths a client is refused with 403 rather than 404: they exist, but only for operators.
ADMIN_PREFIXES: tuple[str, ...] = ("/headway/", "/v1/load_lora_adapter", "/v1/unload_lora_adapter")

_PATTERNS = tuple((e, e.pattern) for e in PUBLIC)
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")


class BadPath(ValueError):
    """A path that cannot be normalised safely (control characters, backslashes, too deep an encoding)."""


def normalize(path: str) -> str:
    """The path as a replica would resolve it: decoded, `//` collapsed, dot segments resolved."""
    for _ in range(4):
        decoded = unquote(path)
        if decoded == path:
            break
        path = decoded
    else:
        raise BadPath("the path is percent-encoded more than 3 times over")
    if _BAD_CHARS.search(path):
        raise BadPath("the path holds control characters or backslashes")
    out: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if out:
                out.pop()
            continue
        out.append(segment)
    return "/" + "/".join(out)


@dataclass(frozen=True)
class Verdict:
    status: int                  # 200: forward; else the answer the client gets
    path: str                    # the normalised path (forwarded when allowed)
    message: str = ""
    name: str | None = None      # the model named by the path, if any
    allow: tuple[str, ...] = ()  # for 405: the methods the path takes


def served(kind: str = "http") -> str:
    """The public endpoints, as a line for error messages."""
    items = [e for e in PUBLIC if (e.method == "WS") == (kind == "ws")]
    return ", ".join(f"{e.method} {e.template}" if kind == "http" else e.template for e in items)


def check(method: str, path: str) -> Verdict:
    """May a client send `method path` through the router? method is an HTTP method or "WS"."""
    kind = "ws" if method == "WS" else "http"
    try:
        norm = normalize(path)
    except BadPath as exc:
        return Verdict(400, path, f"bad request path: {exc}")
    methods: list[str] = []
    for endpoint, pattern in _PATTERNS:
        m = pattern.match(norm)
        if m is None or (endpoint.method == "WS") != (kind == "ws"):
            continue
        if endpoint.method == method:
            return Verdict(200, norm, name=m.group(1) if m.groups() else None)
        methods.append(endpoint.method)
    if norm.startswith(ADMIN_PREFIXES) or norm + "/" in ADMIN_PREFIXES:
        return Verdict(403, norm, f"{norm} is an admin endpoint of the replicas: it is not reachable through the "
                       "router (model traffic only); call it on the replica itself, as an operator")
    if methods:
        return Verdict(405, norm, f"{norm} takes {' or '.join(methods)}, not {method}", allow=tuple(methods))
    if kind == "ws":
        return Verdict(404, norm, f"no such WebSocket path: {norm}; this router serves these WebSocket paths: "
                       f"{served('ws')}")
    return Verdict(404, norm, f"no such endpoint: {method} {norm}; this router serves: {served()}; "
                   "and its own GET /v1/models, /health/live, /health/ready, /metrics, /headway/router")
