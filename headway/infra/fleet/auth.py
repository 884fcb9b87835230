"""Who is calling, and may they: the one check every control route and every model route goes through.

With no key in the state, the control plane serves one user on loopback: a request whose Host is
not 127.0.0.1 / localhost / [::1] with the server's own port, or that carries a browser Origin
other than the server's own, is refused (DNS rebinding, cross-site requests). Once any key
exists, every route but /health/* needs one, on loopback too.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

from headway.infra.fleet.keys import KeyRecord, KeyRing, Rejection, authorize
from headway.infra.fleet.ratelimit import KeyLimits

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
# The single user of a keyless loopback control plane: may do everything, like an admin key.
LOOPBACK_USER = KeyRecord(id="loopback", name="local user (no keys exist)", scope="admin", digest="", created=0.0)
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)
MASK = "***"
STREAM_OUTPUT_GUESS = 256      # tokens charged for a stream that names no max_tokens


def error_json(r: Rejection) -> bytes:
    """The OpenAI error shape, also used by the control API (the CLI reads error.message)."""
    kind = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}.get(r.status,
                                                                                             "invalid_request_error")
    return json.dumps({"error": {"message": r.message, "type": kind, "code": r.kind}}).encode()


def rejection_headers(r: Rejection) -> list[tuple[bytes, bytes]]:
    headers = []
    if r.status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="headway"'))
    if r.retry_after is not None:
        headers.append((b"retry-after", str(r.retry_after).encode()))
    return headers


def loopback_problem(host: str | None, origin: str | None, port: int | None) -> str | None:
    """Why a keyless request is not a local one (None when it is)."""
    suffix = "" if port == 80 else f":{port}"
    own = [f"{n}{suffix}" for n in LOOPBACK_NAMES]
    if host is None or host.lower() not in own:
        return (f"Host {host!r} is not this control plane's loopback address ({', '.join(own)})")
    if origin is not None and origin.lower() not in [f"http://{o}" for o in own]:
        return f"Origin {origin!r} is not this control plane's own ({', '.join('http://' + o for o in own)})"
    return None


class AuthGate:
    """Identifies the caller (a key, or the keyless loopback user), checks scopes and rate limits."""

    def __init__(self, ring: KeyRing, clock: Callable[[], float] = time.time):
        self.ring = ring
        self.limits = KeyLimits()
        self.clock = clock

    def identify(self, scope: Mapping[str, Any]) -> KeyRecord | Rejection:
        auth = host = origin = None
        for k, v in scope["headers"]:
            if k == b"authorization":
                auth = v.decode("latin-1")
            elif k == b"host":
                host = v.decode("latin-1")
            elif k == b"origin":
                origin = v.decode("latin-1")
        if self.ring.empty:
            server = scope.get("server")
            problem = loopback_problem(host, origin, server[1] if server else None)
            if problem is None:
                return LOOPBACK_USER
            return Rejection(403, "not_local", f"refused: {problem}. With no API keys this control plane answers "
                             "only local, same-origin requests; create an admin key (`headway keys create --scope "
                             "admin`) and send it as `Authorization: Bearer KEY` to call it from elsewhere")
        key = None
        if auth is not None:
            kind, _, value = auth.partition(" ")
            key = value.strip() if kind.lower() == "bearer" else None
            if key is None:
                return Rejection(401, "invalid_api_key", "the Authorization header must be `Bearer KEY`")
        return self.ring.authenticate(key, self.clock())

    def check(self, scope: Mapping[str, Any], need: str, deployment: str | None = None) -> KeyRecord | Rejection:
        """The caller, when it may do what needs scope `need`; otherwise why not."""
        caller = self.identify(scope)
        if isinstance(caller, Rejection):
            return caller
        return authorize(caller, need, deployment) or caller

    def admit(self, caller: KeyRecord) -> Rejection | None:
        """Count one model request against the caller's rate limits (429 past them)."""
        wait = self.limits.admit(caller.id, caller.rpm, caller.tpm, self.clock())
        if wait is None:
            return None
        limits = ", ".join(f"{n} {u} per minute" for n, u in ((caller.rpm, "requests"), (caller.tpm, "tokens")) if n)
        return Rejection(429, "rate_limit_exceeded", f"the API key {caller.id} is over its rate limit ({limits}); "
                         f"retry in {wait} s", retry_after=wait)

    def charge(self, caller: KeyRecord, tokens: int) -> None:
        if caller.tpm:
            self.limits.charge(caller.id, tokens, self.clock())


def usage_tokens(answer: bytes) -> int | None:
    """usage.total_tokens of a whole JSON answer (OpenAI shape), or None."""
    try:
        usage = json.loads(answer).get("usage")
        total = usage.get("total_tokens") if isinstance(usage, dict) else None
    except (ValueError, AttributeError):
        return None
    return total if isinstance(total, int) else None


def estimate_tokens(request: bytes) -> int:
    """For a stream (no usage in hand): max_tokens (or 256) plus the request's bytes / 4 as the prompt."""
    try:
        body = json.loads(request)
        limit = body.get("max_completion_tokens") or body.get("max_tokens") if isinstance(body, dict) else None
    except ValueError:
        limit = None
    return (limit if isinstance(limit, int) and limit > 0 else STREAM_OUTPUT_GUESS) + len(request) // 4


def redact(spec: dict[str, Any], full_access: bool) -> dict[str, Any]:
    """A deployment spec as a caller may see it: env values whose name looks secret (KEY, TOKEN, SECRET,
    PASSWORD, CREDENTIAL) or that are marked secret are masked for everyone; every env value is
    masked for callers without admin scope."""
    env = spec.get("env")
    if not isinstance(env, dict) or not env:
        return spec
    masked: dict[str, Any] = {}
    for name, value in env.items():
        marked = isinstance(value, dict) and bool(value.get("secret"))
        if marked:
            masked[name] = {**value, "value": MASK}   # the spec's own shape, the value hidden
        elif not full_access or SECRET_NAME.search(str(name)) is not None:
            masked[name] = MASK
        else:
            masked[name] = value
    return {**spec, "env": masked}
