"""The scheduler's per-step output (``SchedulePlan``); its configuration is ``scheduler.SchedulerConfig``.

A ``SchedulePlan`` says, per scheduled sequence, which tokens to compute this step, their
positions, the slots their K/V goes to and the full context slot list, plus which sequences
need a sampled token (``sample_seqs``, one logits row each, in order).
``to_forward_batch`` turns it into the runner's ``ForwardBatch`` (docs/engine-internals.md).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import cast

import torch

from headway.runtime.llm.batch import ForwardBatch
from headway.runtime.llm.sequence import Sequence


@dataclass
class ScheduledSeq:
    """One sequence's share of a step."""

    seq: Sequence
    token_ids: list[int]  # tokens computed this step
    positions: list[int]  # their absolute positions
    out_slots: list[int]  # where their K/V is written
    context_slots: list[int]  # the full context, position order (ends with out_slots)
    num_samples: int  # logits rows drawn from the last token: 0 (mid-prefill), 1, or n (fork)
    children: list[Sequence] = field(default_factory=list)  # forked siblings (n > 1)
    # speculative decoding: proposed tokens computed after the last known one (their K/V is
    # written; the scheduler keeps it only for the accepted ones)
    proposal: list[int] = field(default_factory=list)


@dataclass
class SchedulePlan:
    step: int
    items: list[ScheduledSeq] = field(default_factory=list)
    # one per logits row, in order; then, after these rows, one extra row per proposed token
    # of each item with a proposal, in item order (``proposal_rows``)
    sample_seqs: list[Sequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)  # finished while scheduling

    def add(self, seq: Sequence, slots: list[int], now: float, proposal: Seq[int] = ()) -> None:
        """Add ``seq``'s share of this step: the tokens for its newly allocated ``slots`` (its
        next known ones, then ``proposal``) and, after its last known token, a sample row (n
        rows with forks for an n > 1 request's prompt)."""
        n = len(slots)
        start = seq.num_computed - n
        known = n - len(proposal)
        item = ScheduledSeq(seq=seq, token_ids=seq.token_slice(start, start + known) + list(proposal),
                            positions=list(range(start, start + n)), out_slots=slots,
                            context_slots=list(seq.slots), num_samples=0, proposal=list(proposal))
        if seq.first_scheduled_time is None:
            seq.first_scheduled_time = now
        if start + known == seq.num_tokens:  # the last known token: sample the next one
            item.num_samples = 1
            self.sample_seqs.append(seq)
            if seq.fork_pending:
                item.children = [seq.fork(i, now) for i in range(1, seq.params.n)]
                item.num_samples += len(item.children)
                self.sample_seqs.extend(item.children)
        self.items.append(item)

    def runs(self, sampled: Seq[int | Seq[int]] | torch.Tensor) -> list[list[int]]:
        """The sampled tokens as one run per ``sample_seqs`` row (a row that verified a proposal
        may get 1 + its proposal's length at most); ``ValueError`` when they do not fit."""
        toks = sampled.tolist() if isinstance(sampled, torch.Tensor) else list(sampled)
        if self.is_empty and not toks:
            return []
        if len(toks) != len(self.sample_seqs):
            raise ValueError(f"update: got {len(toks)} sampled tokens for {len(self.sample_seqs)} rows")
        proposed = {id(it.seq): len(it.proposal) for it in self.items if it.proposal}
        runs = [[int(t) for t in r] if isinstance(r, (list, tuple)) else [int(cast(int, r))] for r in toks]
        for seq, run in zip(self.sample_seqs, runs):
            if not 1 <= len(run) <= 1 + proposed.get(id(seq), 0):
                raise ValueError(f"update: {seq.seq_id} got {len(run)} tokens for "
                                 f"{proposed.get(id(seq), 0)} proposed (1 + proposed at most)")
        return runs

    @property
    def num_tokens(self) -> int:
        return sum(len(it.token_ids) for it in self.items)

    @property
    def is_empty(self) -> bool:
        return not self.items

    @property
    def num_proposed(self) -> int:
        return sum(len(it.proposal) for it in self.items)

    def proposal_rows(self) -> dict[int, list[int]]:
        """``id(seq)`` -> the logits rows of its verification, in position order: its sample
        row (logits after the last known token) then one row after each proposed token."""
        sample_row = {id(s): i for i, s in enumerate(self.sample_seqs)}
        rows: dict[int, list[int]] = {}
        nxt = len(self.sample_seqs)
        for it in self.items:
            if it.proposal:
                k = len(it.proposal)
                rows[id(it.seq)] = [sample_row[id(it.seq)], *range(nxt, nxt + k)]
                nxt += k
        return rows

    def to_forward_batch(self, device: str | torch.device = "cpu") -> ForwardBatch:
        ids: list[int] = []
        pos: list[int] = []
        outs: list[int] = []
        logit_idx: list[int] = []
        extra: list[int] = []
        for it in self.items:
            ids.extend(it.token_ids)
            pos.extend(it.positions)
            outs.extend(it.out_slots)
            k = len(it.proposal)
            logit_idx.extend([len(ids) - 1 - k] * it.num_samples)
            extra.extend(range(len(ids) - k, len(ids)))
        logit_idx.extend(extra)

        def t(x: list[int]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.int64, device=device)

        return ForwardBatch(
            input_ids=t(ids),
            positions=t(pos),
            out_slots=t(outs),
            query_lens=[len(it.token_ids) for it in self.items],
            context_lens=[len(it.context_slots) for it in self.items],
            context_slots=[t(it.context_slots) for it in self.items],
            logit_indices=t(logit_idx),
        )
