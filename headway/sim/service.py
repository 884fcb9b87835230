"""How long a request takes on a replica that batches continuously.

Every request a replica holds decodes one token per engine step, and a step takes
    ITL(batch) = itl_base_s + itl_per_seq_s * batch
seconds, so all of a replica's requests advance together at a speed set by how many there
are (processor sharing in steps). A request's prompt is prefilled first:
    prefill_s(prompt) = prefill_base_s + prompt_tokens / prefill_tokens_per_s
and its first token comes one step later. The parameters are fitted from the engine
(`headway.sim.fit`); `DEFAULT` is such a fit (SmolLM2-135M, bfloat16, the CPU in its `source`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ServiceModel:
    itl_base_s: float
    itl_per_seq_s: float
    prefill_base_s: float
    prefill_tokens_per_s: float
    source: str = ""

    def __post_init__(self) -> None:
        if self.itl_base_s <= 0 or self.itl_per_seq_s < 0 or self.prefill_base_s < 0 or self.prefill_tokens_per_s <= 0:
            raise ValueError(f"need itl_base_s > 0, itl_per_seq_s >= 0, prefill_base_s >= 0 and "
                             f"prefill_tokens_per_s > 0; got {asdict(self)}")

    def itl(self, batch: int) -> float:
        return self.itl_base_s + self.itl_per_seq_s * batch

    def prefill_s(self, prompt_tokens: int) -> float:
        return self.prefill_base_s + prompt_tokens / self.prefill_tokens_per_s

    def service_s(self, prompt_tokens: int, output_tokens: int, batch: int) -> float:
        """Seconds on a replica that holds `batch` requests all the while."""
        return self.prefill_s(prompt_tokens) + output_tokens * self.itl(batch)

    def scaled(self, factor: float) -> ServiceModel:
        """The same shape `factor` times faster (e.g. an accelerator against this CPU)."""
        return ServiceModel(self.itl_base_s / factor, self.itl_per_seq_s / factor, self.prefill_base_s / factor,
                            self.prefill_tokens_per_s * factor, f"{self.source} / {factor:g}")


# `python -m headway.sim.fit` (batches 1,4,8,16,32; prompts 128,512,1024; 16 steps) on the EPYC VM
# (2 vCPUs, shared): decode steps of 20.9 / 27.0 / 30.0 / 41.0 / 55.7 ms, prefills of 89 / 375 /
# 955 ms. A repeat while the machine was saturated by other work read 10-30x slower and was not used.
DEFAULT = ServiceModel(itl_base_s=0.0215, itl_per_seq_s=0.0011, prefill_base_s=0.0, prefill_tokens_per_s=1124.0,
                       source="smollm2-135m-instruct bfloat16 on 2 EPYC vCPUs (headway.sim.fit)")
