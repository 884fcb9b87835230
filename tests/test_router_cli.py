"""`headway route` argument checks and how requests are read (no processes)."""

from __future__ import annotations

import json

import typer
from typer.testing import CliRunner

from headway.infra.router.cli import route
from headway.infra.router.extract import model_from_path, parse_body, prompt_of


def invoke(*args: str) -> tuple[int, str]:
    app = typer.Typer()
    app.command()(route)
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_route_rejects_bad_arguments_with_what_is_allowed() -> None:
    code, out = invoke("--replica", "http://127.0.0.1:1", "--policy", "fastest")
    assert code == 2 and "unknown policy 'fastest'" in out and "predicted-latency" in out
    code, out = invoke("--replica", "127.0.0.1:1")
    assert code == 2 and "must start with http://" in out
    code, out = invoke("--replica", "http://a:1", "--region", "eu-west")
    assert code == 2 and "URL=REGION" in out
    code, out = invoke("--replica", "http://a:1", "--max-in-flight", "0")
    assert code == 2 and "--max-in-flight must be >= 1" in out
    code, out = invoke("--replica", "http://a:1", "--replica", "http://a:1/")
    assert code == 2 and "once" in out
    code, out = invoke("--replica", "http://a:1", "--deployment-policy", "smol=fastest")
    assert code == 2 and "DEPLOYMENT=NAME" in out and "cache-aware" in out
    code, out = invoke()
    assert code == 2 and "--replica" in out


def test_deployment_from_path() -> None:
    assert model_from_path("/v1/models/text-classifier:predict") == "text-classifier"
    assert model_from_path("/v1/models/story/schema") == "story"
    assert model_from_path("/v1/models/") is None
    assert model_from_path("/v1/chat/completions") is None


def test_prompt_extraction() -> None:
    chat = parse_body(b'{"model": "m", "messages": [{"role": "system", "content": "Be brief."}, '
                      b'{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}')
    assert prompt_of(chat) == ("system:Be brief.\nuser:Hi\n", None)
    assert prompt_of(parse_body(b'{"prompt": "Once upon"}')) == ("Once upon", None)
    assert prompt_of(parse_body(b'{"prompt": [1, 2, 3]}')) == ("", (1, 2, 3))
    assert prompt_of(parse_body(b'{"prompt": ["a", "b"]}')) == ("a", None)
    assert parse_body(b"not json") is None and parse_body(b"[1]") is None and parse_body(b"") is None


def test_replica_state_resolution_and_leases() -> None:
    import pytest

    from headway.infra.router.replicas import Replica, ReplicaSet

    a, b = Replica("http://a:1"), Replica("http://b:1", limit_override=1)
    rs = ReplicaSet([a, b])
    a.apply_state({"ready": True, "runtime": "llm", "model": "smol", "max_concurrency": 2, "queued": 1,
                   "in_flight": 2, "adapters": ["sql"], "aliases": ["smollm2"], "kv": {"total_tokens": 100, "used_tokens": 60,
                   "evictable_tokens": 10}, "prefix_digest": {"block_tokens": 64, "hashes": ["ab", "cd"]},
                   "prefill_tokens_per_s": 1850.5}, 0.002)
    b.apply_state({"ready": True, "model": "smol", "max_concurrency": 8, "prefill_tokens_per_s": None}, 0.004)
    a.healthy = b.healthy = True
    assert rs.resolve("smol") == ("smol", None) and rs.resolve("smollm2") == ("smol", None)
    assert rs.resolve("sql") == ("smol", "sql") and rs.resolve("gpt") is None
    v = a.view()
    assert (v.queued, v.max_concurrency, v.kv_free_tokens, v.digest) == (1, 2, 50, frozenset({"ab", "cd"}))
    assert (v.prefill_tokens_per_s, b.view().prefill_tokens_per_s) == (1850.5, None)
    assert v.load == 2                                   # the published count: other clients' requests too
    rs.acquire(a.url), rs.acquire(a.url), rs.acquire(a.url)
    assert a.view().load == 3                            # this router's own, fresher count; never summed
    for _ in range(3):
        rs.release(a, ok=True)
    assert b.limit == 1                                  # --max-in-flight overrides the published 8
    lease = rs.acquire(b.url)
    assert [r.url for r in rs.eligible("smol", set())] == [a.url]   # b is at its limit
    rs.release(lease, ok=True)
    rs.check()
    with pytest.raises(AssertionError, match="negative"):
        rs.release(lease, ok=True)
    rs.failed(a, "connection refused", down=True)
    assert a.ejected and not a.usable()


def test_default_policy_per_deployment() -> None:
    from headway.infra.router.metrics import RouterMetrics
    from headway.infra.router.replicas import Replica, ReplicaSet
    from headway.infra.router.upstream import Forwarder, RouterConfig

    llm, clf = Replica("http://llm:1"), Replica("http://clf:1")
    llm.apply_state({"ready": True, "runtime": "llm", "model": "smol", "region": "eu"}, 0.001)
    clf.apply_state({"ready": True, "runtime": "custom", "model": "clf"}, 0.001)
    replicas = ReplicaSet([llm, clf])
    fwd = Forwarder(replicas, RouterMetrics(), RouterConfig())
    assert fwd.policy_for("smol").name == "predicted-latency" and fwd.policy_for("clf").name == "least-load"
    assert fwd.policy_for("smol") is fwd.policy_for("smol")          # one policy object per deployment
    assert Forwarder(replicas, RouterMetrics(), RouterConfig(policy="geo")).policy_for("smol").name == "geo"
    own = Forwarder(replicas, RouterMetrics(), RouterConfig(policy="geo", deployment_policies={"clf": "round-robin"}))
    assert own.policy_for("clf").name == "round-robin" and own.policy_for("smol").name == "geo"
    assert llm.view().region == "eu"


def test_router_tokenizes_prompts_as_the_replica_does() -> None:
    """With a deployment's tokenizer, the router routes on the exact prompt token ids the replica
    computes (so published prefix digests match exactly); without one, or where the replica's
    ids cannot be known (a cache salt, a model without a chat template), it keeps the text."""
    from headway.infra.router.proxy import RouterApp
    from headway.infra.router.replicas import Replica, ReplicaSet
    from headway.infra.router.tokenize import load_prompt_tokenizer
    from headway.infra.router.upstream import RouterConfig
    from headway.library import resolve
    from headway.tokenization import ModelTokenizer

    path = resolve("tinycoder-test", install=False, progress=False).path
    replica = Replica("http://tiny:1")
    replica.apply_state({"ready": True, "runtime": "llm", "model": "tinycoder-test"}, 0.001)
    replica.healthy = True
    tok = load_prompt_tokenizer("tinycoder-test")
    app = RouterApp(ReplicaSet([replica]), RouterConfig(tokenizers={"tinycoder-test": tok}))
    body = json.dumps({"model": "tinycoder-test", "prompt": "def add(a, b): return a + b"}).encode()
    req = app.route_request("/v1/completions", body, [])
    assert not isinstance(req, str)
    assert req.token_ids == tuple(ModelTokenizer(path).encode("def add(a, b): return a + b"))
    assert req.prompt == "def add(a, b): return a + b"
    salted = json.dumps({"model": "tinycoder-test", "prompt": "x y", "cache_salt": "t1"}).encode()
    chat = json.dumps({"model": "tinycoder-test", "messages": [{"role": "user", "content": "hi"}]}).encode()
    for raw in (salted, chat):  # tinycoder has no chat template: the replica will refuse; keep the text
        r = app.route_request("/v1/completions", raw, [])
        assert not isinstance(r, str) and r.token_ids is None and r.prompt
    plain = RouterApp(ReplicaSet([replica]), RouterConfig()).route_request("/v1/completions", body, [])
    assert not isinstance(plain, str) and plain.token_ids is None
    code, out = invoke("--replica", "http://a:1", "--tokenizer", "tinycoder-test=/nowhere/at/all")
    assert code == 2 and "cannot load a tokenizer" in out
