"""API keys: what a key may do (its scope), and the in-memory ring that checks one per request.

A key is `hw_` + 32 random bytes (urlsafe base64), shown once when created. Only its sha256 is
kept (a key has 256 bits of entropy, so a plain hash is as good as a slow one) and compared in
constant time. Scopes: `admin` (everything, keys included), `deploy` (deployments, scaling,
status, router metrics), `invoke` (model traffic only, optionally limited to named deployments).

Everything here is pure: time comes in as an argument, storage is the caller's (Store).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Literal, get_args

Scope = Literal["admin", "deploy", "invoke"]
SCOPES: tuple[str, ...] = get_args(Scope)
PREFIX = "hw_"
# which scopes a request needs, by what it does
ALLOWED: dict[str, frozenset[str]] = {
    "admin": frozenset({"admin"}),                 # keys, shutdown
    "deploy": frozenset({"admin", "deploy"}),      # deployments, scaling, status, /metrics, /headway/router
    "invoke": frozenset({"admin", "invoke"}),      # model traffic
}


@dataclass(frozen=True)
class KeyRecord:
    id: str
    name: str
    scope: str
    digest: str                                    # sha256 hex of the key; the key itself is never kept
    created: float
    deployments: tuple[str, ...] = ()              # invoke keys: only these deployments (empty: all)
    expires: float | None = None
    revoked: float | None = None
    rpm: int | None = None                         # requests per minute on model routes
    tpm: int | None = None                         # tokens per minute on model routes

    def public(self) -> dict[str, object]:
        """What `headway keys list` shows: everything but the digest."""
        return {"id": self.id, "name": self.name, "scope": self.scope, "deployments": list(self.deployments),
                "created": self.created, "expires": self.expires, "revoked": self.revoked, "rpm": self.rpm,
                "tpm": self.tpm}


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def new_key(name: str, scope: str, now: float, *, deployments: tuple[str, ...] = (), expires: float | None = None,
            rpm: int | None = None, tpm: int | None = None) -> tuple[str, KeyRecord]:
    """A fresh key and its record; the key is returned once and stored nowhere."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose one of: {', '.join(SCOPES)}")
    if deployments and scope != "invoke":
        raise ValueError(f"only invoke keys are limited to deployments; a {scope} key reaches all of them "
                         "(drop --deployment, or use --scope invoke)")
    if expires is not None and expires <= now:
        raise ValueError("the expiry is in the past; give a duration such as 30d or a future ISO date")
    for label, value in (("rpm", rpm), ("tpm", tpm)):
        if value is not None and value < 1:
            raise ValueError(f"--{label} must be at least 1 (or left out for no limit), got {value}")
    key = PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    record = KeyRecord(id="k_" + secrets.token_hex(6), name=name, scope=scope, digest=digest(key), created=now,
                       deployments=tuple(deployments), expires=expires, rpm=rpm, tpm=tpm)
    return key, record


_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_expires(text: str, now: float) -> float:
    """`30d`, `12h`, `90m`, `2w`, or an ISO date/time (UTC unless it says otherwise) -> unix time."""
    m = _DURATION.match(text.strip())
    if m:
        return now + int(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--expires takes a duration (30d, 12h, 90m, 2w) or an ISO date (2027-01-31 or "
                         f"2027-01-31T12:00:00+00:00), got {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


@dataclass(frozen=True)
class Rejection:
    status: int          # 401: no valid key; 403: a valid key that may not do this (or a foreign origin); 429
    kind: str
    message: str
    retry_after: int | None = None


@dataclass
class KeyRing:
    """Every key by digest, held in memory (one dict lookup per request; refreshed from the state)."""

    by_digest: dict[str, KeyRecord] = field(default_factory=dict)
    known: dict[str, str] = field(default_factory=dict)   # key -> digest of keys seen valid: no sha256 per request
    MAX_KNOWN = 4096

    def replace(self, records: list[KeyRecord]) -> None:
        self.by_digest = {r.digest: r for r in records}

    def add(self, record: KeyRecord) -> None:
        self.by_digest = {**self.by_digest, record.digest: record}

    @property
    def empty(self) -> bool:
        return not self.by_digest

    def has_admin(self, now: float) -> bool:
        return any(r.scope == "admin" and r.revoked is None and (r.expires is None or r.expires > now)
                   for r in self.by_digest.values())

    def authenticate(self, key: str | None, now: float) -> KeyRecord | Rejection:
        if not key:
            return Rejection(401, "missing_api_key", "this endpoint needs an API key: send `Authorization: Bearer "
                             "KEY` (the OpenAI client's api_key; the CLI's --key or $HEADWAY_KEY)")
        d = self.known.get(key) or digest(key)
        record = self.by_digest.get(d)
        if record is None or not hmac.compare_digest(record.digest, d):
            return Rejection(401, "invalid_api_key", "the API key is not valid here (unknown key); create one with "
                             "`headway keys create`")
        if record.revoked is not None:
            return Rejection(401, "invalid_api_key", f"the API key {record.id} was revoked")
        if record.expires is not None and record.expires <= now:
            return Rejection(401, "invalid_api_key", f"the API key {record.id} expired at "
                             f"{datetime.fromtimestamp(record.expires, timezone.utc).isoformat(timespec='seconds')}")
        if len(self.known) >= self.MAX_KNOWN:
            self.known.clear()
        self.known[key] = d
        return record


def authorize(record: KeyRecord, need: str, deployment: str | None = None) -> Rejection | None:
    """None when `record` may do what needs scope `need` (on `deployment`, for model traffic)."""
    if record.scope not in ALLOWED[need]:
        allowed = " or ".join(sorted(ALLOWED[need]))
        return Rejection(403, "permission_denied", f"the API key {record.id} has scope '{record.scope}'; this "
                         f"endpoint needs {allowed}")
    if need == "invoke" and deployment is not None and record.deployments and deployment not in record.deployments:
        return Rejection(403, "permission_denied", f"the API key {record.id} may call only "
                         f"{', '.join(record.deployments)}; not '{deployment}'")
    return None
