"""Routing policies as pure objects: state and time in, decision out (no processes, no I/O)."""

from __future__ import annotations

import hashlib
import struct
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from headway.infra.router.digest import cached_prefix_tokens, chain_hashes
from headway.infra.router.policies import POLICIES, make_policy
from headway.infra.router.policies.adapter_aware import AdapterAware
from headway.infra.router.policies.cache_aware import CacheAware
from headway.infra.router.policies.geo import GeoAware
from headway.infra.router.policies.least_load import LeastLoad
from headway.infra.router.policies.predicted_latency import PredictedLatency
from headway.infra.router.policies.round_robin import RoundRobin
from headway.infra.router.prefix_tree import PrefixTree
from headway.infra.router.types import NoReplica, ReplicaView, RouteEvent, RouteRequest


def views(*loads: int, conc: int = 8, **kw: object) -> list[ReplicaView]:
    return [ReplicaView(f"r{i}", in_flight=n, max_concurrency=conc, **kw) for i, n in enumerate(loads)]  # type: ignore[arg-type]


def send(policy: object, req: RouteRequest, replicas: list[ReplicaView], now: float = 0.0) -> str:
    """choose + the 'started' and 'first_byte' events the proxy sends after it."""
    rid = policy.choose(req, replicas, now)  # type: ignore[attr-defined]
    policy.observe(RouteEvent("started", rid, now, req))  # type: ignore[attr-defined]
    policy.observe(RouteEvent("first_byte", rid, now, req))  # type: ignore[attr-defined]
    return rid


# --- digest -------------------------------------------------------------------------------------

def test_chain_hashes_match_the_documented_recipe() -> None:
    ids = list(range(130))  # two full blocks of 64, 2 tokens left over (not hashed)
    h0 = hashlib.sha256(b"" + struct.pack("<64i", *ids[:64])).hexdigest()[:16]
    h1 = hashlib.sha256(h0.encode() + struct.pack("<64i", *ids[64:128])).hexdigest()[:16]
    assert chain_hashes(ids) == [h0, h1]
    assert chain_hashes(ids[:63]) == []
    # chaining: a different first block changes every later hash
    other = chain_hashes([999] + ids[1:])
    assert other[0] != h0 and other[1] != h1
    assert chain_hashes(ids, block_tokens=2)[:1] == [hashlib.sha256(struct.pack("<2i", 0, 1)).hexdigest()[:16]]


def test_cached_prefix_tokens_counts_leading_blocks_only() -> None:
    ids = list(range(256))
    hashes = chain_hashes(ids)
    assert cached_prefix_tokens(ids, set(hashes)) == 256
    assert cached_prefix_tokens(ids, {hashes[0], hashes[2]}) == 64   # block 1 missing: the chain stops
    assert cached_prefix_tokens(ids, set()) == 0


def test_chain_hashes_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="block_tokens"):
        chain_hashes([1, 2], block_tokens=0)
    with pytest.raises(ValueError, match="int32"):
        chain_hashes([2**40, 1], block_tokens=2)


# --- prefix tree --------------------------------------------------------------------------------

def test_prefix_tree_matches_per_tenant_and_splits_edges() -> None:
    t = PrefixTree()
    t.insert("hello world", "a", 1.0)
    t.insert("hello there", "b", 2.0)
    assert t.match("hello world, again") == {"a": 11, "b": 6}
    assert t.match("help") == {"a": 3, "b": 3}
    assert t.match("xyz") == {"a": 0, "b": 0}
    t.check()
    assert t.chars == {"a": 11, "b": 11}


def test_prefix_tree_evicts_least_recently_used_leaves_first() -> None:
    t = PrefixTree(max_chars_per_tenant=30)
    t.insert("aaaaaaaaaa-old", "a", 1.0)
    t.insert("bbbbbbbbbb-new", "a", 2.0)
    t.insert("cccccccccc-newest", "a", 3.0)   # 45 chars > 30: evict down to 27 (90 %), oldest first
    t.check()
    assert t.chars["a"] <= 27
    m = t.match("aaaaaaaaaa-old")
    assert m.get("a", 0) == 0
    assert t.match("cccccccccc-newest")["a"] == 17
    t.remove_tenant("a")
    t.check()
    assert "a" not in t.match("cccccccccc-newest")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.text(alphabet="abc", min_size=1, max_size=8), st.sampled_from(["x", "y"])), max_size=12),
       st.text(alphabet="abc", max_size=8))
def test_prefix_tree_match_equals_brute_force(inserts: list[tuple[str, str]], query: str) -> None:
    t = PrefixTree()
    for i, (text, tenant) in enumerate(inserts):
        t.insert(text, tenant, float(i))
    t.check()

    def lcp(a: str, b: str) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    expected = {ten: max(lcp(text, query) for text, tt in inserts if tt == ten) for _, ten in inserts}
    got = t.match(query)
    assert {k: v for k, v in got.items() if k in expected} == expected


# --- simple policies ----------------------------------------------------------------------------

def test_round_robin_takes_turns_per_deployment() -> None:
    p = RoundRobin()
    rs = views(0, 0, 0)
    assert [p.choose(RouteRequest("d"), rs, 0) for _ in range(6)] == ["r0", "r1", "r2", "r0", "r1", "r2"]
    assert p.choose(RouteRequest("other"), rs, 0) == "r0"


def test_least_load_never_picks_the_busiest_and_spreads_ties() -> None:
    p = LeastLoad(seed=1)
    rs = views(0, 5, 10)
    picks = Counter(p.choose(RouteRequest("d"), rs, 0) for _ in range(300))
    assert picks["r2"] == 0 and picks["r0"] > picks["r1"] > 0
    equal = Counter(p.choose(RouteRequest("d"), views(3, 3, 3), 0) for _ in range(300))
    assert set(equal) == {"r0", "r1", "r2"} and min(equal.values()) > 60   # random ties, no herd


def test_policies_are_deterministic_for_a_seed() -> None:
    for name in POLICIES:
        a, b = make_policy(name, seed=7), make_policy(name, seed=7)
        reqs = [RouteRequest("d", i, prompt=f"p{i % 3}" * 50, adapter="ad" if i % 2 else None) for i in range(40)]
        rs = views(1, 1, 1, 1)
        assert [send(a, r, rs, i) for i, r in enumerate(reqs)] == [send(b, r, rs, i) for i, r in enumerate(reqs)], name


def test_unknown_policy_and_empty_candidates_fail_clearly() -> None:
    with pytest.raises(ValueError, match="unknown routing policy 'fastest'.*round-robin"):
        make_policy("fastest")
    with pytest.raises(NoReplica):
        LeastLoad().choose(RouteRequest("d"), [], 0)


# --- cache-aware --------------------------------------------------------------------------------

SYSTEM = "You are a careful assistant for the billing team. " * 20


def test_cache_aware_follows_the_prefix() -> None:
    p = CacheAware(seed=3)
    rs = views(0, 0, 0)
    first = send(p, RouteRequest("d", prompt=SYSTEM + "question one"), rs)
    for i in range(10):
        assert send(p, RouteRequest("d", prompt=SYSTEM + f"question {i}"), rs) == first
    assert p.stats.reasons["affinity"] == 10


def test_cache_aware_balances_when_load_is_imbalanced() -> None:
    p = CacheAware(seed=3, balance_abs=4, balance_rel=1.5)
    rs = views(0, 0)
    owner = send(p, RouteRequest("d", prompt=SYSTEM), rs)
    loaded = [ReplicaView(r.id, in_flight=10 if r.id == owner else 0, max_concurrency=8) for r in rs]
    assert p.choose(RouteRequest("d", prompt=SYSTEM), loaded, 1) != owner
    assert p.stats.last_reason == "balance"


def test_cache_aware_spreads_new_prompts_without_herding() -> None:
    p = CacheAware(seed=5)
    picks = Counter(p.choose(RouteRequest("d", prompt=f"unrelated prompt {i} " * 10), views(0, 0, 0), 0)
                    for i in range(150))
    assert set(picks) == {"r0", "r1", "r2"} and min(picks.values()) > 25


def test_cache_aware_uses_published_digests() -> None:
    ids = tuple(range(1000, 1256))      # 4 blocks of 64
    digest = frozenset(chain_hashes(ids[:192]))   # replica r1 holds 3 of them
    rs = [ReplicaView("r0", max_concurrency=8, digest=frozenset()),
          ReplicaView("r1", max_concurrency=8, digest=digest)]
    p = CacheAware(seed=0)
    assert p.choose(RouteRequest("d", token_ids=ids), rs, 0) == "r1"
    assert p.stats.last_reason == "affinity"


def test_adapter_requests_match_only_the_adapters_own_cache() -> None:
    """An adapter's prefix cache is isolated on the replica: the digest chain of an adapter request
    starts from the root the replica publishes for that adapter, and the tree keys it apart."""
    ids = tuple(range(2000, 2256))
    root_a = "a" * 16
    base = frozenset(chain_hashes(ids))                  # r0 cached the prompt for the base model
    under_a = frozenset(chain_hashes(ids, root=root_a))  # r1 cached it under adapter a
    assert base.isdisjoint(under_a)
    rs = [ReplicaView("r0", max_concurrency=8, digest=base, adapters=frozenset({"a"}), digest_roots=(("a", "b" * 16),)),
          ReplicaView("r1", max_concurrency=8, digest=under_a, adapters=frozenset({"a"}), digest_roots=(("a", root_a),)),
          ReplicaView("r2", max_concurrency=8, digest=base | under_a, adapters=frozenset({"a"}))]  # publishes no root
    p = CacheAware(seed=0)
    assert p.affinity.matched_tokens(RouteRequest("d", token_ids=ids, adapter="a"), rs) == {"r0": 0, "r1": 256, "r2": 0}
    assert p.affinity.matched_tokens(RouteRequest("d", token_ids=ids), rs) == {"r0": 256, "r1": 0, "r2": 256}
    # the approximate tree: a prompt sent for the base model does not count for an adapter, and back
    q = CacheAware(seed=0)
    two = views(0, 0)
    owner = send(q, RouteRequest("d", prompt=SYSTEM), two)
    assert q.affinity.matched_tokens(RouteRequest("d", prompt=SYSTEM), two)[owner] > 100
    assert q.affinity.matched_tokens(RouteRequest("d", prompt=SYSTEM, adapter="a"), two) == {"r0": 0, "r1": 0}
    a_owner = send(q, RouteRequest("d", prompt=SYSTEM, adapter="a"), two)
    assert q.affinity.matched_tokens(RouteRequest("d", prompt=SYSTEM, adapter="a"), two)[a_owner] > 100
    assert q.affinity.matched_tokens(RouteRequest("d", prompt=SYSTEM, adapter="b"), two) == {"r0": 0, "r1": 0}


def test_digest_corrects_the_approximate_tree() -> None:
    p = CacheAware(seed=0)
    rs = views(0, 0)
    owner = send(p, RouteRequest("d", prompt=SYSTEM), rs)
    assert p.affinity.tree.chars[owner] == len(SYSTEM)
    # the owner now publishes an empty cache (it restarted): the tree may credit it one block at most
    flushed = [ReplicaView(r.id, max_concurrency=8, digest=frozenset() if r.id == owner else None) for r in rs]
    p.choose(RouteRequest("d", prompt="x"), flushed, 1)
    assert p.affinity.tree.chars[owner] <= 2 * 64 * 4
    p.affinity.tree.check()


# --- adapter-aware ------------------------------------------------------------------------------

def test_adapter_aware_prefers_replicas_with_the_adapter() -> None:
    p = AdapterAware(seed=0)
    rs = [ReplicaView("r0", in_flight=1, adapters=frozenset({"sql"})), ReplicaView("r1", in_flight=0),
          ReplicaView("r2", in_flight=2, adapters=frozenset({"sql"}))]
    assert p.choose(RouteRequest("d", adapter="sql"), rs, 0) == "r0"
    assert p.stats.last_reason == "affinity"


def test_adapter_aware_spreads_a_hot_adapter() -> None:
    p = AdapterAware(seed=0, hot_load=3)
    loads = {"r0": 0, "r1": 0, "r2": 0, "r3": 0}
    for i in range(12):   # a burst of one adapter; nobody finishes
        rs = [ReplicaView(k, in_flight=v, adapters=frozenset({"hot"}) if k == "r0" else frozenset()) for k, v in loads.items()]
        loads[p.choose(RouteRequest("d", i, adapter="hot"), rs, float(i))] += 1
    assert loads["r0"] >= 3                           # pinned until hot...
    assert sum(1 for v in loads.values() if v) >= 3   # ...then spread over several replicas
    assert max(loads.values()) - min(loads.values()) <= 4
    assert len(p.holders("hot", [ReplicaView(k) for k in loads], 12.0)) >= 3


# --- geo ----------------------------------------------------------------------------------------

def test_geo_stays_in_region_else_lowest_latency() -> None:
    p = GeoAware(seed=0)
    rs = [ReplicaView("eu1", in_flight=3, region="eu", latency_s=0.05), ReplicaView("eu2", in_flight=1, region="eu", latency_s=0.06),
          ReplicaView("us1", in_flight=0, region="us", latency_s=0.002)]
    assert p.choose(RouteRequest("d", region="eu"), rs, 0) == "eu2"
    assert p.choose(RouteRequest("d", region="ap"), rs, 0) == "us1"
    assert p.choose(RouteRequest("d"), rs, 0) == "us1"
    busy_us = [*rs[:2], ReplicaView("us1", in_flight=20, region="us", latency_s=0.002)]
    assert p.choose(RouteRequest("d"), busy_us, 0) == "eu2"   # 0.06 + 1*0.01 < 0.05 + 3*0.01 < 0.002 + 20*0.01


# --- predicted latency --------------------------------------------------------------------------

def test_predicted_latency_trades_cache_against_load() -> None:
    p = PredictedLatency(seed=0, prefill_tokens_per_s=1000, default_service_s=1.0)
    long_prompt = SYSTEM * 4                      # ~1000 tokens: 1 s of prefill saved on the owner
    owner = send(p, RouteRequest("d", prompt=long_prompt), views(0, 0))
    other = "r1" if owner == "r0" else "r0"
    light = [ReplicaView(owner, in_flight=2, max_concurrency=8), ReplicaView(other, in_flight=0, max_concurrency=8)]
    assert p.choose(RouteRequest("d", prompt=long_prompt + "q"), light, 1) == owner   # 0.25 s queue < 1 s prefill
    assert p.stats.last_reason == "affinity"
    heavy = [ReplicaView(owner, in_flight=16, max_concurrency=8), ReplicaView(other, in_flight=0, max_concurrency=8)]
    assert p.choose(RouteRequest("d", prompt=long_prompt + "q"), heavy, 2) == other   # 2 s queue > 1 s prefill
    assert p.stats.last_reason == "load"


def test_predicted_latency_counts_prefill_routed_but_not_yet_answered() -> None:
    p = PredictedLatency(seed=0, prefill_tokens_per_s=1000)
    rs = views(0, 0)
    long_req = RouteRequest("d", request_id=1, prompt="x" * 8000)          # ~2,000 tokens, 2 s of prefill
    first = p.choose(long_req, rs, 0)
    p.observe(RouteEvent("started", first, 0, long_req))
    assert p.outstanding == {first: 2000}
    other = "r1" if first == "r0" else "r0"
    short = RouteRequest("d", request_id=2, prompt="y" * 400)             # ~100 tokens
    assert p.choose(short, rs, 0) == other        # same load, but 2,000 tokens ahead of it on `first`
    p.observe(RouteEvent("started", other, 0, short))
    p.observe(RouteEvent("first_byte", first, 1, long_req, 1.0))          # the long prompt is prefilled
    assert p.outstanding == {other: 100}
    p.observe(RouteEvent("failed", other, 1, short, 1.0))
    assert p.outstanding == {}
    # a retry moves a request's share to the replica it is retried on
    again = RouteRequest("d", request_id=3, prompt="z" * 4000)
    p.choose(again, rs, 2)
    p.observe(RouteEvent("started", "r0", 2, again))
    p.choose(again, rs, 2)
    p.observe(RouteEvent("started", "r1", 2, again))
    assert p.outstanding == {"r1": 1000}


def test_predicted_latency_uses_each_replicas_published_prefill_rate() -> None:
    p = PredictedLatency(seed=0, prefill_tokens_per_s=1000)
    rs = [ReplicaView("slow", max_concurrency=8, prefill_tokens_per_s=500.0),
          ReplicaView("fast", max_concurrency=8, prefill_tokens_per_s=4000.0)]
    assert p.scores(RouteRequest("d", prompt="x" * 4000), rs) == {"slow": pytest.approx(2.0),
                                                                   "fast": pytest.approx(0.25)}
    assert {send(p, RouteRequest("d", request_id=i, prompt=f"{i}" * 4000), rs) for i in range(5)} == {"fast"}
    # a replica that has measured no rate yet gets the median of those that have, not the default
    unmeasured = [*rs, ReplicaView("new", max_concurrency=8)]
    assert p.scores(RouteRequest("d", prompt="x" * 4000), unmeasured)["new"] == pytest.approx(0.25)


def test_predicted_latency_learns_service_time() -> None:
    p = PredictedLatency(seed=0, ewma_alpha=0.5)
    req = RouteRequest("d")
    p.observe(RouteEvent("finished", "r0", 1.0, req, duration_s=2.0))
    p.observe(RouteEvent("finished", "r0", 2.0, req, duration_s=4.0))
    assert p.service_s["d"] == pytest.approx(3.0)
    assert p.scores(req, views(4, 0, conc=4)) == {"r0": pytest.approx(3.0), "r1": 0.0}


def test_predicted_latency_breaks_ties_randomly() -> None:
    p = PredictedLatency(seed=11)
    picks = Counter(p.choose(RouteRequest("d", prompt=f"new {i}"), views(1, 1, 1, 1), 0) for i in range(200))
    assert set(picks) == {"r0", "r1", "r2", "r3"} and min(picks.values()) > 25


def test_token_prompts_keep_affinity_when_digests_hash_differently() -> None:
    # a replica whose digest uses another hash recipe matches nothing exactly; the tree still holds
    foreign = frozenset({"00000000deadbeef"})
    rs = [ReplicaView("r0", max_concurrency=8, digest=foreign), ReplicaView("r1", max_concurrency=8, digest=foreign)]
    p = PredictedLatency(seed=2)
    shared = tuple(range(5000, 5600))
    owner = send(p, RouteRequest("d", token_ids=shared + (1, 2)), rs)
    for i in range(6):
        assert send(p, RouteRequest("d", token_ids=shared + (10 + i,)), rs) == owner
    assert p.affinity.matched_tokens(RouteRequest("d", token_ids=shared), rs)[owner] == 600
    # text and token prompts never match each other
    assert p.affinity.matched_tokens(RouteRequest("d", prompt="".join(map(chr, shared))), rs)[owner] == 0


@pytest.mark.parametrize("name", ["cache-aware", "predicted-latency"])
def test_a_replica_removed_from_the_router_leaves_the_prefix_tree(name: str) -> None:
    """Taking a replica out of the router's replica set drops its prefixes from every policy's
    tree, so a replica that comes back under the same URL (a new process, an empty cache) is not
    credited with what its predecessor held."""
    from headway.infra.router.metrics import RouterMetrics
    from headway.infra.router.replicas import Replica, ReplicaSet
    from headway.infra.router.upstream import Forwarder, RouterConfig

    a, b = Replica("http://a:1", deployment="smol"), Replica("http://b:1", deployment="smol")
    replicas = ReplicaSet([a, b])
    fwd = Forwarder(replicas, RouterMetrics(), RouterConfig(policy=name))
    policy = fwd.policy_for("smol")
    tree = policy.affinity.tree  # type: ignore[attr-defined]
    shared = "a long shared system prompt " * 40
    policy.observe(RouteEvent("started", a.url, 0.0, RouteRequest("smol", 1, prompt=shared + "first")))
    policy.observe(RouteEvent("started", b.url, 0.0, RouteRequest("smol", 2, prompt="something else entirely")))
    assert tree.match(shared + "next")[a.url] >= len(shared)        # a holds the prefix

    replicas.remove(a.url)
    assert a.url not in tree.chars and a.url not in tree.match(shared + "next")
    assert tree.match("something else entirely")[b.url] > 0        # the other replica keeps its own
    tree.check()
    back = replicas.add(Replica("http://a:1", deployment="smol"))   # same URL, fresh process
    matched = policy.affinity.matched_tokens(RouteRequest("smol", 3, prompt=shared + "next"),  # type: ignore[attr-defined]
                                             [back.view(), b.view()])
    assert matched[back.url] == 0
