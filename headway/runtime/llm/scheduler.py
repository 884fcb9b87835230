"""Scheduler: owns admission, batch formation and preemption (continuous token-level batching).

Each ``schedule()`` forms one step: requests join and leave the running batch at every step;
prompts prefill in chunks under ``max_num_batched_tokens``; at most ``max_running`` run. Every
decoding sequence gets one token per step the budget allows (round-robin when it cannot take
them all: none starves). ``priority="prefill"`` (default) guarantees prefill work
``min_prefill_tokens`` of the budget; ``priority="decode"`` gives prefill only what is left.

Memory: admission matches the radix cache, reuses (locks) the longest cached prefix and
allocates only the rest; short of slots, a request waits (unlocked cache is evicted first), and
while others run it is admitted only when its whole uncached prompt fits beside the prefill they
still have to do (chunked prefill reserves chunk by chunk; this keeps long prompts from
preempting each other in turn). A
running sequence that cannot get a slot preempts the youngest running one (recompute: its
computed prefix goes into the cache as evictable, and it re-enters the front of the waiting
queue keeping its output, to resume by re-prefilling prompt+output). Waiting requests go
longest-cached-prefix-first, but one waiting ``aging_steps`` steps goes first. Finished
sequences insert prompt+output into the cache and unlock. n > 1: the prompt prefills once,
then forks into n sequences sampled from the same logits row, sharing the prompt's slots
through the cache (one lock each).

Speculative decoding: ``schedule(proposals=...)`` lets a decoding sequence compute its last
token plus proposed ones in one step (slots for all of them; short of slots, the proposal is
dropped before anyone is preempted). ``update`` then takes a run of tokens for that row: the
accepted proposals and the target's next token. It appends them up to the first stop (EOS,
stop id, max_tokens, full pool) and frees the slots of every proposed position past the kept
run, so a sequence never holds K/V of a token it does not have and the cache only ever
receives committed tokens.

Invariant (``check_invariant``, asserted in tests every step):
    pool.free + cache.evictable + cache.locked + sum(seq.num_private_slots) == pool.total

The engine step loop::

    sched = Scheduler(KVPool(num_slots), config=SchedulerConfig(eos_token_ids=(eos,)))
    sched.add("req-1", prompt_ids, SamplingParams(max_tokens=64))
    while sched.has_work():
        plan = sched.schedule()
        for seq in plan.finished:          # context could not grow (KV pool full): "length"
            stream(seq, detok(seq).flush(), seq.finish_reason)
        if plan.is_empty:
            continue
        logits = runner.forward(plan.to_forward_batch(device))   # [len(plan.sample_seqs), V]
        out = sampler.sample(logits, plan.sample_seqs)           # out.logprobs, out.top_logprobs
        for seq in sched.update(plan, out.tokens):               # seqs that got a token
            d = detok(seq)  # IncrementalDetokenizer(tok, seq.prompt_ids, seq.params.stop), per seq_id
            delta = d.push(seq.output_ids[-1])
            if delta.stop is not None:
                sched.finish(seq, FinishReason.STOP, delta.stop)
            text = delta.text + (d.flush() if seq.is_finished else "")
            stream(seq, text, seq.finish_reason)     # n > 1: seq.index is the choice index
    # client disconnect: sched.abort("req-1")
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Mapping, Sequence as Seq

import torch

from headway.runtime.llm.kv_offload import KVOffloadTier, restore_prefix
from headway.runtime.llm.kv_pool import KVPool
from headway.runtime.llm.plan import ScheduledSeq, SchedulePlan, SchedulerConfig
from headway.runtime.llm.radix_cache import RadixCache
from headway.runtime.llm.sequence import (
    FinishReason,
    SamplingParams,
    Sequence,
    SeqStatus,
    make_generator,
    validate_prompt,
)

__all__ = ["Scheduler", "SchedulerConfig", "SchedulePlan", "ScheduledSeq"]


class Scheduler:
    """Continuous batching over a ``KVPool`` and its ``RadixCache`` (see module docstring).

    Calls alternate ``schedule()`` / ``update(plan, tokens)``; ``add``, ``abort`` and
    ``finish`` may be called at any point, also while a plan is in flight (between schedule
    and update): tokens whose K/V the in-flight forward has not yet written are never cached.
    """

    def __init__(
        self,
        pool: KVPool,
        cache: RadixCache | None = None,
        config: SchedulerConfig | None = None,
        offload: KVOffloadTier | None = None,
    ) -> None:
        self.pool = pool
        self.offload = offload  # host tier: admission restores evicted prefixes from it
        self.cache = cache if cache is not None else RadixCache(pool)
        if self.cache.pool is not pool:
            raise ValueError("the radix cache must be built over the same KVPool")
        if offload is not None:
            self.cache.on_evict = offload.offload  # evicted prefixes move to the host tier
        self.config = config or SchedulerConfig()
        self.waiting: list[Sequence] = []  # arrival order (preempted ones re-enter at front)
        self.running: list[Sequence] = []  # admission order: oldest first
        self._requests: dict[str, list[Sequence]] = {}
        self._step = 0
        self._admit_counter = 0
        self.num_preemptions = 0
        self._inflight: SchedulePlan | None = None
        self._emit_counter = 0

    # ---- requests -------------------------------------------------------------------
    def add(
        self,
        request_id: str,
        prompt_ids: Seq[int],
        params: SamplingParams | None = None,
        *,
        cache_key: Hashable = None,
        now: float | None = None,
    ) -> Sequence:
        """Queue a request; returns its (first) sequence. Raises ``ValueError`` for input
        that can never run (empty prompt, prompt the KV pool can never hold, n too big)."""
        params = params or SamplingParams()
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already active")
        ids = validate_prompt(prompt_ids, self.pool.total)
        if params.n > self.config.max_running:
            raise ValueError(f"n={params.n} exceeds max_running={self.config.max_running}")
        seq = Sequence(
            seq_id=request_id,
            request_id=request_id,
            prompt_ids=ids,
            params=params,
            cache_key=cache_key,
            fork_pending=params.n > 1,
            generator=make_generator(params.seed, 0),
            arrival_time=time.monotonic() if now is None else now,
            arrival_step=self._step,
        )
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

    def finish(
        self,
        seq: Sequence,
        reason: FinishReason,
        stop_reason: str | int | None = None,
        now: float | None = None,
    ) -> None:
        """Finish ``seq``: cache its computed tokens, unlock, release it (idempotent). A stop
        string found in the text of the token that also reached the length limit makes it a
        stop: the client sees the text cut at the stop string."""
        if seq.status is SeqStatus.FINISHED:
            if reason is FinishReason.STOP and seq.finish_reason is FinishReason.LENGTH:
                seq.finish_reason, seq.stop_reason = reason, stop_reason
            return
        if seq.status is SeqStatus.RUNNING:
            self._release(seq, keep_in_cache=True)
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        seq.finish_time = time.monotonic() if now is None else now
        group = self._requests.get(seq.request_id)
        if group is not None and all(s.status is SeqStatus.FINISHED for s in group):
            del self._requests[seq.request_id]

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- accounting -----------------------------------------------------------------
    @property
    def private_slots(self) -> int:
        return sum(s.num_private_slots for s in self.running)

    def check_invariant(self) -> None:
        """pool.free + cache.evictable + cache.locked + private == pool.total."""
        self.cache.check()
        total = self.pool.num_free + self.cache.evictable + self.cache.locked + self.private_slots
        assert total == self.pool.total, (
            f"slot leak: free={self.pool.num_free} evictable={self.cache.evictable} "
            f"locked={self.cache.locked} private={self.private_slots} total={self.pool.total}"
        )
        for s in self.waiting:
            assert not s.slots and s.lock_node is None
        for s in self.running:
            assert s.num_computed - s.num_inflight <= s.num_tokens

    # ---- internals ------------------------------------------------------------------
    def _release(self, seq: Sequence, keep_in_cache: bool) -> None:
        """Give back a running sequence's slots: computed tokens go into the cache (where
        they stay evictable), then the lock is dropped."""
        valid = seq.num_computed - seq.num_inflight  # tokens whose K/V is really written
        assert valid >= seq.cached_len
        if keep_in_cache and valid:
            self.cache.insert(seq.cache_key, seq.all_ids[:valid], seq.slots[:valid])
            self.pool.free(seq.slots[valid:])
        else:
            self.pool.free(seq.slots[seq.cached_len :])
        seq.num_inflight = 0
        if seq.lock_node is not None:
            self.cache.unlock(seq.lock_node)
        seq.slots = []
        seq.cached_len = 0
        seq.lock_node = None

    def _cache_prefix(self, seq: Sequence) -> None:
        """Move the sequence's computed tokens into the cache and hold them by a lock."""
        k = seq.num_computed
        toks = seq.all_ids[:k]
        self.cache.insert(seq.cache_key, toks, seq.slots)
        m, slots, node = self.cache.match(seq.cache_key, toks, record=False)
        assert m == k
        self.cache.lock(node)
        if seq.lock_node is not None:
            self.cache.unlock(seq.lock_node)
        seq.slots, seq.cached_len, seq.lock_node = slots, k, node

    def _preempt(self, seq: Sequence, plan: SchedulePlan) -> None:
        self._release(seq, keep_in_cache=True)
        self.running.remove(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.insert(0, seq)
        plan.preempted.append(seq)

    def _reserve(self, n: int) -> bool:
        short = n - self.pool.num_free
        if short > 0:
            self.cache.evict(short)
        return self.pool.num_free >= n

    def _emit(self, plan: SchedulePlan, seq: Sequence, n: int, now: float, proposal: Seq[int] = ()) -> None:
        out = self.pool.alloc(n)
        assert out is not None
        start = seq.num_computed
        seq.slots.extend(out)
        seq.num_inflight = n
        known = n - len(proposal)
        item = ScheduledSeq(
            seq=seq,
            token_ids=seq.token_slice(start, start + known) + list(proposal),
            positions=list(range(start, start + n)),
            out_slots=out,
            context_slots=list(seq.slots),
            num_samples=0,
            proposal=list(proposal),
        )
        if seq.first_scheduled_time is None:
            seq.first_scheduled_time = now
        if start + known == seq.num_tokens:  # the last known token: sample the next one
            item.num_samples = 1
            plan.sample_seqs.append(seq)
            if seq.fork_pending:
                item.children = [seq.fork(i, now) for i in range(1, seq.params.n)]
                item.num_samples += len(item.children)
                plan.sample_seqs.extend(item.children)
        plan.items.append(item)

    def _waiting_order(self) -> list[Sequence]:
        cfg = self.config
        scan = self.waiting[: cfg.max_waiting_scan]
        resumed = [s for s in scan if s.num_preemptions > 0]
        fresh = [s for s in scan if s.num_preemptions == 0]
        aged = [s for s in fresh if self._step - s.arrival_step >= cfg.aging_steps]
        rest = [s for s in fresh if self._step - s.arrival_step < cfg.aging_steps]
        order = {id(s): i for i, s in enumerate(rest)}
        rest.sort(key=lambda s: (-self.cache.peek(s.cache_key, s.prompt_ids[:-1]), order[id(s)]))
        return resumed + aged + rest

    # ---- one step -------------------------------------------------------------------
    def schedule(self, now: float | None = None, prefill_cap: int | None = None,
                 proposals: Mapping[str, Seq[int]] | None = None) -> SchedulePlan:
        """Form one step. ``prefill_cap`` (optional) bounds this step's prefill tokens, so a
        step that carries running decodes stays short (the engine's ``PrefillChunker``).
        ``proposals`` (optional): ``seq_id`` -> tokens proposed after a decoding sequence's
        last token, computed with it this step (speculative decoding; see module docstring)."""
        if self._inflight is not None:
            raise RuntimeError(
                f"schedule() called again before update() of step {self._inflight.step}'s plan"
            )
        now = time.monotonic() if now is None else now
        self._step += 1
        cfg = self.config
        plan = SchedulePlan(step=self._step)
        budget = cfg.max_num_batched_tokens

        decodes = [s for s in self.running if not s.in_prefill]
        n_decodes = len(decodes)
        prefill_work = bool(self.waiting) or n_decodes < len(self.running)
        decode_cap = budget
        if cfg.priority == "prefill" and prefill_work:
            decode_cap = budget - (cfg.min_prefill_tokens or 0)
        decode_left = min(n_decodes, decode_cap)
        cap = budget if prefill_cap is None else max(1, prefill_cap)
        prefill_left = min(budget - decode_left, cap)
        # when the budget cannot take every decode, the least recently scheduled go first
        # (round-robin), so no running sequence is starved
        chosen = sorted(decodes, key=lambda s: s.last_scheduled)[:decode_left]
        allowed = {id(s) for s in chosen}

        # 1) running sequences, oldest first; decodes and continuing prefill chunks
        prefill_start = prefill_left
        scheduled: set[int] = set()
        for seq in list(self.running):
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted earlier in this loop
            proposal: Seq[int] = ()
            if not seq.in_prefill:
                if decode_left == 0 or id(seq) not in allowed:
                    continue
                proposal = (proposals or {}).get(seq.seq_id, ())
                room = self.pool.total - seq.num_tokens - 1  # the run must fit the context
                proposal = proposal[: max(0, room)]
                need = 1 + len(proposal)
            else:
                need = min(seq.num_tokens - seq.num_computed, prefill_left)
                if need == 0:
                    continue
            while not self._reserve(need):
                if proposal:  # short of slots: drop the proposal before preempting anyone
                    proposal, need = (), 1
                    continue
                if seq.in_prefill:
                    avail = self.pool.num_free + self.cache.evictable
                    if avail > 0:
                        need = min(need, avail)
                        continue
                victims = [s for s in self.running if id(s) not in scheduled and s is not seq]
                if victims:
                    self._preempt(max(victims, key=lambda s: s.admit_order), plan)
                elif len(self.running) > 1:
                    self._preempt(seq, plan)  # it is the youngest: wait for the others
                    need = 0
                    break
                else:  # alone and the pool is full: its context cannot grow
                    self.finish(seq, FinishReason.LENGTH, now=now)
                    plan.finished.append(seq)
                    need = 0
                    break
            if need == 0:
                continue
            if seq.in_prefill:
                prefill_left -= need
            else:
                decode_left -= 1
            scheduled.add(id(seq))
            self._emit(plan, seq, need, now, proposal)

        for rank, s in enumerate(chosen):  # round-robin order for the next short step
            if id(s) in scheduled:
                s.last_scheduled = self._emit_counter + rank
        self._emit_counter += len(chosen)

        # 2) admissions from the waiting queue, while budget and max_running allow
        prefill_left = min(budget - plan.num_tokens, cap - (prefill_start - prefill_left))
        n_running = sum(s.params.n if s.fork_pending else 1 for s in self.running)  # incl. forks to come
        admitting = bool(self.waiting) and not plan.preempted
        committed = sum(s.num_tokens - s.num_computed for s in self.running if s.in_prefill) if admitting else 0
        for seq in self._waiting_order() if admitting else []:  # short of memory (preempted): admit none
            cost = seq.params.n if seq.fork_pending else 1
            if prefill_left <= 0 or n_running + cost > cfg.max_running:
                break
            first = seq.num_preemptions == 0
            m, slots, node = self.cache.match(
                seq.cache_key, seq.all_ids[: seq.num_tokens - 1], record=first
            )
            self.cache.lock(node)
            if self.offload is not None:  # continue the match in the host tier (kv_offload)
                m, slots, node = restore_prefix(self.offload, self.cache, self._reserve, seq.cache_key,
                                                seq.all_ids[: seq.num_tokens - 1], (m, slots, node), record=first)
            chunk = min(seq.num_tokens - m, prefill_left)
            # the whole prompt must fit beside the prefill the running ones still have to do:
            # admitting on the first chunk alone lets two long prompts take turns preempting
            # each other (and evicting each other's computed prefix) under a small pool
            if self.running and (seq.num_tokens - m + committed + cfg.admission_headroom
                                 > self.pool.num_free + self.cache.evictable):
                self.cache.unlock(node)
                break
            if not self._reserve(chunk + cfg.admission_headroom):
                self.cache.unlock(node)
                break  # wait for slots (in order: nobody jumps a request that does not fit)
            self.waiting.remove(seq)
            seq.status = SeqStatus.RUNNING
            seq.slots, seq.cached_len, seq.lock_node = list(slots), m, node
            if first:
                seq.num_cached_prompt_tokens = m
            self._admit_counter += 1
            seq.admit_order = self._admit_counter
            self.running.append(seq)
            n_running += cost
            committed += seq.num_tokens - m - chunk
            prefill_left -= chunk
            self._emit(plan, seq, chunk, now)
        if not plan.is_empty:
            self._inflight = plan
        return plan

    def update(
        self, plan: SchedulePlan, sampled: Seq[int | Seq[int]] | torch.Tensor, now: float | None = None
    ) -> list[Sequence]:
        """Apply one step's sampled tokens (one per ``plan.sample_seqs`` row; a row that
        verified a proposal may get a run of tokens: accepted proposals + the next token).
        Appends them, finishes sequences on EOS / stop token ids / max_tokens / full context
        (a run is cut after its first stop), and forks n > 1 requests. Returns the sequences
        that received tokens, in row order."""
        now = time.monotonic() if now is None else now
        toks = sampled.tolist() if isinstance(sampled, torch.Tensor) else list(sampled)
        if plan.is_empty and not toks:
            return []
        if plan is not self._inflight:
            raise ValueError("update() got a plan that is not the one in flight (already applied?)")
        if len(toks) != len(plan.sample_seqs):
            raise ValueError(
                f"update: got {len(toks)} sampled tokens for {len(plan.sample_seqs)} rows"
            )
        proposed = {id(it.seq): len(it.proposal) for it in plan.items if it.proposal}
        runs = [[int(t) for t in r] if isinstance(r, (list, tuple)) else [int(r)] for r in toks]
        for seq, run in zip(plan.sample_seqs, runs):
            if not 1 <= len(run) <= 1 + proposed.get(id(seq), 0):
                raise ValueError(f"update: {seq.seq_id} got {len(run)} tokens for "
                                 f"{proposed.get(id(seq), 0)} proposed (1 + proposed at most)")
        self._inflight = None
        for it in plan.items:
            it.seq.num_inflight = 0
        for it in plan.items:
            if not it.children:
                continue
            parent = it.seq
            if parent.status is not SeqStatus.RUNNING:  # aborted between schedule and update
                for c in it.children:
                    c.status, c.finish_reason, c.finish_time = SeqStatus.FINISHED, FinishReason.ABORT, now
                continue
            self._cache_prefix(parent)
            parent.fork_pending = False
            for c in it.children:
                c.slots, c.cached_len, c.lock_node = list(parent.slots), parent.cached_len, parent.lock_node
                self.cache.lock(parent.lock_node)
                c.status = SeqStatus.RUNNING
                self._admit_counter += 1
                c.admit_order = self._admit_counter
                self.running.append(c)
                self._requests[parent.request_id].append(c)
        eos = set(self.config.eos_token_ids)
        got: list[Sequence] = []
        for seq, run in zip(plan.sample_seqs, runs):
            if seq.status is not SeqStatus.RUNNING:
                continue
            if seq.first_token_time is None:
                seq.first_token_time = now
            got.append(seq)
            p = seq.params
            reason: tuple[FinishReason, int | None] | None = None
            for tok in run:
                seq.output_ids.append(tok)
                if tok in eos and not p.ignore_eos:
                    reason = (FinishReason.STOP, None)
                elif tok in p.stop_token_ids:
                    reason = (FinishReason.STOP, tok)
                elif p.max_tokens is not None and len(seq.output_ids) >= p.max_tokens:
                    reason = (FinishReason.LENGTH, None)
                elif seq.num_tokens >= self.pool.total:
                    reason = (FinishReason.LENGTH, None)
                if reason is not None:
                    break
            if id(seq) in proposed:
                self._drop_uncommitted(seq)
            if reason is not None:
                self.finish(seq, reason[0], reason[1], now)
        return got

    def _drop_uncommitted(self, seq: Sequence) -> None:
        """Free the slots past the sequence's last known token (K/V of rejected or cut
        proposals): a decoding sequence holds exactly ``num_tokens - 1`` computed tokens."""
        keep = max(seq.num_tokens - 1, seq.cached_len)
        if len(seq.slots) > keep:
            self.pool.free(seq.slots[keep:])
            del seq.slots[keep:]

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
            self._drop_uncommitted(seq)
