"""Scheduler: decides what runs each step (continuous token-level batching); owns no memory.

``schedule()`` forms a step in two halves. ``_schedule_running``: each decoding sequence gets
one token if the budget allows (round-robin when it cannot take them all), prompts mid-prefill
continue in chunks; short of slots, a sequence drops its speculative proposal, then shrinks its
chunk, then preempts the youngest running one (recompute: its computed prefix stays cached, it
re-enters the front of the waiting queue keeping its output). ``_admit_waiting``: waiting
requests, longest cached prefix first (one waiting ``aging_steps`` steps goes first), join while
the budget and ``max_running`` allow and their whole uncached prompt fits beside the prefill the
running ones still owe. ``priority="prefill"`` guarantees prefill ``min_prefill_tokens`` of the
budget, ``"decode"`` gives it only what is left. n > 1: the prompt prefills once, then forks.
``update`` appends each row's tokens (a verified proposal's accepted run) up to the first stop.

Every slot, lock and cache operation is a verb of the ``KVManager`` (kv_manager.py), which keeps
and asserts the slot invariant. Calls alternate ``schedule()`` / ``update(plan, tokens)``;
``add``, ``abort``, ``finish`` and ``truncate`` may come between them (K/V the in-flight forward
has not written is never cached). The step loop: docs/engine-internals.md.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Literal, cast

import torch

from headway.runtime.llm.kv_manager import KVManager
from headway.runtime.llm.plan import ScheduledSeq, SchedulePlan
from headway.runtime.llm.sequence import (
    FinishReason,
    SamplingParams,
    SeqStatus,
    Sequence,
    make_generator,
    validate_prompt,
)

__all__ = ["SchedulePlan", "ScheduledSeq", "Scheduler", "SchedulerConfig"]


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 512
    max_running: int = 64
    priority: Literal["prefill", "decode"] = "prefill"
    # prefill share guaranteed per step when priority="prefill" (None: budget // 8)
    min_prefill_tokens: int | None = None
    aging_steps: int = 64  # a request waiting this many steps is admitted before cache hits
    max_waiting_scan: int = 256  # waiting requests considered per step (prefix ordering)
    admission_headroom: int = 0  # slots left free for running decodes when admitting
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        errs = []
        if self.max_num_batched_tokens < 1:
            errs.append(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_running < 1:
            errs.append(f"max_running must be >= 1, got {self.max_running}")
        if self.priority not in ("prefill", "decode"):
            errs.append(f"priority must be 'prefill' or 'decode', got {self.priority!r}")
        if self.min_prefill_tokens is None:
            object.__setattr__(self, "min_prefill_tokens", self.max_num_batched_tokens // 8)
        if not (0 <= (self.min_prefill_tokens or 0) < self.max_num_batched_tokens):
            errs.append(
                f"min_prefill_tokens must be in [0, max_num_batched_tokens), got {self.min_prefill_tokens}"
            )
        if self.aging_steps < 1 or self.max_waiting_scan < 1 or self.admission_headroom < 0:
            errs.append("aging_steps and max_waiting_scan must be >= 1, admission_headroom >= 0")
        if errs:
            raise ValueError("invalid scheduler config: " + "; ".join(errs))


class Scheduler:
    """Continuous batching over a ``KVManager`` (see module docstring)."""

    def __init__(self, kv: KVManager, config: SchedulerConfig | None = None) -> None:
        self.kv = kv
        self.config = config or SchedulerConfig()
        self.waiting: list[Sequence] = []  # arrival order (preempted ones re-enter at front)
        self.running: list[Sequence] = []  # admission order: oldest first
        self._requests: dict[str, list[Sequence]] = {}
        self._step = 0
        self._admit_counter = 0
        self._rr_counter = 0  # decode round-robin clock (Sequence.last_scheduled)
        self.num_preemptions = 0
        self._inflight: SchedulePlan | None = None

    # ---- requests -------------------------------------------------------------------
    def add(self, request_id: str, prompt_ids: Seq[int], params: SamplingParams | None = None, *,
            cache_key: Hashable = None, now: float | None = None) -> Sequence:
        """Queue a request; returns its (first) sequence. Raises ``ValueError`` for input
        that can never run (empty prompt, prompt the KV pool can never hold, n too big)."""
        params = params or SamplingParams()
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already active")
        ids = validate_prompt(prompt_ids, self.kv.total)
        if params.n > self.config.max_running:
            raise ValueError(f"n={params.n} exceeds max_running={self.config.max_running}")
        seq = Sequence(seq_id=request_id, request_id=request_id, prompt_ids=ids, params=params,
                       cache_key=cache_key, fork_pending=params.n > 1,
                       generator=make_generator(params.seed, 0),
                       arrival_time=time.monotonic() if now is None else now, arrival_step=self._step)
        self.waiting.append(seq)
        self._requests[request_id] = [seq]
        return seq

    def sequences(self, request_id: str) -> list[Sequence]:
        return list(self._requests.get(request_id, []))

    def abort(self, request_id: str, now: float | None = None) -> list[Sequence]:
        """Finish every sequence of the request at once (client disconnect)."""
        seqs = self._requests.get(request_id, [])
        for s in list(seqs):
            self.finish(s, FinishReason.ABORT, now=now)
        return list(seqs)

    def finish(self, seq: Sequence, reason: FinishReason, stop_reason: str | int | None = None,
               now: float | None = None) -> None:
        """Finish ``seq``: its computed tokens stay cached, its KV is released (idempotent). A
        stop string found in the text of the token that also reached the length limit makes
        it a stop: the client sees the text cut at the stop string."""
        if seq.status is SeqStatus.FINISHED:
            if reason is FinishReason.STOP and seq.finish_reason is FinishReason.LENGTH:
                seq.finish_reason, seq.stop_reason = reason, stop_reason
            return
        if seq.status is SeqStatus.RUNNING:
            self.kv.release(seq, keep_in_cache=True)
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason, seq.stop_reason = SeqStatus.FINISHED, reason, stop_reason
        seq.finish_time = time.monotonic() if now is None else now
        group = self._requests.get(seq.request_id)
        if group is not None and all(s.status is SeqStatus.FINISHED for s in group):
            del self._requests[seq.request_id]

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def check_invariant(self) -> None:
        """The manager's slot invariant, and: waiting sequences hold no KV; a running one never
        holds K/V past its tokens."""
        self.kv.check()
        for s in self.waiting:
            assert not s.slots and s.kv.lock is None
        for s in self.running:
            assert s.num_computed - s.num_inflight <= s.num_tokens

    # ---- one step -------------------------------------------------------------------
    def schedule(self, now: float | None = None, prefill_cap: int | None = None,
                 proposals: Mapping[str, Seq[int]] | None = None) -> SchedulePlan:
        """Form one step. ``prefill_cap`` (optional) bounds this step's prefill tokens, so a
        step that carries running decodes stays short (the engine's ``PrefillChunker``).
        ``proposals`` (optional): ``seq_id`` -> tokens proposed after a decoding sequence's
        last token, computed with it this step (speculative decoding)."""
        if self._inflight is not None:
            raise RuntimeError(f"schedule() called again before update() of step {self._inflight.step}'s plan")
        now = time.monotonic() if now is None else now
        self._step += 1
        plan = SchedulePlan(step=self._step)
        budget = self.config.max_num_batched_tokens
        cap = budget if prefill_cap is None else max(1, prefill_cap)
        prefill_used = self._schedule_running(plan, now, cap, proposals or {})
        if self.waiting and not plan.preempted:  # short of memory (preempted): admit none
            self._admit_waiting(plan, now, min(budget - plan.num_tokens, cap - prefill_used))
        if not plan.is_empty:
            self._inflight = plan
        return plan

    def _schedule_running(self, plan: SchedulePlan, now: float, cap: int,
                          proposals: Mapping[str, Seq[int]]) -> int:
        """Running sequences, oldest first: decodes (round-robin within the budget) and
        continuing prefill chunks. Returns the prefill tokens scheduled."""
        cfg, budget = self.config, self.config.max_num_batched_tokens
        decodes = [s for s in self.running if not s.in_prefill]
        prefill_work = bool(self.waiting) or len(decodes) < len(self.running)
        reserved = (cfg.min_prefill_tokens or 0) if cfg.priority == "prefill" and prefill_work else 0
        decode_left = min(len(decodes), budget - reserved)
        prefill_left = prefill_start = min(budget - decode_left, cap)
        chosen = sorted(decodes, key=lambda s: s.last_scheduled)[:decode_left]  # least recent first
        allowed = {id(s) for s in chosen}
        scheduled: set[int] = set()
        for seq in list(self.running):
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted earlier in this loop
            prefill, proposal = seq.in_prefill, cast(tuple[int, ...], ())
            if not prefill:
                if decode_left == 0 or id(seq) not in allowed:
                    continue
                room = self.kv.total - seq.num_tokens - 1  # the run must fit the context
                proposal = tuple(proposals.get(seq.seq_id, ()))[: max(0, room)]
                need = 1 + len(proposal)
            else:
                need = min(seq.num_tokens - seq.num_computed, prefill_left)
                if need == 0:
                    continue
            got = self._allocate_or_preempt(plan, seq, need, proposal, scheduled, now)
            if got is None:
                continue
            slots, proposal = got
            if prefill:
                prefill_left -= len(slots)
            else:
                decode_left -= 1
            scheduled.add(id(seq))
            plan.add(seq, slots, now, proposal)
        for rank, s in enumerate(chosen):  # round-robin order for the next short step
            if id(s) in scheduled:
                s.last_scheduled = self._rr_counter + rank
        self._rr_counter += len(chosen)
        return prefill_start - prefill_left

    def _allocate_or_preempt(self, plan: SchedulePlan, seq: Sequence, need: int, proposal: tuple[int, ...],
                             scheduled: set[int], now: float) -> tuple[list[int], tuple[int, ...]] | None:
        """Slots for ``need`` tokens of running ``seq``; short, drop its proposal, then shrink a
        prefill chunk, then preempt the youngest unscheduled sequence (``seq`` itself when it is
        the youngest; finished "length" when it runs alone in a full pool: None)."""
        while (slots := self.kv.allocate(seq, need)) is None:
            if proposal:
                proposal, need = (), 1
                continue
            if seq.in_prefill and self.kv.available > 0:
                need = min(need, self.kv.available)
                continue
            victims = [s for s in self.running if id(s) not in scheduled and s is not seq]
            if victims:
                self._preempt(max(victims, key=lambda s: s.admit_order), plan)
            elif len(self.running) > 1:
                self._preempt(seq, plan)  # it is the youngest: wait for the others
                return None
            else:  # alone and the pool is full: its context cannot grow
                self.finish(seq, FinishReason.LENGTH, now=now)
                plan.finished.append(seq)
                return None
        return slots, proposal

    def _admit_waiting(self, plan: SchedulePlan, now: float, prefill_left: int) -> None:
        """Admit waiting requests in ``_waiting_order`` while the budget, ``max_running`` and
        memory allow; the first that does not fit stops admission (nobody jumps it)."""
        cfg = self.config
        n_running = sum(s.params.n if s.fork_pending else 1 for s in self.running)  # incl. forks to come
        committed = sum(s.num_tokens - s.num_computed for s in self.running if s.in_prefill)
        for seq in self._waiting_order():
            cost = seq.params.n if seq.fork_pending else 1
            if prefill_left <= 0 or n_running + cost > cfg.max_running:
                break
            first = seq.num_preemptions == 0
            m = self.kv.admit(seq, record=first)
            chunk = min(seq.num_tokens - m, prefill_left)
            # the whole prompt must fit beside the prefill the running ones still have to do:
            # admitting on the first chunk alone lets two long prompts take turns preempting
            # each other (and evicting each other's computed prefix) under a small pool
            if (self.running and seq.num_tokens - m + committed + cfg.admission_headroom > self.kv.available
                    or not self.kv.make_room(chunk + cfg.admission_headroom)):
                self.kv.release(seq, keep_in_cache=False)
                break
            slots = self.kv.allocate(seq, chunk)
            assert slots is not None  # make_room(chunk + headroom) succeeded
            self.waiting.remove(seq)
            seq.status = SeqStatus.RUNNING
            if first:
                seq.num_cached_prompt_tokens = m
                self.kv.count_prompt(len(seq.prompt_ids), m)
            self._admit_counter += 1
            seq.admit_order = self._admit_counter
            self.running.append(seq)
            n_running += cost
            committed += seq.num_tokens - m - chunk
            prefill_left -= chunk
            plan.add(seq, slots, now)

    # ---- after the forward ------------------------------------------------------------
    def update(self, plan: SchedulePlan, sampled: Seq[int | Seq[int]] | torch.Tensor,
               now: float | None = None) -> list[Sequence]:
        """Apply one step's sampled tokens (one per ``plan.sample_seqs`` row; a row that
        verified a proposal may get a run of tokens: accepted proposals + the next token).
        Appends them, finishes sequences on EOS / stop token ids / max_tokens / full context
        (a run is cut after its first stop), and forks n > 1 requests. Returns the sequences
        that received tokens, in row order."""
        now = time.monotonic() if now is None else now
        runs = plan.runs(sampled)
        if plan.is_empty and not runs:
            return []
        if plan is not self._inflight:
            raise ValueError("update() got a plan that is not the one in flight (already applied?)")
        proposed = {id(it.seq) for it in plan.items if it.proposal}
        self._inflight = None
        for it in plan.items:
            self.kv.written(it.seq)
        for it in plan.items:
            if it.children:
                self._fork(it.seq, it.children, now)
        got: list[Sequence] = []
        for seq, run in zip(plan.sample_seqs, runs):
            if seq.status is not SeqStatus.RUNNING:
                continue
            if seq.first_token_time is None:
                seq.first_token_time = now
            got.append(seq)
            reason = seq.append_run(run, self.config.eos_token_ids, self.kv.total)
            if id(seq) in proposed:
                self.kv.drop_uncommitted(seq)
            if reason is not None:
                self.finish(seq, reason[0], reason[1], now)
        return got

    def _fork(self, parent: Sequence, children: list[Sequence], now: float) -> None:
        """n > 1: the prompt's prefill is done; the children share its KV and start running."""
        if parent.status is not SeqStatus.RUNNING:  # aborted between schedule and update
            for c in children:
                c.status, c.finish_reason, c.finish_time = SeqStatus.FINISHED, FinishReason.ABORT, now
            return
        self.kv.commit(parent)
        parent.fork_pending = False
        for c in children:
            self.kv.fork(parent, c)
            c.status = SeqStatus.RUNNING
            self._admit_counter += 1
            c.admit_order = self._admit_counter
            self.running.append(c)
            self._requests[parent.request_id].append(c)

    def truncate(self, seq: Sequence, num_output: int) -> None:
        """Cut the output to its first ``num_output`` tokens (a stop string found inside a
        run of accepted tokens: nothing past it is kept), freeing the K/V past the new end.
        Call between ``update`` and the next ``schedule``, before ``finish``."""
        if self._inflight is not None:
            raise RuntimeError("truncate() while a plan is in flight")
        if not 1 <= num_output <= len(seq.output_ids):
            raise ValueError(f"truncate: num_output must be in [1, {len(seq.output_ids)}], got {num_output}")
        del seq.output_ids[num_output:]
        if seq.status is SeqStatus.RUNNING:
            self.kv.drop_uncommitted(seq)

    def _waiting_order(self) -> list[Sequence]:
        cfg = self.config
        scan = self.waiting[: cfg.max_waiting_scan]
        resumed = [s for s in scan if s.num_preemptions > 0]
        fresh = [s for s in scan if s.num_preemptions == 0]
        aged = [s for s in fresh if self._step - s.arrival_step >= cfg.aging_steps]
        rest = [s for s in fresh if self._step - s.arrival_step < cfg.aging_steps]
        order = {id(s): i for i, s in enumerate(rest)}
        rest.sort(key=lambda s: (-self.kv.peek(s.cache_key, s.prompt_ids[:-1]), order[id(s)]))
        return resumed + aged + rest

    def _preempt(self, seq: Sequence, plan: SchedulePlan) -> None:
        self.kv.release(seq, keep_in_cache=True)
        self.running.remove(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.insert(0, seq)
        plan.preempted.append(seq)
