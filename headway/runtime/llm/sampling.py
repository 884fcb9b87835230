"""Sampler: owns turning one step's logits into tokens (and logprobs).

Order of operations per row (vLLM's): repetition penalty (Hugging Face semantics, over
prompt+output) -> presence/frequency penalties (OpenAI semantics, over output) ->
temperature -> top-k -> top-p -> min-p -> sample. temperature == 0 is greedy (argmax of the
penalized logits).

Reported logprobs (``logprobs`` / ``top_logprobs``) are ``log_softmax`` of the logits *after
penalties and temperature, before top-k/top-p/min-p truncation* (vLLM v0's behaviour, v1's
``processed_logprobs``); for greedy rows temperature is taken as 1.

Randomness: a draw is an inverse-CDF lookup with one uniform per row. A row with a
``generator`` (seeded request) takes its uniform from its own CPU generator, so a seeded
request's output does not depend on what else is in the batch or on the device; unseeded rows
share the sampler's generator. top-k/top-p look only at the ``topk`` candidates (widened until
the nucleus fits), never a full-vocabulary sort. The all-greedy and same-parameters cases are
vectorized over the batch (no per-row tensor work; seeded rows cost one scalar draw each).
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


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Float32 logits after the repetition (prompt+output) and presence/frequency (output)
    penalties of each row's params; the logits themselves when no row has one."""
    n, vocab = logits.shape
    params = [r.params for r in rows]
    uniform = all(p == params[0] for p in params)
    x = logits.float()
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
    return x


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
        x = apply_penalties(logits, rows)

        temps = [p.temperature for p in params]
        all_greedy = all(t == 0.0 for t in temps)
        if all_greedy:
            z = x
            tokens = x.argmax(dim=-1)
        else:
            t = _col([t if t > 0 else 1.0 for t in temps], x)
            z = x / t
            tokens = self._random(z, rows, params)
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

    def _uniforms(self, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """One U[0,1) per row, on CPU: seeded rows from their own generator."""
        u = torch.rand(len(rows), dtype=torch.float64, generator=self._gen)
        for i, r in enumerate(rows):
            if r.generator is not None:
                u[i] = torch.rand(1, dtype=torch.float64, generator=r.generator)[0]
        return u

    @staticmethod
    def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Index drawn from each row of non-negative ``weights`` with uniforms ``u``."""
        cdf = weights.double().cumsum(dim=-1)
        target = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(1)
        idx = torch.searchsorted(cdf, target, right=True).squeeze(1)
        return idx.clamp_(max=weights.shape[1] - 1)

    def _random(
        self,
        z: torch.Tensor,
        rows: Sequence[SamplingRow],
        params: list[SamplingParams],
    ) -> torch.Tensor:
        """Sample from softmax(z) truncated by top-k -> top-p -> min-p.

        min-p keeps tokens with p >= min_p * p_max; that ratio does not change when top-k /
        top-p renormalize, so its mask is taken on the full distribution and intersected.
        top-k / top-p work on the top candidates only (``topk``, not a full-vocabulary sort);
        a top-p row whose nucleus is not inside the candidates falls back to all of them.
        The draw is an inverse-CDF lookup with one uniform per row (seeded rows: from their
        own generator), so a seeded row is reproducible whatever the batch or device."""
        n, vocab = z.shape
        raw = probs = torch.softmax(z, dim=-1)
        min_p = [p.min_p for p in params]
        if any(min_p):
            keep = probs >= _col(min_p, probs) * probs.max(dim=-1, keepdim=True).values
            probs = probs * keep
        u = self._uniforms(rows)
        top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
        top_p = [p.top_p for p in params]
        trunc = [i for i in range(n) if top_k[i] or top_p[i] < 1.0]
        if len(trunc) < n:
            tokens = self._inverse_cdf(probs, u)
        else:
            tokens = torch.empty(n, dtype=torch.int64, device=z.device)
        if not trunc:
            return tokens
        ti = torch.tensor(trunc, device=z.device)
        zt, pt, rt = (z, probs, raw) if len(trunc) == n else (z[ti], probs[ti], raw[ti])
        ks = [top_k[i] for i in trunc]
        ps = [top_p[i] for i in trunc]
        k0 = vocab if any(k == 0 for k in ks) and any(p < 1.0 for p in ps) else max(ks)
        k0 = min(vocab, max(k0 if k0 < vocab else 1024, 1))
        while True:
            _, ids = zt.topk(k0, dim=-1)  # sorted, best first
            cand = zt.gather(1, ids)
            rank = torch.arange(k0, device=z.device).unsqueeze(0)
            kcol = torch.tensor([k if k else vocab for k in ks], device=z.device).unsqueeze(1)
            drop = rank >= kcol
            # top-p over the top-k-renormalized distribution (rows without top-k: the full one)
            full = rt.gather(1, ids)
            renorm = torch.softmax(cand.masked_fill(drop, float("-inf")), dim=-1)
            has_k = torch.tensor([k > 0 for k in ks], device=z.device).unsqueeze(1)
            pc = torch.where(has_k, renorm, full)
            pcol = _col(ps, pc)
            before = pc.cumsum(dim=-1) - pc
            covered = has_k.squeeze(1) | (pc.sum(dim=-1) > pcol.squeeze(1))
            if k0 == vocab or bool(covered.all()):
                break
            k0 = min(vocab, k0 * 8)  # some nucleus reaches past the candidates: widen
        drop |= before > pcol
        drop[:, 0] = False  # always keep the best token
        w = pt.gather(1, ids).masked_fill(drop, 0.0)
        empty = w.sum(dim=-1) <= 0  # min-p and top-k/p disagree only if rounding: keep best
        if bool(empty.any()):
            w[empty, 0] = 1.0
        pick = self._inverse_cdf(w, u[torch.tensor(trunc)])
        tokens[ti] = ids.gather(1, pick.unsqueeze(1)).squeeze(1)
        return tokens
