"""The forward seam (docs/engine-internals.md): ``ForwardBatch``, what one model step computes.

Sequence ``i`` contributes ``query_lens[i]`` new tokens at positions
``context_lens[i] - query_lens[i] .. context_lens[i] - 1``; its ``context_slots[i]`` lists the
slot of every context token in position order, the last ``query_lens[i]`` of which are where
the new tokens' K/V are written (``out_slots``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64: the new tokens of all sequences, concatenated
    positions: torch.Tensor  # [T] int64: absolute position of each new token
    out_slots: torch.Tensor  # [T] int64: slot each new token's K/V is written to
    query_lens: list[int]  # per sequence: how many new tokens (sum == T)
    context_lens: list[int]  # per sequence: context length including the new tokens
    context_slots: list[torch.Tensor]  # per sequence: [context_len] int64 slots in position order
    logit_indices: torch.Tensor  # [N] int64 indices into T whose logits are returned

    @classmethod
    def build(
        cls,
        new_tokens: Sequence[Sequence[int]],
        context_slots: Sequence[Sequence[int]],
        *,
        all_logits: bool = False,
    ) -> ForwardBatch:
        """Build a batch from python lists.

        ``new_tokens[i]``: sequence i's new token ids; ``context_slots[i]``: the slots of its
        whole context (cached prefix + new tokens) in position order. Logits are returned for the
        last new token of each sequence, or for every new token with ``all_logits``.
        """
        if len(new_tokens) != len(context_slots):
            raise ValueError(
                f"new_tokens has {len(new_tokens)} sequences but context_slots has {len(context_slots)}"
            )
        if not new_tokens:
            raise ValueError("a ForwardBatch needs at least one sequence")
        ids: list[int] = []
        positions: list[int] = []
        out: list[int] = []
        q_lens: list[int] = []
        c_lens: list[int] = []
        logit_idx: list[int] = []
        for i, (toks, slots) in enumerate(zip(new_tokens, context_slots)):
            q, c = len(toks), len(slots)
            if q == 0:
                raise ValueError(f"sequence {i} has no new tokens; each needs at least one")
            if c < q:
                raise ValueError(
                    f"sequence {i}: {c} context slots for {q} new tokens; the context must "
                    "include the new tokens' slots"
                )
            start = len(ids)
            ids.extend(int(t) for t in toks)
            positions.extend(range(c - q, c))
            out.extend(int(s) for s in slots[c - q :])
            q_lens.append(q)
            c_lens.append(c)
            logit_idx.extend(range(start, start + q) if all_logits else [start + q - 1])
        return cls(
            input_ids=torch.tensor(ids, dtype=torch.int64),
            positions=torch.tensor(positions, dtype=torch.int64),
            out_slots=torch.tensor(out, dtype=torch.int64),
            query_lens=q_lens,
            context_lens=c_lens,
            context_slots=[torch.as_tensor(list(s), dtype=torch.int64) for s in context_slots],
            logit_indices=torch.tensor(logit_idx, dtype=torch.int64),
        )

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def validate(self, num_slots: int) -> None:
        """Check the batch's shape invariants; raises ValueError naming the broken one."""
        n = len(self.query_lens)
        if len(self.context_lens) != n or len(self.context_slots) != n:
            raise ValueError(
                f"query_lens ({n}), context_lens ({len(self.context_lens)}) and context_slots "
                f"({len(self.context_slots)}) must have one entry per sequence"
            )
        T = self.num_tokens
        if sum(self.query_lens) != T or self.positions.shape[0] != T or self.out_slots.shape[0] != T:
            raise ValueError(
                f"input_ids has {T} tokens, positions {self.positions.shape[0]}, out_slots "
                f"{self.out_slots.shape[0]}, sum(query_lens) {sum(self.query_lens)}: all must match"
            )
        for i, (q, c, s) in enumerate(zip(self.query_lens, self.context_lens, self.context_slots)):
            if q < 1 or c < q or s.shape[0] != c:
                raise ValueError(
                    f"sequence {i}: query_len={q}, context_len={c}, len(context_slots)={s.shape[0]}; "
                    "need 1 <= query_len <= context_len == len(context_slots)"
                )
        if T and (int(self.out_slots.min()) < 0 or int(self.out_slots.max()) >= num_slots):
            raise ValueError(f"out_slots must lie in [0, {num_slots})")
        if self.logit_indices.numel() and (
            int(self.logit_indices.min()) < 0 or int(self.logit_indices.max()) >= T
        ):
            raise ValueError(f"logit_indices must lie in [0, {T})")
