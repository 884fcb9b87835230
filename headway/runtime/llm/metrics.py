"""Prometheus metrics of the LLM engine (TTFT, ITL, end-to-end, throughput, KV, prefix cache)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256)


class EngineMetrics:
    """Written by the engine thread, read by /metrics (prometheus_client is thread-safe)."""

    def __init__(self, model: str):
        r = self.registry = CollectorRegistry()
        self._prefix_seen = (0, 0)  # the KV manager's (hit, query) prompt tokens already counted
        m = ["model"]
        self.ttft = Histogram("headway_llm_time_to_first_token_seconds", "Arrival to first output token.", m,
                              buckets=TTFT_BUCKETS, registry=r).labels(model)
        self.itl = Histogram("headway_llm_inter_token_latency_seconds", "Time between output tokens.", m,
                             buckets=ITL_BUCKETS, registry=r).labels(model)
        self.e2e = Histogram("headway_llm_e2e_request_latency_seconds", "Arrival to last token.", m,
                             buckets=E2E_BUCKETS, registry=r).labels(model)
        self.prompt_tokens = Counter("headway_llm_prompt_tokens", "Prompt tokens received.", m,
                                     registry=r).labels(model)
        self.generation_tokens = Counter("headway_llm_generation_tokens", "Output tokens generated.", m,
                                         registry=r).labels(model)
        self.computed_tokens = Counter("headway_llm_computed_prefill_tokens",
                                       "Prompt tokens computed (not served from the prefix cache).", m,
                                       registry=r).labels(model)
        self.cache_hit_tokens = Counter("headway_llm_prefix_cache_hit_tokens", "Prompt tokens found cached.", m,
                                        registry=r).labels(model)
        self.cache_query_tokens = Counter("headway_llm_prefix_cache_query_tokens",
                                          "Prompt tokens looked up in the prefix cache.", m, registry=r).labels(model)
        self.preemptions = Counter("headway_llm_preemptions", "Sequences preempted for lack of KV slots.", m,
                                   registry=r).labels(model)
        self.requests = Counter("headway_llm_requests_finished", "Finished sequences by reason.",
                                ["model", "reason"], registry=r)
        self.running = Gauge("headway_llm_running_sequences", "Sequences in the running batch.", m,
                             registry=r).labels(model)
        self.waiting = Gauge("headway_llm_waiting_sequences", "Sequences waiting for admission.", m,
                             registry=r).labels(model)
        self.kv_usage = Gauge("headway_llm_kv_usage_ratio",
                              "Fraction of KV slots held by running sequences (evictable cached prefixes not counted).",
                              m, registry=r).labels(model)
        self.cache_hit_rate = Gauge("headway_llm_prefix_cache_hit_rate",
                                    "Cached prompt tokens / prompt tokens looked up (once per request), since start.", m,
                                    registry=r).labels(model)
        self.tokens_per_s = Gauge("headway_llm_generation_tokens_per_second",
                                  "Output tokens per second over the last few seconds.", m, registry=r).labels(model)
        self.spec_proposed = Counter("headway_llm_spec_proposed_tokens", "Tokens proposed by speculative decoding.",
                                     m, registry=r).labels(model)
        self.spec_accepted = Counter("headway_llm_spec_accepted_tokens",
                                     "Proposed tokens the target accepted (speculative decoding).", m,
                                     registry=r).labels(model)
        self.spec_verified = Counter("headway_llm_spec_verified_sequences",
                                     "Sequence-steps whose proposal the target verified.", m, registry=r).labels(model)
        self.spec_acceptance = Gauge("headway_llm_spec_acceptance_rate",
                                     "Accepted / proposed tokens since start (speculative decoding).", m,
                                     registry=r).labels(model)
        self.spec_mean_accepted = Gauge("headway_llm_spec_mean_accepted_length",
                                        "Accepted tokens per verified sequence-step since start.", m,
                                        registry=r).labels(model)
        self.lora_requests = Counter("headway_llm_lora_requests", "Requests by LoRA adapter.", ["model", "adapter"],
                                     registry=r)
        self.lora_loads = Counter("headway_llm_lora_loads", "LoRA adapters made resident.", m, registry=r).labels(model)
        self.lora_evictions = Counter("headway_llm_lora_evictions", "LoRA adapters evicted from memory.", m,
                                      registry=r).labels(model)
        self.model = model

    def speculation(self, proposed: int, accepted: int, verified: int, rate: float, mean_len: float) -> None:
        self.spec_proposed.inc(proposed)
        self.spec_accepted.inc(accepted)
        self.spec_verified.inc(verified)
        self.spec_acceptance.set(rate)
        self.spec_mean_accepted.set(mean_len)

    def observe_prefix_cache(self, hit_tokens: int, query_tokens: int) -> None:
        """The prefix-cache counters (kept once, by the KV manager), as deltas since the last call."""
        seen = self._prefix_seen
        if hit_tokens > seen[0]:
            self.cache_hit_tokens.inc(hit_tokens - seen[0])
        if query_tokens > seen[1]:
            self.cache_query_tokens.inc(query_tokens - seen[1])
        self._prefix_seen = (hit_tokens, query_tokens)

    def observe_offload(self, stats: dict[str, float | int]) -> None:
        """The KV offload tier's counters (kv_offload.KVOffloadTier.stats), as deltas since the last call."""
        if not hasattr(self, "_offload_seen"):
            r, m = self.registry, ["model"]
            self._offload_seen: dict[str, float | int] = {}
            self._offload_counters = {
                name: Counter(f"headway_llm_kv_offload_{name}", help, m, registry=r).labels(self.model)
                for name, help in (
                    ("offloaded_tokens", "Tokens whose K/V moved from the main KV pool to the host tier on eviction."),
                    ("restored_tokens", "Prompt tokens restored from the host tier instead of recomputed (hits)."),
                    ("missed_tokens", "Prompt tokens past the main-cache match not found in the host tier (misses)."),
                    ("dropped_tokens", "Tokens the host tier's own LRU eviction dropped."))}
            self._offload_gauges = {
                name: Gauge(f"headway_llm_kv_offload_{name}", help, m, registry=r).labels(self.model)
                for name, help in (("capacity_tokens", "Host tier capacity in tokens."),
                                   ("used_tokens", "Tokens held in the host tier."),
                                   ("hit_rate", "Restored / looked-up prompt tokens in the host tier, since start."))}
        for name, c in self._offload_counters.items():
            delta = stats[name] - self._offload_seen.get(name, 0)
            if delta > 0:
                c.inc(delta)
            self._offload_seen[name] = stats[name]
        for name, g in self._offload_gauges.items():
            g.set(stats[name])

    def lora_event(self, event: str, adapter: str) -> None:
        if event == "request":
            self.lora_requests.labels(self.model, adapter).inc()
        elif event == "load":
            self.lora_loads.inc()
        elif event == "evict":
            self.lora_evictions.inc()

    def finished(self, reason: str) -> None:
        self.requests.labels(self.model, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
