"""The forward seam: one engine step's batch, as the model runner consumes it.

See docs/engine-internals.md ("The forward seam"). The scheduler builds it
(``SchedulePlan.to_forward_batch``); ``ModelRunner.forward(batch)`` consumes it.
"""

from __future__ import annotations

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
    # (the last query_len of them are that sequence's out_slots)
    logit_indices: torch.Tensor  # [N] int64 indices into T whose logits are returned
    # (default: the last new token of each sequence)
