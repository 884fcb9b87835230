"""Sampler: owns turning one step's logits into tokens (and logprobs).

Order of operations per row (vLLM's): repetition penalty (Hugging Face semantics, over
prompt+output) -> presence/frequency penalties (OpenAI semantics, over output) ->
temperature -> top-k -> top-p -> min-p -> sample. temperature == 0 is greedy (argmax of the
penalized logits).

Reported logprobs (``logprobs`` / ``top_logprobs``) are ``log_softmax`` of the logits *after
penalties and temperature, before top-k/top-p/min-p truncation* (vLLM v0's behaviour, v1's
``processed_logprobs``); for greedy rows temperature is taken as 1.

Randomness: sampling uses the exponential-race form ``argmax(p / q), q ~ Exp(1)`` (exactly a
draw from ``p``). A row with a ``generator`` (seeded request) draws its V noise values from its
own CPU generator, so a seeded request's output does not depend on what else is in the batch
or on the device; unseeded rows share the sampler's generator. The all-greedy and
same-parameters cases are fully vectorized (no per-row tensor work).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from headway.runtime.llm.sequence import SamplingParams


class SamplingRow(Protocol):
    """What the sampler reads per row (``Sequence`` satisfies it)."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None


@dataclass
class SampleOutput:
    tokens: list[int]
    logprobs: list[float | None]  # chosen token's logprob, for rows with params.logprobs
    top_logprobs: list[list[tuple[int, float]] | None]  # (token, logprob), best first


def _pad(rows: list[list[int]], fill: int, device: torch.device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0) or 1
    out = torch.full((len(rows), width), fill, dtype=torch.int64)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.as_tensor(r, dtype=torch.int64)
    return out.to(device)


def _col(vals: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(vals, dtype=like.dtype, device=like.device).unsqueeze(1)


class Sampler:
    def __init__(self, seed: int | None = None) -> None:
        self._gen = torch.Generator(device="cpu")
        if seed is None:
            self._gen.seed()
        else:
            self._gen.manual_seed(seed)

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SampleOutput:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(
                f"logits must be [N, V] with N == len(rows) == {len(rows)}, got {tuple(logits.shape)}"
            )
        n, vocab = logits.shape
        if n == 0:
            return SampleOutput([], [], [])
        params = [r.params for r in rows]
        p0 = params[0]
        uniform = all(p == p0 for p in params)
        x = logits.float()

        # penalties
        reps = [p.repetition_penalty for p in params]
        if any(r != 1.0 for r in reps):
            ids = _pad([list(r.prompt_ids) + list(r.output_ids) for r in rows], vocab, x.device)
            seen = torch.zeros(n, vocab + 1, dtype=torch.bool, device=x.device)
            seen.scatter_(1, ids, True)
            seen = seen[:, :vocab]
            rp = _col(reps, x) if not uniform else torch.tensor(reps[0], device=x.device)
            x = torch.where(seen, torch.where(x > 0, x / rp, x * rp), x)
        pres = [p.presence_penalty for p in params]
        freq = [p.frequency_penalty for p in params]
        if any(pres) or any(freq):
            ids = _pad([list(r.output_ids) for r in rows], vocab, x.device)
            counts = torch.zeros(n, vocab + 1, dtype=x.dtype, device=x.device)
            counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=x.dtype))
            counts = counts[:, :vocab]
            x = x - _col(freq, x) * counts - _col(pres, x) * (counts > 0).to(x.dtype)

        temps = [p.temperature for p in params]
        all_greedy = all(t == 0.0 for t in temps)
        if all_greedy:
            z = x
            tokens = x.argmax(dim=-1)
        else:
            t = _col([t if t > 0 else 1.0 for t in temps], x)
            z = x / t
            tokens = self._random(z, rows, params, uniform)
            if any(tt == 0.0 for tt in temps):
                greedy = torch.tensor([tt == 0.0 for tt in temps], device=x.device)
                tokens = torch.where(greedy, x.argmax(dim=-1), tokens)

        want = [p.logprobs or p.top_logprobs > 0 for p in params]
        lps: list[float | None] = [None] * n
        tops: list[list[tuple[int, float]] | None] = [None] * n
        if any(want):
            logp = torch.log_softmax(z, dim=-1)
            chosen = logp.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
            k = max(p.top_logprobs for p in params)
            if k:
                tv, ti = logp.topk(min(k, vocab), dim=-1)
                tv_l, ti_l = tv.tolist(), ti.tolist()
            for i, p in enumerate(params):
                if p.logprobs or p.top_logprobs:
                    lps[i] = chosen[i]
                if p.top_logprobs:
                    tops[i] = list(zip(ti_l[i][: p.top_logprobs], tv_l[i][: p.top_logprobs]))
        return SampleOutput(tokens.tolist(), lps, tops)

    def _random(
        self,
        z: torch.Tensor,
        rows: Sequence[SamplingRow],
        params: list[SamplingParams],
        uniform: bool,
    ) -> torch.Tensor:
        n, vocab = z.shape
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        top_p = [p.top_p for p in params]
        if any(k < vocab for k in top_k) or any(tp < 1.0 for tp in top_p):
            sz, idx = z.sort(dim=-1, descending=True)
            ranks = torch.arange(vocab, device=z.device).unsqueeze(0)
            drop = ranks >= torch.tensor(top_k, device=z.device).unsqueeze(1)
            if any(tp < 1.0 for tp in top_p):
                ps = torch.softmax(sz, dim=-1)
                before = ps.cumsum(dim=-1) - ps  # mass strictly above this token
                drop |= before > _col(top_p, ps)
            drop[:, 0] = False  # always keep the best token
            sz = sz.masked_fill(drop, float("-inf"))
            z = torch.empty_like(z).scatter_(1, idx, sz)
        min_p = [p.min_p for p in params]
        if any(min_p):
            probs = torch.softmax(z, dim=-1)
            thresh = _col(min_p, probs) * probs.max(dim=-1, keepdim=True).values
            z = z.masked_fill(probs < thresh, float("-inf"))
        probs = torch.softmax(z, dim=-1)

        # exponential race; noise drawn on CPU so seeded rows reproduce on any device
        q = torch.empty(n, vocab, dtype=torch.float32)
        seeded = [i for i, r in enumerate(rows) if r.generator is not None]
        if len(seeded) < n:
            q.exponential_(generator=self._gen)
        for i in seeded:
            q[i].exponential_(generator=rows[i].generator)
        q = q.to(z.device)
        return (probs / q).argmax(dim=-1)
