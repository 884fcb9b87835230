"""Keys, scopes, rate limits and the control API, in process: the pure parts, the gate on ASGI
scopes, and a bounded schemathesis fuzz of the control API's OpenAPI schema (no 5xx)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from headway.infra.fleet.auth import LOOPBACK_USER, AuthGate, estimate_tokens, loopback_problem, redact, usage_tokens
from headway.infra.fleet.keys import KeyRecord, KeyRing, Rejection, authorize, digest, new_key, parse_expires
from headway.infra.fleet.keys_cli import is_loopback
from headway.infra.fleet.ratelimit import KeyLimits, TokenBucket
from headway.infra.fleet.store import Store

NOW = 1_800_000_000.0


def http_scope(headers: dict[str, str], port: int = 8080) -> dict[str, Any]:
    return {"type": "http", "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
            "server": ("127.0.0.1", port)}


# ---- keys ------------------------------------------------------------------------------------

def test_new_key_is_random_shown_once_and_stored_as_a_hash() -> None:
    key, rec = new_key("ops", "admin", NOW)
    other, _ = new_key("ops", "admin", NOW)
    assert key.startswith("hw_") and len(key) == 3 + 43 and key != other
    assert rec.digest == digest(key) and key not in repr(rec) and "digest" not in rec.public()
    with pytest.raises(ValueError, match="unknown scope 'root'; choose one of: admin, deploy, invoke"):
        new_key("x", "root", NOW)
    with pytest.raises(ValueError, match="only invoke keys are limited to deployments"):
        new_key("x", "deploy", NOW, deployments=("chat",))
    with pytest.raises(ValueError, match="in the past"):
        new_key("x", "invoke", NOW, expires=NOW - 1)
    with pytest.raises(ValueError, match="--rpm must be at least 1"):
        new_key("x", "invoke", NOW, rpm=0)


def test_parse_expires_durations_and_dates() -> None:
    assert parse_expires("30d", NOW) == NOW + 30 * 86400
    assert parse_expires("12h", NOW) == NOW + 12 * 3600
    assert parse_expires("2027-01-31", NOW) == 1801353600.0           # midnight UTC
    assert parse_expires("2027-01-31T01:00:00+01:00", NOW) == 1801353600.0
    with pytest.raises(ValueError, match=r"duration \(30d, 12h, 90m, 2w\) or an ISO date"):
        parse_expires("next week", NOW)


def test_ring_authenticates_and_scopes_authorize() -> None:
    ring = KeyRing()
    admin_key, admin = new_key("a", "admin", NOW)
    deploy_key, deploy = new_key("d", "deploy", NOW)
    chat_key, chat = new_key("c", "invoke", NOW, deployments=("chat",))
    gone_key, gone = new_key("r", "invoke", NOW)
    old_key, old = new_key("e", "invoke", NOW, expires=NOW + 10)
    for r in (admin, deploy, chat, KeyRecord(**{**gone.__dict__, "revoked": NOW}), old):
        ring.add(r)
    assert ring.authenticate(admin_key, NOW) == admin
    for key, status, text in ((None, 401, "needs an API key"), ("hw_nope", 401, "unknown key"),
                              (gone_key, 401, "was revoked"), (old_key, 401, "expired at")):
        got = ring.authenticate(key, NOW + 20)
        assert isinstance(got, Rejection) and got.status == status and text in got.message, got
    assert ring.authenticate(old_key, NOW + 5) == old
    allowed = {(r.scope, need) for r in (admin, deploy, chat) for need in ("admin", "deploy", "invoke")
               if authorize(r, need, "chat") is None}
    assert allowed == {("admin", "admin"), ("admin", "deploy"), ("admin", "invoke"), ("deploy", "deploy"),
                       ("invoke", "invoke")}
    refused = authorize(chat, "invoke", "other")
    assert refused is not None and refused.status == 403 and "may call only chat; not 'other'" in refused.message
    refused = authorize(deploy, "invoke")
    assert refused is not None and "has scope 'deploy'; this endpoint needs admin or invoke" in refused.message
    assert ring.has_admin(NOW) and not KeyRing().has_admin(NOW)


def test_store_keeps_keys_and_revocations(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    key, rec = new_key("bot", "invoke", NOW, deployments=("a", "b"), expires=NOW + 60, rpm=5, tpm=100)
    store.put_key(rec)
    assert store.keys() == [rec]
    assert store.revoke_key(rec.id, NOW + 1) and not store.revoke_key("k_missing", NOW)
    store.revoke_key(rec.id, NOW + 9)                       # revoking again keeps the first time
    [back] = Store(tmp_path / "s.db").keys()
    assert back.revoked == NOW + 1 and back.deployments == ("a", "b") and (back.rpm, back.tpm) == (5, 100)
    assert key not in (tmp_path / "s.db").read_bytes().decode("latin-1")


# ---- the gate: keyless loopback, keys, redaction ----------------------------------------------

def test_keyless_gate_answers_only_local_same_origin_requests() -> None:
    gate = AuthGate(KeyRing(), clock=lambda: NOW)
    assert gate.identify(http_scope({"host": "127.0.0.1:8080"})) is LOOPBACK_USER
    assert gate.identify(http_scope({"host": "localhost:8080", "origin": "http://localhost:8080"})) is LOOPBACK_USER
    assert gate.identify(http_scope({"host": "[::1]:8080", "origin": "http://127.0.0.1:8080"})) is LOOPBACK_USER
    for headers in ({"host": "evil.example:8080"}, {"host": "127.0.0.1:9999"}, {},
                    {"host": "127.0.0.1:8080", "origin": "http://evil.example"},
                    {"host": "127.0.0.1:8080", "origin": "null"}):
        got = gate.identify(http_scope(headers))
        assert isinstance(got, Rejection) and got.status == 403 and "headway keys create" in got.message, headers
    assert loopback_problem("localhost", None, 80) is None
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1") and not is_loopback("example.com")


def test_gate_with_keys_needs_a_bearer_key_on_loopback_too() -> None:
    ring = KeyRing()
    key, rec = new_key("c", "invoke", NOW, deployments=("chat",))
    ring.add(rec)
    gate = AuthGate(ring, clock=lambda: NOW)
    local = {"host": "127.0.0.1:8080"}
    assert isinstance(gate.check(http_scope(local), "invoke"), Rejection)
    assert gate.check(http_scope({**local, "authorization": f"Bearer {key}"}), "invoke", "chat") == rec
    assert gate.check(http_scope({"host": "evil.example", "authorization": f"bearer {key}"}), "invoke") == rec
    denied = gate.check(http_scope({**local, "authorization": f"Bearer {key}"}), "deploy")
    assert isinstance(denied, Rejection) and denied.status == 403
    basic = gate.check(http_scope({**local, "authorization": "Basic dXNlcjpwdw=="}), "invoke")
    assert isinstance(basic, Rejection) and basic.status == 401 and "Bearer KEY" in basic.message


def test_redact_masks_secret_names_for_all_and_every_value_below_admin() -> None:
    spec = {"name": "chat", "env": {"HF_TOKEN": "t", "aws_secret_access_key": "s", "DB_PASSWORD": "p",
                                    "GCP_CREDENTIALS": "c", "MODE": "fast", "X": {"value": "v", "secret": True}}}
    assert redact(spec, True)["env"] == {"HF_TOKEN": "***", "aws_secret_access_key": "***", "DB_PASSWORD": "***",
                                         "GCP_CREDENTIALS": "***", "MODE": "fast",
                                         "X": {"value": "***", "secret": True}}
    assert [v for k, v in redact(spec, False)["env"].items() if k != "X"] == ["***"] * 5
    assert redact(spec, False)["env"]["X"] == {"value": "***", "secret": True}
    assert spec["env"]["HF_TOKEN"] == "t"                  # the stored spec is untouched
    assert redact({"name": "x"}, False) == {"name": "x"}


# ---- rate limits ------------------------------------------------------------------------------

def test_token_bucket_refills_at_its_rate_and_never_above_capacity() -> None:
    b = TokenBucket.per_minute(3, now=0.0)
    assert [b.take(1, 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take(1, 0.0) == pytest.approx(20.0)          # 3 a minute: one every 20 s
    assert b.take(1, 10.0) == pytest.approx(10.0)
    assert b.take(1, 20.0) == 0.0
    b.at, b.level = 20.0, 0.0
    assert b.wait_s(1, 1000.0) == 0.0 and b.level == 3.0    # capped at capacity
    b.charge(10, 1000.0)
    assert b.level == -7.0 and b.wait_s(1, 1000.0) == pytest.approx(160.0)


def test_key_limits_count_requests_and_charged_tokens() -> None:
    limits = KeyLimits()
    assert limits.admit("k", None, None, 0.0) is None      # no limits: nothing kept
    assert limits.buckets == {}
    assert [limits.admit("k", 3, None, 0.0) for _ in range(4)] == [None, None, None, 20]
    assert limits.admit("t", None, 100, 0.0) is None
    limits.charge("t", 130, 0.1)
    assert limits.admit("t", None, 100, 0.1) == 19          # -30 tokens: 31 to earn back at 100/min
    assert limits.admit("t", None, 100, 20.0) is None


def test_gate_rate_limit_answers_429_with_retry_after() -> None:
    now = [NOW]
    gate = AuthGate(KeyRing(), clock=lambda: now[0])
    _, rec = new_key("c", "invoke", NOW, rpm=2)
    assert gate.admit(rec) is None and gate.admit(rec) is None
    refused = gate.admit(rec)
    assert refused is not None and refused.status == 429 and refused.retry_after == 30
    assert "2 requests per minute" in refused.message
    now[0] += 30
    assert gate.admit(rec) is None


def test_token_counting() -> None:
    assert usage_tokens(b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}') == 7
    assert usage_tokens(b"data: {}") is None and usage_tokens(b'{"a": 1}') is None
    assert estimate_tokens(b'{"max_tokens": 10, "prompt": "abcd"}') == 10 + 36 // 4
    assert estimate_tokens(b"{}") == 256


# ---- the control API in process: a bounded fuzz of its OpenAPI schema -------------------------

class NoProvider:
    """Starts nothing: the fuzz never runs the manager loop, so no replica is ever asked for."""
    name = "none"

    def close(self) -> None:
        pass


def test_control_api_fuzz_has_no_server_errors(tmp_path: Path) -> None:
    import hypothesis
    import schemathesis

    from headway.infra.fleet.control import ControlPlane

    store = Store(tmp_path / "state" / "headway.db")
    key, rec = new_key("fuzz", "admin", time.time())
    store.put_key(rec)
    store.close()
    plane = ControlPlane(tmp_path / "state", NoProvider())  # type: ignore[arg-type]
    auth = {"authorization": f"Bearer {key}"}
    schema = schemathesis.openapi.from_asgi("/headway/control/openapi.json", plane.api, headers=auth)
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {f"{o.method.upper()} {o.path}" for o in operations} >= {
        "GET /headway/control/deployments", "POST /headway/control/deployments", "POST /headway/control/keys",
        "POST /headway/control/deployments/{name}/scale", "DELETE /headway/control/keys/{key_id}"}
    started = time.monotonic()
    seen: list[int] = []
    for op in operations:
        if op.path.endswith("/shutdown"):
            continue                                       # would SIGTERM this process

        @hypothesis.settings(max_examples=15, deadline=None, database=None, derandomize=True,
                             suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.given(case=op.as_strategy())
        def fuzz(case: Any) -> None:
            response = case.call(headers=auth)
            seen.append(response.status_code)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text)
            assert "error" in response.json() or response.status_code < 400, response.text

        fuzz()
    assert time.monotonic() - started < 60 and len(seen) > 50
    # and, outside the schema: a wrong content type, an oversized body, an unknown path, no key
    from starlette.testclient import TestClient

    client = TestClient(plane.api)
    r = client.post("/headway/control/deployments", content=b"name=x", headers={**auth, "content-type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    r = client.post("/headway/control/deployments", content=b"[" + b"0," * 600_000 + b"0]",
                    headers={**auth, "content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    r = client.get("/headway/control/nothing", headers=auth)
    assert r.status_code == 404 and "no such control endpoint" in r.json()["error"]["message"]
    assert client.get("/headway/control/openapi.json").status_code == 401
    r = client.post("/headway/control/deployments/x/scale", json={"replicas": True}, headers=auth)
    assert r.status_code == 400 and "replicas" in r.json()["error"]["message"]


def test_router_websocket_needs_an_invoke_key_for_its_deployment() -> None:
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    from headway.infra.router.proxy import RouterApp
    from headway.infra.router.replicas import ReplicaSet

    ring = KeyRing()
    other_key, other = new_key("o", "invoke", NOW, deployments=("other",))
    ring.add(other)
    app = RouterApp(ReplicaSet([]), gate=AuthGate(ring))
    app.replicas.managed.add("chat")
    client = TestClient(app)
    for headers, reason in (({}, "401 missing_api_key"), ({"authorization": f"Bearer {other_key}"},
                                                         "403 permission_denied")):
        with pytest.raises(WebSocketDisconnect) as info:
            with client.websocket_connect("/v1/models/chat/ws", headers=headers):
                pass
        assert (info.value.code, info.value.reason) == (1008, reason)
