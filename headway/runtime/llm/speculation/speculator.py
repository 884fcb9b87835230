"""The engine's speculation step: which sequences get proposals, and their verification.

Owns the proposers (n-gram lookup or a draft model with its own KV), each sequence's adaptive
proposal length, and the acceptance counters. The engine calls ``propose`` before
``Scheduler.schedule`` and ``sample`` after the target forward; rows without a proposal go to
the ordinary ``Sampler`` untouched.

Speculation is off in a step with more than ``config.max_batch`` running sequences: there the
batch already amortizes the weights and extra rows cost what they save.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from headway.runtime.llm.outputs import TokenLogprob
from headway.runtime.llm.plan import SchedulePlan
from headway.runtime.llm.sampling import Sampler
from headway.runtime.llm.sequence import Sequence
from headway.runtime.llm.speculation.adaptive import AdaptiveLength
from headway.runtime.llm.speculation.config import SpeculativeConfig
from headway.runtime.llm.speculation.draft import DraftProposer, Proposal
from headway.runtime.llm.speculation.ngram import propose_ngram
from headway.runtime.llm.speculation.verify import verify


@dataclass
class StepStats:
    proposed: int = 0  # tokens proposed this step
    accepted: int = 0  # of those, accepted
    verified: int = 0  # sequences whose proposal was verified


class Speculator:
    def __init__(self, config: SpeculativeConfig, *, draft: DraftProposer | None = None,
                 seed: int | None = None) -> None:
        if (config.method == "draft") != (draft is not None):
            raise ValueError("a DraftProposer is needed exactly when method is 'draft'")
        self.config = config
        self.draft = draft
        self._lengths: dict[str, AdaptiveLength] = {}
        self._pending: dict[str, Proposal] = {}
        self._gen = torch.Generator(device="cpu")
        if seed is None:
            self._gen.seed()
        else:
            self._gen.manual_seed(seed)
        self.proposed = self.accepted = self.verified = 0  # totals since start

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Accepted proposals per verified sequence-step (tokens gained per target forward,
        on top of the one every decode step emits)."""
        return self.accepted / self.verified if self.verified else 0.0

    def uniform(self, seq: Sequence) -> float:
        g = seq.generator if seq.generator is not None else self._gen
        return float(torch.rand(1, dtype=torch.float64, generator=g)[0])

    def propose(self, running: list[Sequence]) -> dict[str, list[int]]:
        """``seq_id`` -> proposed tokens for this step's decoding sequences."""
        alive = {s.seq_id for s in running}
        for sid in [s for s in self._lengths if s not in alive]:
            del self._lengths[sid]
        if self.draft is not None:
            self.draft.retain(alive)
        self._pending = {}
        if len(running) > self.config.max_batch:
            return {}
        reqs: list[tuple[Sequence, int]] = []
        for seq in running:
            if seq.in_prefill or seq.fork_pending:
                continue
            ad = self._lengths.setdefault(seq.seq_id, AdaptiveLength(self.config.num_tokens))
            k = ad.next_length()
            if seq.params.max_tokens is not None:  # the step emits one token past the proposal
                k = min(k, seq.params.max_tokens - len(seq.output_ids) - 1)
            if k > 0:
                reqs.append((seq, k))
        if self.draft is not None:
            self._pending = self.draft.propose(reqs, self.uniform)
        else:
            c = self.config
            for seq, k in reqs:
                toks = propose_ngram(seq.all_ids, k, c.ngram_min, c.ngram_max)
                if toks:
                    self._pending[seq.seq_id] = Proposal(toks, None)
        return {sid: p.tokens for sid, p in self._pending.items()}

    def sample(self, logits: torch.Tensor, plan: SchedulePlan,
               sampler: Sampler) -> tuple[list[list[int]], list[list[TokenLogprob] | None], StepStats]:
        """Per ``plan.sample_seqs`` row: the tokens to append and their logprobs (when asked);
        rows with a proposal are verified, the others sampled by ``sampler`` as usual."""
        seqs = plan.sample_seqs
        spec_rows = plan.proposal_rows()
        proposals = {id(it.seq): it.proposal for it in plan.items if it.proposal}
        runs: list[list[int]] = [[] for _ in seqs]
        lps: list[list[TokenLogprob] | None] = [None] * len(seqs)
        plain = [i for i, s in enumerate(seqs) if id(s) not in spec_rows]
        if plain:
            out = sampler.sample(logits[plain], [seqs[i] for i in plain])
            for j, i in enumerate(plain):
                runs[i] = [out.tokens[j]]
                lp = out.logprobs[j]
                if seqs[i].params.logprobs and lp is not None:
                    lps[i] = [TokenLogprob(out.tokens[j], float(lp), list(out.top_logprobs[j] or []))]
        stats = StepStats()
        for i, seq in enumerate(seqs):
            if id(seq) not in spec_rows:
                continue
            prop = proposals[id(seq)]
            pend = self._pending.get(seq.seq_id)
            q = None  # the scheduler may have cut the proposal to fit the context: a prefix
            if pend is not None and pend.probs is not None and pend.tokens[: len(prop)] == prop:
                q = pend.probs[: len(prop)]
            if q is None and self.draft is not None and not seq.params.greedy:
                raise RuntimeError(f"no draft distribution for {seq.seq_id}'s proposal")
            v = verify(logits[spec_rows[id(seq)]], prop, seq, functools.partial(self.uniform, seq), draft_probs=q)
            runs[i], lps[i] = v.tokens, v.logprobs
            stats.proposed += len(prop)
            stats.accepted += v.accepted
            stats.verified += 1
            ad = self._lengths.get(seq.seq_id)
            if ad is not None:
                ad.observe(len(prop), v.accepted)
        self.proposed += stats.proposed
        self.accepted += stats.accepted
        self.verified += stats.verified
        return runs, lps, stats
