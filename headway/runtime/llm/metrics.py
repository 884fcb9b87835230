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
        self.lora_requests = Counter("headway_llm_lora_requests", "Requests by LoRA adapter.", ["model", "adapter"],
                                     registry=r)
        self.lora_loads = Counter("headway_llm_lora_loads", "LoRA adapters made resident.", m, registry=r).labels(model)
        self.lora_evictions = Counter("headway_llm_lora_evictions", "LoRA adapters evicted from memory.", m,
                                      registry=r).labels(model)
        self.model = model

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
