"""Per-request state of the LLM engine: sampling parameters and the ``Sequence``.

A ``Sequence`` is one generated continuation: the request's prompt token ids, its output
token ids, its sampling parameters, its status, its KV holding (``kv``, a
``kv_manager.SeqKV`` that only the ``KVManager`` writes: the slots of its computed tokens, how
many leading ones the radix cache owns and the node it locks), the timestamps the metrics
need, and why it finished. A request with ``n > 1`` becomes ``n`` sequences sharing
``request_id`` (``index`` 0..n-1); they share the prompt's KV.

The slot invariant is kept and asserted in ``kv_manager.py``; here ``slots``,
``cached_len``, ``num_computed`` (``len(slots)``: tokens whose K/V is written or in flight)
and ``num_inflight`` are read-only views of it.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from headway.runtime.llm.kv_manager import SeqKV

if TYPE_CHECKING:
    from headway.runtime.llm.grammar.compiler import Grammar
    from headway.runtime.llm.grammar.matcher import GrammarState


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling parameters (OpenAI / vLLM names and meanings).

    temperature 0 means greedy. top_k <= 0 means off, top_p 1.0 off, min_p 0.0 off.
    repetition_penalty follows Hugging Face (divide positive logits / multiply negative ones
    of every token seen in prompt+output; 1.0 off); presence/frequency penalties follow
    OpenAI (subtract ``presence * [count > 0] + frequency * count`` over the output tokens;
    0.0 off). max_tokens None = until EOS or the KV pool's limit. ``grammar`` (compiled off the
    step loop by ``grammar.GrammarCompiler``) constrains every sampled token; the sequence
    finishes ("stop") when it is complete."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    n: int = 1
    grammar: Grammar | None = None  # compiled grammar the output must follow (masked every step)

    def __post_init__(self) -> None:
        errors: list[str] = []

        def num(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                errors.append(f"{name} must be a finite number, got {v!r}")
                return math.nan
            return float(v)

        t = num("temperature")
        if not math.isnan(t) and t < 0:
            errors.append(f"temperature must be >= 0 (0 = greedy), got {t}")
        p = num("top_p")
        if not math.isnan(p) and not (0.0 < p <= 1.0):
            errors.append(f"top_p must be in (0, 1], got {p}")
        mp = num("min_p")
        if not math.isnan(mp) and not (0.0 <= mp <= 1.0):
            errors.append(f"min_p must be in [0, 1], got {mp}")
        rp = num("repetition_penalty")
        if not math.isnan(rp) and rp <= 0:
            errors.append(f"repetition_penalty must be > 0 (1.0 = off), got {rp}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = num(name)
            if not math.isnan(v) and not (-2.0 <= v <= 2.0):
                errors.append(f"{name} must be in [-2, 2] (OpenAI range), got {v}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            errors.append(f"top_k must be an int (<= 0 = off), got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            errors.append(f"seed must be an int or None, got {self.seed!r}")
        if self.max_tokens is not None and (
            isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            errors.append(f"max_tokens must be an int >= 1 or None, got {self.max_tokens!r}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not isinstance(s, str) or not s for s in self.stop):
            errors.append(f"stop must be non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.stop_token_ids):
            errors.append(f"stop_token_ids must be ints >= 0, got {self.stop_token_ids!r}")
        if isinstance(self.top_logprobs, bool) or not isinstance(self.top_logprobs, int) or not (
            0 <= self.top_logprobs <= 20
        ):
            errors.append(f"top_logprobs must be an int in [0, 20], got {self.top_logprobs!r}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or not (1 <= self.n <= 128):
            errors.append(f"n must be an int in [1, 128], got {self.n!r}")
        if errors:
            raise ValueError("invalid sampling parameters: " + "; ".join(errors))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def validate_prompt(prompt_ids: Iterable[int], num_slots: int) -> list[int]:
    """The prompt as a list, or ``ValueError`` if it can never run on a pool of ``num_slots``."""
    ids = list(prompt_ids)
    if not ids:
        raise ValueError("prompt is empty: at least one token id is required")
    if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
        raise ValueError("prompt token ids must be ints >= 0")
    if len(ids) >= num_slots:
        raise ValueError(
            f"prompt has {len(ids)} tokens but the KV pool holds at most {num_slots - 1} "
            f"prompt tokens (num_slots={num_slots}); shorten it"
        )
    return ids


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens reached, or the context cannot grow (KV pool full)
    ABORT = "abort"  # client went away / aborted


def make_generator(seed: int | None, index: int = 0) -> torch.Generator | None:
    """Per-sequence CPU generator: ``None`` when unseeded (the sampler's shared generator is
    used); sample ``index`` of an n>1 request gets a distinct but reproducible stream."""
    if seed is None:
        return None
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + index) % (2**63 - 1) if index else seed % (2**63 - 1))
    return g


@dataclass(eq=False)
class Sequence:
    """One generated continuation of a request (see module docstring)."""

    seq_id: str
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    index: int = 0  # which of the request's n samples
    cache_key: Hashable = None  # radix isolation key (adapter id, cache salt)
    adapter: str | None = None  # LoRA adapter name (None: the base model)
    output_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    kv: SeqKV = field(default_factory=SeqKV)  # written by the KVManager only
    fork_pending: bool = False  # n > 1 and the prompt's prefill has not finished yet
    generator: torch.Generator | None = None
    grammar: GrammarState | None = None  # grammar.GrammarState once masking starts (params.grammar set); own per fork
    # metrics
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string / token id that matched
    num_preemptions: int = 0
    last_scheduled: int = -1  # scheduler's emit counter; decode round-robin when budget is short
    num_cached_prompt_tokens: int = 0  # prompt tokens served from the cache at first admission
    arrival_step: int = 0
    admit_order: int = 0  # larger = admitted more recently ("younger")

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """``all_ids[start:end]`` without building ``all_ids``."""
        p = len(self.prompt_ids)
        if start >= p:
            return self.output_ids[start - p : end - p]
        if end <= p:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:] + self.output_ids[: end - p]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def slots(self) -> list[int]:
        """KV slot per computed token, position order (the manager's list: do not mutate)."""
        return self.kv.slots

    @property
    def cached_len(self) -> int:
        return self.kv.cached_len

    @property
    def num_inflight(self) -> int:
        """Tokens scheduled in the plan now in flight (K/V not yet written)."""
        return self.kv.inflight

    @property
    def num_computed(self) -> int:
        return len(self.kv.slots)

    @property
    def num_private_slots(self) -> int:
        return self.kv.private

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    @property
    def in_prefill(self) -> bool:
        """More than one token left to compute (a decode computes exactly the last one)."""
        return self.num_tokens - self.num_computed > 1

    def append_run(self, run: Iterable[int], eos_token_ids: tuple[int, ...],
                   max_len: int) -> tuple[FinishReason, int | None] | None:
        """Append sampled tokens up to the first stop (EOS unless ignored, a stop token id,
        ``max_tokens``, ``max_len`` tokens in all); returns why it stops (and the stop id)."""
        p = self.params
        for tok in run:
            self.output_ids.append(tok)
            if tok in eos_token_ids and not p.ignore_eos:
                return FinishReason.STOP, None
            if tok in p.stop_token_ids:
                return FinishReason.STOP, tok
            if p.max_tokens is not None and len(self.output_ids) >= p.max_tokens:
                return FinishReason.LENGTH, None
            if self.num_tokens >= max_len:
                return FinishReason.LENGTH, None
        return None

    def fork(self, index: int, now: float) -> Sequence:
        """Sample ``index`` of this n > 1 request: same prompt and params, its own seed
        stream; it gets its slots (the shared prompt prefix) when the scheduler forks it."""
        return Sequence(
            seq_id=f"{self.request_id}#{index}",
            request_id=self.request_id,
            prompt_ids=self.prompt_ids,
            params=self.params,
            index=index,
            cache_key=self.cache_key,
            adapter=self.adapter,
            generator=make_generator(self.params.seed, index),
            arrival_time=self.arrival_time,
            arrival_step=self.arrival_step,
            first_scheduled_time=now,
            num_cached_prompt_tokens=self.num_cached_prompt_tokens,
        )
