"""Verification of proposed tokens against the target's logits: lossless by construction.

For a sequence with proposals ``d_1..d_k``, one target forward over [last token, d_1..d_k]
gives ``k + 1`` logits rows: row ``i`` is the target's distribution for the token after
``d_i`` (row 0: after the last known token). Row ``i`` is processed exactly as the sampler
would process it had ``d_1..d_i`` been generated (penalties over that context, temperature,
top-k -> top-p -> min-p), so the emitted tokens follow the target's own distribution:

- greedy: accept the longest prefix of proposals equal to the row-wise argmax, then emit the
  argmax of the first row that disagreed (or of the last row): output is token for token what
  decoding without speculation gives;
- sampling: speculative rejection sampling (Leviathan et al. 2023; Chen et al. 2023). With
  target ``p_i`` and proposal distribution ``q_i`` (one-hot for n-gram proposals, the draft's
  processed distribution for a draft model), ``d_i`` is accepted with probability
  ``min(1, p_i(d_i) / q_i(d_i))``; the first rejection emits a token drawn from
  ``norm(max(0, p_i - q_i))``; when all are accepted, one more is drawn from ``p_k``.

``allowed`` (optional, ``[k + 1, V]`` bool) restricts each row to a token set before anything
else (a grammar's per-position mask; tokens outside it get probability 0, so a proposal
outside it is always rejected).

Logprobs of emitted tokens are the target's (``log_softmax`` after penalties and temperature,
before truncation, like the sampler's), never the proposer's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from headway.runtime.llm.outputs import TokenLogprob
from headway.runtime.llm.sampling import SamplingRow, apply_penalties
from headway.runtime.llm.sequence import SamplingParams


@dataclass
class Verdict:
    tokens: list[int]  # accepted proposals, then the target's next token
    accepted: int  # how many proposals were accepted (len(tokens) - 1)
    logprobs: list[TokenLogprob] | None  # one per emitted token when the request asked


@dataclass
class _Row:
    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None = None


def truncated_probs(z: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution the sampler draws from for temperature-scaled logits ``z`` [R, V]:
    softmax, then top-k, top-p (over the top-k-renormalized distribution) and min-p (against
    the full distribution's maximum); the best token is always kept. Rows sum to 1."""
    vocab = z.shape[-1]
    raw = torch.softmax(z.float(), dim=-1)
    w = raw
    if params.min_p:
        w = w * (raw >= params.min_p * raw.max(dim=-1, keepdim=True).values)
    k = params.top_k if 0 < params.top_k < vocab else 0
    if k or params.top_p < 1.0:
        vals, ids = z.float().sort(dim=-1, descending=True)
        drop = torch.zeros_like(vals, dtype=torch.bool)
        if k:
            drop[:, k:] = True
            pc = torch.softmax(vals.masked_fill(drop, float("-inf")), dim=-1)
        else:
            pc = raw.gather(1, ids)
        drop |= (pc.cumsum(dim=-1) - pc) > params.top_p
        drop[:, 0] = False
        keep = torch.zeros_like(drop).scatter_(1, ids, ~drop)
        w = w * keep
    total = w.sum(dim=-1, keepdim=True)
    empty = total.squeeze(1) <= 0
    if bool(empty.any()):  # min-p and top-k/p disagree only by rounding: keep the best token
        w[empty] = torch.nn.functional.one_hot(raw[empty].argmax(dim=-1), vocab).to(w.dtype)
        total = w.sum(dim=-1, keepdim=True)
    return w / total


def draw(weights: torch.Tensor, u: float) -> int:
    """Index drawn from non-negative ``weights`` [V] with the uniform ``u`` (inverse CDF)."""
    cdf = weights.double().cumsum(dim=0)
    idx = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=cdf.dtype), right=True)[0])
    return min(idx, weights.shape[0] - 1)


def target_logits(logits: torch.Tensor, proposal: Sequence[int], row: SamplingRow,
                  allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The ``k + 1`` rows after penalties, each over the context it would have had."""
    p = row.params
    x = logits.float()
    if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
        out = list(row.output_ids)
        rows = [_Row(p, row.prompt_ids, out + list(proposal[:i])) for i in range(len(proposal) + 1)]
        x = apply_penalties(x, rows)
    if allowed is not None:
        x = x.masked_fill(~allowed, float("-inf"))
    return x


def verify(logits: torch.Tensor, proposal: Sequence[int], row: SamplingRow, uniform: Callable[[], float], *,
           draft_probs: torch.Tensor | None = None, allowed: torch.Tensor | None = None) -> Verdict:
    """Accept a prefix of ``proposal`` and emit the target's next token (module docstring).

    ``logits``: [k + 1, V] target rows; ``draft_probs``: [k, V] the distributions the draft
    sampled ``proposal`` from (None: the proposal is deterministic, q is one-hot);
    ``uniform()``: the next U[0, 1) of this sequence's random stream."""
    k = len(proposal)
    if logits.dim() != 2 or logits.shape[0] != k + 1:
        raise ValueError(f"verify needs k + 1 = {k + 1} logits rows, got shape {tuple(logits.shape)}")
    if draft_probs is not None and draft_probs.shape != (k, logits.shape[1]):
        raise ValueError(f"draft_probs must be [{k}, {logits.shape[1]}], got {tuple(draft_probs.shape)}")
    p = row.params
    x = target_logits(logits, proposal, row, allowed)
    tokens: list[int] = []
    if p.greedy:
        z = x
        best = x.argmax(dim=-1).tolist()
        a = 0
        while a < k and proposal[a] == best[a]:
            a += 1
        tokens = [*proposal[:a], best[a]]
    else:
        z = x / p.temperature
        probs = truncated_probs(z, p)
        a = 0
        nxt: int | None = None
        while a < k:
            t = proposal[a]
            pt = float(probs[a, t])
            qt = 1.0 if draft_probs is None else float(draft_probs[a, t])
            if uniform() * qt < pt:  # accept with probability min(1, p/q)
                a += 1
                continue
            if draft_probs is None:
                residual = probs[a].clone()
                residual[t] = 0.0
            else:
                residual = (probs[a] - draft_probs[a].to(probs.dtype)).clamp_(min=0.0)
            if float(residual.sum()) <= 0.0:
                residual = probs[a]
            nxt = draw(residual, uniform())
            break
        if nxt is None:
            nxt = draw(probs[a], uniform())
        tokens = [*proposal[:a], nxt]
    lps = None
    if p.logprobs:  # like the engine's plain path: top_logprobs come with logprobs
        logp = torch.log_softmax(z[: len(tokens)], dim=-1)
        chosen = logp.gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1).tolist()
        tops: list[list[tuple[int, float]]] = [[] for _ in tokens]
        if p.top_logprobs:
            tv, ti = logp.topk(min(p.top_logprobs, logp.shape[1]), dim=-1)
            tops = [list(zip(i, v)) for i, v in zip(ti.tolist(), tv.tolist())]
        lps = [TokenLogprob(t, float(c), top) for t, c, top in zip(tokens, chosen, tops)]
    return Verdict(tokens, a, lps)
