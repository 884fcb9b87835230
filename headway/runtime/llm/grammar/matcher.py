"""Per-sequence grammar state and the step loop's batched masking.

``GrammarState`` owns one sequence's position in its grammar (an xgrammar ``GrammarMatcher``).
Invariant: the matcher has accepted exactly the sequence's output tokens, in order
(``num_accepted == len(seq.output_ids)``) — the engine accepts every emitted token, a
preempted sequence keeps its state with its output, and a forked sample (n > 1) starts its own.

Interface for speculative decoding (a verifier masks each proposed position and rolls back the
rejected tail)::

    st = seq.grammar                                   # GrammarState, or None (no grammar)
    ok = st.fill_draft(draft, bitmask, first_row=r)    # rows r .. r+len(draft): one mask per
                                                       # position; ok = grammatical draft prefix
    apply_bitmask(logits, bitmask, rows)               # then verify / sample as usual
    for t in accepted_tokens: st.accept(t)             # or accept all proposed, then
    st.rollback(num_rejected)                          # roll back the rejected tail

``fill_draft`` leaves the state as it found it. ``GrammarMasker`` does the one-token-per-row
case for the engine: fill the rows that have a grammar into one bitmask, apply it to the logits
before sampling, and accept each emitted token afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from headway.runtime.llm.grammar.compiler import Grammar

if TYPE_CHECKING:
    from headway.runtime.llm.plan import SchedulePlan
    from headway.runtime.llm.sequence import SamplingParams

log = logging.getLogger("headway.llm.grammar")


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """An int32 ``[rows, ceil(vocab/32)]`` CPU bitmask, all tokens allowed (bit 1 = allowed)."""
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set ``logits[r, t] = -inf`` for each row ``r`` in ``rows`` and each token ``t`` whose bit
    in ``bitmask[r]`` is 0. CPU logits use xgrammar's kernel; other devices unpack on the device."""
    if not rows:
        return
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        import xgrammar as xgr

        xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)
        return
    vocab = logits.shape[1]
    idx = torch.tensor(rows, device=logits.device)
    bits = bitmask[rows].to(logits.device)
    shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((bits.unsqueeze(-1) >> shifts) & 1).bool().reshape(len(rows), -1)[:, :vocab]
    logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))


class GrammarState:
    """One sequence's matcher (see module docstring)."""

    def __init__(self, grammar: Grammar):
        import xgrammar as xgr

        self.grammar = grammar
        self._m = xgr.GrammarMatcher(grammar.compiled)
        self.num_accepted = 0

    def accept(self, token_id: int) -> bool:
        """Advance by one token; False (state unchanged) if the grammar does not allow it."""
        ok = bool(self._m.accept_token(int(token_id)))
        if ok:
            self.num_accepted += 1
        return ok

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (CPU int32); state unchanged."""
        self._m.fill_next_token_bitmask(bitmask, row)

    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accepted tokens (0 <= num_tokens <= num_accepted)."""
        if not 0 <= num_tokens <= self.num_accepted:
            raise ValueError(f"rollback({num_tokens}): only {self.num_accepted} tokens were accepted")
        if num_tokens:
            self._m.rollback(num_tokens)
            self.num_accepted -= num_tokens

    @property
    def is_terminated(self) -> bool:
        """True once the grammar is complete and a stop token (EOS) was accepted."""
        return bool(self._m.is_terminated())

    def fill_draft(self, draft: Sequence[int], bitmask: torch.Tensor, first_row: int) -> int:
        """Fill ``bitmask[first_row + i]`` with the mask for the position after ``draft[:i]``,
        for i = 0 .. len(draft) (the last row is the bonus position). Stops at the first draft
        token the grammar rejects (later rows are left untouched: the verifier must not use
        them) and returns the number of draft tokens accepted. The state is restored."""
        n = 0
        for tok in draft:
            self.fill(bitmask, first_row + n)
            if self.is_terminated or not self.accept(tok):
                self.rollback(n)
                return n
            n += 1
        if not self.is_terminated:
            self.fill(bitmask, first_row + n)
        self.rollback(n)
        return n


class GrammarRow(Protocol):
    """What the masker reads and keeps per logits row (``Sequence`` satisfies it)."""

    params: SamplingParams  # .grammar is a Grammar or None
    output_ids: list[int]
    grammar: GrammarState | None


class GrammarMasker:
    """The step loop's side: ``mask`` before sampling, ``accept`` after the scheduler's update.
    Rows without a grammar are untouched and cost nothing; a batch without any costs one scan."""

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None

    def _bitmask(self, rows: int, vocab: int) -> torch.Tensor:
        width = (vocab + 31) // 32
        if self._buf is None or self._buf.shape[0] < rows or self._buf.shape[1] != width:
            self._buf = allocate_bitmask(max(rows, 8), vocab)
        return self._buf

    def mask(self, logits: torch.Tensor, rows: Sequence[GrammarRow], plan: SchedulePlan | None = None) -> None:
        """Mask the logits rows of sequences with a grammar. Row ``i`` is ``rows[i]``'s sample
        row; a sequence with a speculative proposal in ``plan`` (a SchedulePlan) also has one row
        after each proposed token (``plan.proposal_rows()``: its sample row first), each masked
        for the grammar state after the proposal's tokens before it. Rows after the first
        proposed token the grammar refuses stay unmasked: verification rejects that token (its
        probability is 0 under the mask), so it never reads them. Costs one scan of ``rows``
        when none has a grammar."""
        idx = [i for i, r in enumerate(rows) if r.params.grammar is not None]
        if not idx:
            return
        vocab = logits.shape[1]
        buf = self._bitmask(logits.shape[0], vocab)
        spec_rows = plan.proposal_rows() if plan is not None and plan.num_proposed else {}
        proposals = {id(it.seq): it.proposal for it in plan.items if it.proposal} if spec_rows and plan else {}
        apply_rows: list[int] = []
        for i in idx:
            r = rows[i]
            if r.grammar is None:
                g = r.params.grammar
                assert g is not None  # idx holds only rows with a grammar
                if g.vocab_size != vocab:
                    raise ValueError(f"grammar compiled for vocab {g.vocab_size}, logits have {vocab}")
                r.grammar = GrammarState(g)
            spec = spec_rows.get(id(r))
            if spec is None:
                r.grammar.fill(buf, i)
                apply_rows.append(i)
                continue
            st, draft, k = r.grammar, list(proposals[id(r)]), 0
            for j in range(len(draft) + 1):
                if st.is_terminated:        # past the grammar's end (an EOS was proposed): the run stops there
                    break
                st.fill(buf, spec[j])
                apply_rows.append(spec[j])
                if j == len(draft) or not st.accept(draft[j]):
                    break
                k += 1
            st.rollback(k)
        apply_bitmask(logits, buf, apply_rows)

    def accept(self, seqs: Sequence[GrammarRow], before: dict[int, int] | None = None) -> list[GrammarRow]:
        """Accept each sequence's new tokens (those past ``before[id(seq)]``, else the newest
        one); returns those whose grammar is now finished (terminated, or a token was rejected:
        a bug, logged, and the sequence is stopped)."""
        done = []
        for s in seqs:
            st = s.grammar
            if st is None:
                continue
            start = (before or {}).get(id(s), len(s.output_ids) - 1)
            for tok in s.output_ids[start:]:
                if not st.accept(tok):
                    log.error("grammar rejected sampled token %d after %d tokens; stopping the sequence",
                              tok, st.num_accepted)
                    done.append(s)
                    break
                if st.is_terminated:
                    done.append(s)
                    break
        return done
