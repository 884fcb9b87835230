"""Draft-model proposer: a small model with the target's tokenizer, run in the same process by
its own ``ModelRunner`` over its own KV pool, proposes k tokens autoregressively.

Owns the draft's KV. Invariant, per sequence: ``state.slots[i]`` holds the draft's K/V of
``state.tokens[i]``, and ``state.tokens`` is a prefix of the sequence's tokens as of the last
proposal (plus the proposals fed back). Before each proposal the state is cut to its longest
common prefix with the sequence's committed tokens (rejected proposals roll back: their slots
are freed), then the new committed tokens are computed (the first time: the whole prompt).
States of sequences that are no longer running are freed (``retain``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path

import torch

from headway.runtime.llm.batch import ForwardBatch
from headway.runtime.llm.kv_pool import KVPool
from headway.runtime.llm.runner import ModelRunner
from headway.runtime.llm.sequence import Sequence
from headway.runtime.llm.speculation.verify import draw, truncated_probs


@dataclass
class _DraftState:
    tokens: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)


@dataclass
class Proposal:
    tokens: list[int]
    probs: torch.Tensor | None  # [k, V_target] the distributions sampled from (None: greedy)


class DraftProposer:
    def __init__(self, model_dir: str | Path, *, target_vocab: int, num_layers: int | None = None,
                 dtype: torch.dtype | str = "float32", device: str | torch.device = "cpu",
                 num_slots: int | None = None) -> None:
        self.runner = ModelRunner(model_dir, dtype=dtype, device=device, num_slots=num_slots, num_layers=num_layers)
        self.pool = KVPool(self.runner.num_slots)
        self.target_vocab = target_vocab
        self.max_len = min(self.runner.config.max_position, self.runner.num_slots)
        self._seqs: dict[str, _DraftState] = {}

    @property
    def num_layers(self) -> int:
        return self.runner.config.num_layers

    def retain(self, alive: set[str]) -> None:
        """Free the draft KV of every sequence not in ``alive`` (finished, preempted)."""
        for sid in [s for s in self._seqs if s not in alive]:
            self.pool.free(self._seqs.pop(sid).slots)

    def check(self) -> None:
        held = sum(len(s.slots) for s in self._seqs.values())
        assert held + self.pool.num_free == self.pool.total, "draft KV slot leak"
        for s in self._seqs.values():
            assert len(s.slots) == len(s.tokens)

    def propose(self, reqs: Seq[tuple[Sequence, int]],
                uniform: Callable[[Sequence], float]) -> dict[str, Proposal]:
        """``k`` tokens for each (sequence, k): one draft forward over every sequence's new
        committed tokens, then k - 1 single-token steps. Sequences the draft cannot hold get
        no proposal."""
        feed: list[tuple[Sequence, int, list[int]]] = []  # (seq, k, tokens to feed now)
        free = self.pool.num_free
        for seq, k in reqs:
            st = self._seqs.setdefault(seq.seq_id, _DraftState())
            ctx = seq.all_ids
            c = 0
            limit = min(len(st.tokens), len(ctx) - 1)  # the last token is always fed
            while c < limit and st.tokens[c] == ctx[c]:
                c += 1
            if c < len(st.slots):  # roll back what the target did not keep
                free += len(st.slots) - c
                self.pool.free(st.slots[c:])
                del st.slots[c:], st.tokens[c:]
            new = ctx[c:]
            if len(ctx) + k > self.max_len or free < len(new) + k - 1:
                continue
            free -= len(new) + k - 1
            feed.append((seq, k, new))
        out: dict[str, Proposal] = {s.seq_id: Proposal([], None) for s, _, _ in feed}
        probs: dict[str, list[torch.Tensor]] = {s.seq_id: [] for s, _, _ in feed}
        step = 0
        while feed:
            news, ctxs = [], []
            for seq, _, new in feed:
                st = self._seqs[seq.seq_id]
                slots = self.pool.alloc(len(new))
                assert slots is not None  # reserved above
                st.tokens.extend(new)
                st.slots.extend(slots)
                news.append(new)
                ctxs.append(st.slots)
            logits = self.runner.forward(ForwardBatch.build(news, ctxs))
            logits = self._to_target_vocab(logits)
            nxt = []
            for row, (seq, k, _) in enumerate(feed):
                p = seq.params
                if p.greedy:
                    tok = int(logits[row].argmax())
                else:
                    q = truncated_probs((logits[row : row + 1] / p.temperature), p)[0]
                    tok = draw(q, uniform(seq))
                    probs[seq.seq_id].append(q)
                out[seq.seq_id].tokens.append(tok)
                if step + 1 < k:
                    nxt.append((seq, k, [tok]))
            feed = nxt
            step += 1
        for sid, prop in out.items():
            if probs[sid]:
                prop.probs = torch.stack(probs[sid])
        return {sid: p for sid, p in out.items() if p.tokens}

    def _to_target_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        v = logits.shape[1]
        if v == self.target_vocab:
            return logits
        if v > self.target_vocab:
            return logits[:, : self.target_vocab]
        pad = torch.full((logits.shape[0], self.target_vocab - v), float("-inf"), dtype=logits.dtype)
        return torch.cat([logits, pad], dim=1)
