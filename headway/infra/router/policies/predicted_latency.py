"""Predicted latency (the default for LLMs): one score trading cache affinity against load.

For each replica, predicted time to first token = queueing delay expected + prefill time needed:
    queue_s   = load / max_concurrency * service_s
    prefill_s = (prefill ahead of it + prompt tokens - tokens it likely caches) / prefill rate
"Prefill ahead of it" is what this router sent the replica and has not seen a first byte of yet:
the uncached prompt tokens of those requests, which a continuous-batching engine prefills before
(or alongside) the new one. The prefill rate is the replica's own, as it publishes it (measured
by its engine); a replica that has not measured one yet gets the median of those that have,
else `prefill_tokens_per_s`. `service_s` is an EWMA of observed request durations
for the deployment (`default_service_s` until one finishes). The lowest score wins; scores within
`tie_fraction` of the best tie and one of them is drawn at random, so a burst does not herd onto
one replica.
"""

from __future__ import annotations

from collections.abc import Sequence

from headway.infra.router.policies.affinity import PrefixAffinity
from headway.infra.router.policies.base import PolicyBase
from headway.infra.router.types import ReplicaId, ReplicaView, RouteEvent, RouteRequest, require


class PredictedLatency(PolicyBase):
    name = "predicted-latency"
    AFFINITY_MIN_TOKENS = 32  # a decision counts as cache affinity from this many matched tokens

    def __init__(self, seed: int = 0, prefill_tokens_per_s: float = 2000.0, default_service_s: float = 1.0,
                 ewma_alpha: float = 0.2, tie_fraction: float = 0.02, chars_per_token: float = 4.0):
        super().__init__(seed)
        if prefill_tokens_per_s <= 0 or default_service_s <= 0 or not 0 < ewma_alpha <= 1:
            raise ValueError("prefill_tokens_per_s and default_service_s must be > 0 and ewma_alpha in (0, 1]")
        self.prefill_tokens_per_s = prefill_tokens_per_s
        self.default_service_s = default_service_s
        self.alpha = ewma_alpha
        self.tie_fraction = tie_fraction
        self.affinity = PrefixAffinity(chars_per_token)
        self.service_s: dict[str, float] = {}
        # prefill routed and not yet answered: replica -> uncached prompt tokens; per request the part it added
        self.outstanding: dict[str, int] = {}
        self._pending: dict[int, tuple[str, int]] = {}
        self._uncached: dict[int, dict[str, int]] = {}    # request -> replica -> uncached tokens, from choose()

    def scores(self, req: RouteRequest, replicas: Sequence[ReplicaView]) -> dict[str, float]:
        """Predicted seconds to first token on each replica."""
        return self._scores(req, replicas, self.affinity.matched_tokens(req, replicas))

    def _scores(self, req: RouteRequest, replicas: Sequence[ReplicaView], matched: dict[str, int]) -> dict[str, float]:
        total = self.affinity.prompt_tokens(req)
        service = self.service_s.get(req.deployment, self.default_service_s)
        published = sorted(r.prefill_tokens_per_s for r in replicas if r.prefill_tokens_per_s)
        fallback = published[len(published) // 2] if published else self.prefill_tokens_per_s
        out = {}
        for r in replicas:
            rate = r.prefill_tokens_per_s or fallback
            ahead = self.outstanding.get(r.id, 0)
            out[r.id] = r.load / max(1, r.max_concurrency) * service + (ahead + max(0, total - matched[r.id])) / rate
        return out

    def choose(self, req: RouteRequest, replicas: Sequence[ReplicaView], now: float) -> ReplicaId:
        require(replicas)
        matched = self.affinity.matched_tokens(req, replicas)
        total = self.affinity.prompt_tokens(req)
        self._uncached[req.request_id] = {r.id: max(0, total - matched[r.id]) for r in replicas}
        if len(self._uncached) > 10_000:          # choices never started (the proxy gave up): forget the oldest
            self._uncached.pop(next(iter(self._uncached)))
        scores = self._scores(req, replicas, matched)
        best = min(scores.values())
        chosen = self.pick_min(replicas, lambda r: scores[r.id], tolerance=max(1e-9, best * self.tie_fraction))
        # "affinity" only for a real shared prefix: every chat prompt shares its first role tag
        self.stats.note("affinity" if matched[chosen.id] >= self.AFFINITY_MIN_TOKENS else "load")
        return chosen.id

    def forget(self, replica: ReplicaId) -> None:
        self.affinity.forget(replica)

    def observe(self, event: RouteEvent) -> None:
        rid = event.request.request_id
        if event.kind == "started":
            self.affinity.record(event.request, event.replica, event.at)
            tokens = self._uncached.pop(rid, {}).get(event.replica, 0)
            self._settle(rid)                      # a retry: the earlier attempt's share is gone
            self._pending[rid] = (event.replica, tokens)
            self.outstanding[event.replica] = self.outstanding.get(event.replica, 0) + tokens
            return
        self._settle(rid)                          # first byte, failed or finished: its prefill is done
        if event.kind == "finished" and event.duration_s > 0:
            dep = event.request.deployment
            old = self.service_s.get(dep)
            self.service_s[dep] = event.duration_s if old is None else old + self.alpha * (event.duration_s - old)

    def _settle(self, request_id: int) -> None:
        pending = self._pending.pop(request_id, None)
        if pending is not None:
            replica, tokens = pending
            left = self.outstanding.get(replica, 0) - tokens
            assert left >= 0, f"outstanding prefill of {replica} went negative"
            if left:
                self.outstanding[replica] = left
            else:
                self.outstanding.pop(replica, None)
