"""The LLM engine: one step loop on its own thread, driving scheduler -> runner -> sampler.

Three parts, each in its own module:

- the step loop (here): `_step` reads as schedule, forward, sample, commit, emit; the helpers
  under it do the speculation accounting, grammar masking, chunker timing and metrics;
- the bridge between the engine thread and asyncio (bridge.py): `generate()` puts a typed
  `AddRequest` command and reads the request's channel; leaving the iterator early (client
  disconnect, cancellation) puts an `Abort`, which frees its KV at once; each step's output
  reaches each event loop in one callback;
- output emission (emission.py): detokenization, stop strings, logprobs, per-request output
  metrics. A stop string is a decision emission returns; the commit here applies it to the
  scheduler (truncate + finish).

Everything the loop touches (scheduler, cache, runner, emission) is touched only by the loop's
thread; other threads talk to it through the bridge. The engine raises its own errors
(errors.py); the API layer translates them to its wire format.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Hashable
from pathlib import Path
from typing import Any, cast

import torch

from headway.digest import root_hash
from headway.runtime.llm.bridge import Abort, AddRequest, Bridge, CallOnLoop, Command, InjectFault, Wake
from headway.runtime.llm.chunking import PrefillChunker
from headway.runtime.llm.device import choose_dtype, default_device
from headway.runtime.llm.emission import Emission, RequestOutput
from headway.runtime.llm.errors import EngineFailed, EngineUnavailable, InvalidRequest
from headway.runtime.llm.grammar import GrammarCompiler, GrammarMasker
from headway.runtime.llm.kv_manager import KVManager
from headway.runtime.llm.kv_offload import KVOffloadTier
from headway.runtime.llm.lora import AdapterCache, AdapterError
from headway.runtime.llm.metrics import EngineMetrics
from headway.runtime.llm.outputs import ChoiceDelta, TokenLogprob
from headway.runtime.llm.runner import ModelRunner
from headway.runtime.llm.sampling import Sampler
from headway.runtime.llm.scheduler import SchedulePlan, Scheduler, SchedulerConfig
from headway.runtime.llm.sequence import FinishReason, SamplingParams, Sequence
from headway.runtime.llm.speculation import SpeculativeConfig, Speculator
from headway.tokenization import ModelTokenizer

log = logging.getLogger("headway.llm")


def adapter_cache_key(adapter: str, generation: int, salt: Hashable = None) -> tuple[Any, ...]:
    """The radix isolation key of an adapter's requests (published as a digest root per adapter)."""
    return ("lora", adapter, generation, salt)


class LLMEngine:
    def __init__(self, model_dir: str | Path, *, dtype: str = "auto", device: str | None = None,
                 max_model_len: int | None = None, kv_cache_tokens: int | None = None,
                 max_num_batched_tokens: int = 512, max_running: int = 64, enable_prefix_caching: bool = True,
                 num_threads: int | None = None, model_name: str = "model", itl_factor: float = 1.5,
                 quantization: str = "none", speculative: SpeculativeConfig | None = None,
                 kv_offload_tokens: int = 0, lora_adapters: dict[str, str] | None = None, max_loras: int = 4,
                 max_lora_rank: int = 64, lora_memory_mb: float = 512):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = torch.device(device or default_device())
        self.tokenizer = ModelTokenizer(model_dir)
        self.dtype = choose_dtype(dtype, self.device)
        self.runner = ModelRunner(model_dir, dtype=self.dtype, device=str(self.device), num_slots=kv_cache_tokens,
                                  quantization=quantization)
        self.quantization = self.runner.quantization or "none"
        cfg = self.runner.config
        self.max_model_len = min(max_model_len or cfg.max_position, self.runner.num_slots - 1)
        # the one owner of KV memory: pool, prefix cache and the host tier under it (kv_manager.py);
        # nothing to restore without prefix caching
        self.kv = KVManager(self.runner.num_slots, offload=KVOffloadTier(kv_offload_tokens, self.runner.kv)
                            if kv_offload_tokens and enable_prefix_caching else None)
        eos = tuple(sorted(self.tokenizer.eos_token_ids))
        self.scheduler = Scheduler(self.kv, SchedulerConfig(
            max_num_batched_tokens=max_num_batched_tokens, max_running=max_running, eos_token_ids=eos))
        self.chunker = PrefillChunker(budget=max_num_batched_tokens, itl_factor=itl_factor)
        self.prefix_caching = enable_prefix_caching
        self.sampler = Sampler()
        self.speculator = self._speculator(speculative, Path(model_dir)) if speculative else None
        self.grammars = GrammarCompiler(self.tokenizer.tokenizer, vocab_size=cfg.vocab_size,
                                        stop_token_ids=list(eos))  # compiles off this loop
        self.masker = GrammarMasker()
        self.metrics = EngineMetrics(model_name)
        self.loras = AdapterCache(self.runner.model, cfg, dtype=self.dtype, device=self.device, max_loras=max_loras,
                                  max_rank=max_lora_rank, memory_bytes=int(lora_memory_mb * 2**20),
                                  on_event=self.metrics.lora_event)
        for name, path in (lora_adapters or {}).items():
            self.loras.register(name, path)
        self.emission = Emission(self.tokenizer.tokenizer, self.metrics)  # the requests it streams to
        self._bridge = Bridge()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.failure: str | None = None  # why the loop thread died; set once, by that thread
        self._recent: deque[tuple[float, int]] = deque()
        self.tokens_per_s = 0.0
        self.steps = 0
        self._snapshot_at = 0.0
        self._snapshot: dict[str, Any] = self._take_snapshot()
        log.info("engine ready: %s, dtype=%s, quantization=%s, device=%s, %d KV slots, max_model_len=%d",
                 Path(model_dir).name, str(self.dtype).removeprefix("torch."), self.quantization, self.device,
                 self.runner.num_slots, self.max_model_len)
        if self.speculator is not None:
            log.info("speculative decoding: %s", self.speculator.config.describe())
        if self.kv.offload is not None:
            log.info("KV offload tier: %d tokens in host memory (%.0f MiB)", self.kv.offload.capacity,
                     self.kv.offload.nbytes / 2**20)

    def _speculator(self, cfg: SpeculativeConfig, model_dir: Path) -> Speculator:
        if cfg.method == "ngram":
            return Speculator(cfg)
        from headway.runtime.llm.speculation.draft import DraftProposer

        draft = DraftProposer(cfg.draft_model_dir or model_dir, target_vocab=self.runner.vocab_size,
                              num_layers=cfg.draft_layers, dtype=self.dtype, device=self.device,
                              num_slots=self.runner.num_slots)
        return Speculator(cfg, draft=draft)

    # ---- lifecycle --------------------------------------------------------------------------

    @classmethod
    def launch(cls, *args: Any, **kwargs: Any) -> LLMEngine:
        """Build the engine and run its step loop on one dedicated thread, and return it once
        loaded. Loading and stepping must happen on the same thread: torch's CPU thread pool
        belongs to the thread that first used it, and a model loaded on one thread and stepped
        on another ran ~3x slower here (measured: 34 vs 100 ms per batch-32 decode step)."""
        box: dict[str, Any] = {}
        loaded = threading.Event()

        def main() -> None:
            try:
                torch.set_flush_denormal(True)
                engine = cls(*args, **kwargs)
            except BaseException as exc:  # reported to the caller of launch()
                box["error"] = exc
                loaded.set()
                return
            engine._thread = threading.current_thread()
            box["engine"] = engine
            loaded.set()
            try:
                engine._run()
            except BaseException as exc:  # the loop itself broke: fail loudly, never hang callers
                engine._fail(exc)
                return
            if not engine._stopping:
                engine._fail(RuntimeError("the engine loop ended without being stopped"))

        threading.Thread(target=main, name="headway-engine", daemon=True).start()
        loaded.wait()
        if "error" in box:
            raise box["error"]
        engine: LLMEngine = box["engine"]
        return engine

    def inject_fault(self) -> None:
        """Make the loop thread raise outside a step, as a real bug would (tests only: the server
        calls this on SIGUSR1 when HEADWAY_TEST_FAULTS=1). Safe to call from a signal handler."""
        self._bridge.put(InjectFault())

    def _fail(self, exc: BaseException) -> None:
        """The loop thread is ending on an error: record why (the server turns not ready and
        refuses new requests) and fail every request it holds or has not yet taken, at once.
        `failure` is set before the command queue is drained, and `generate()` checks it after it
        queues, so no request can slip in between and wait forever."""
        self.failure = f"{type(exc).__name__}: {exc}"
        log.critical("engine thread died: %s", self.failure, exc_info=exc)
        error = EngineFailed(self.failure)
        for out in self.emission.close_all():
            out.channel.send(error)
        self._bridge.fail_queued(error)
        try:
            self._bridge.flush()
        except Exception:  # noqa: BLE001 - a loop that closed cannot be told; its callers are gone
            log.exception("could not deliver the engine failure to every request")

    def stop(self) -> None:
        self._stopping = True
        self._bridge.put(Wake())
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.grammars.shutdown()

    # ---- the asyncio side -------------------------------------------------------------------

    async def generate(self, prompt_ids: list[int], params: SamplingParams, *,
                       cache_key: Hashable = None, adapter: str | None = None) -> AsyncIterator[list[ChoiceDelta]]:
        """Yield each step's new output for this request until all its n choices finish
        (``adapter``: a registered LoRA adapter's name, None for the base model). Raises
        EngineFailed / EngineUnavailable (503), InvalidRequest (400) or AdapterError."""
        self._check_running()
        channel = self._bridge.open()
        key = cache_key if self.prefix_caching else ("nocache", channel.request_id)
        self._bridge.put(AddRequest(channel, list(prompt_ids), params, key, adapter))
        self._check_running()  # died meanwhile: _fail may have drained the queue before this put
        try:
            while (deltas := await channel.next()) is not None:
                yield deltas
        finally:
            if not channel.closed:  # left early: free its KV now
                self._bridge.put(Abort(channel.request_id))

    def _check_running(self) -> None:
        if self.failure is not None:
            raise EngineFailed(self.failure)
        if self._thread is None or not self._thread.is_alive():
            raise EngineUnavailable("the engine is not running")

    async def _on_loop(self, fn: Callable[[], object]) -> object:
        self._check_running()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[object] = loop.create_future()
        self._bridge.put(CallOnLoop(fn, loop, fut))
        self._check_running()
        return await fut

    async def load_adapter(self, name: str, path: str) -> None:
        """Register a PEFT LoRA directory under ``name``; raises AdapterError (400/409)."""
        if name in self.loras.names:
            raise AdapterError(f"adapter {name!r} is already loaded; unload it first or pick another name", 409)
        # read back from here after an eviction (no I/O: $HOME and the working directory)
        path = str(Path(path).expanduser().absolute())  # noqa: ASYNC240
        weights = await asyncio.to_thread(self.loras.read, name, path)
        await self._on_loop(lambda: self.loras.register(name, path, weights))

    async def unload_adapter(self, name: str) -> None:
        """Stop serving ``name`` (running requests on it finish); raises AdapterError (404)."""
        await self._on_loop(lambda: self.loras.unregister(name))

    # ---- the loop thread: commands ------------------------------------------------------------

    def _apply(self, cmd: Command) -> None:
        if isinstance(cmd, AddRequest):
            self._add(cmd)
        elif isinstance(cmd, Abort):
            if (gone := self.emission.close(cmd.request_id)) is not None:
                self._forget(gone)
                for seq in self.scheduler.abort(cmd.request_id):
                    self.emission.record_finish(seq)
        elif isinstance(cmd, InjectFault):
            raise RuntimeError("fault injected for a test (HEADWAY_TEST_FAULTS=1, SIGUSR1)")
        elif isinstance(cmd, CallOnLoop):  # run on this thread for an asyncio caller (adapter load/unload)
            try:
                result, error = cmd.fn(), None
            except Exception as exc:
                result, error = None, exc
            self._snapshot = self._take_snapshot()
            cmd.settle(result, error)

    def _add(self, cmd: AddRequest) -> None:
        channel, key, adapter = cmd.channel, cmd.cache_key, cmd.adapter
        if adapter is not None:
            try:
                reg = self.loras.acquire(adapter)
            except AdapterError as exc:
                channel.send(exc)
                return
            key = adapter_cache_key(adapter, reg.generation, key)  # prefix-cache isolation per adapter
        try:
            seq = self.scheduler.add(channel.request_id, cmd.prompt_ids, cmd.params, cache_key=key)
        except ValueError as exc:
            if adapter is not None:
                self.loras.release(adapter)
            channel.send(InvalidRequest(str(exc), param="prompt"))
            return
        seq.adapter = adapter
        self.emission.open(channel, cmd.params.n, adapter)
        self.metrics.prompt_tokens.inc(len(cmd.prompt_ids))

    def _forget(self, out: RequestOutput) -> None:
        """The request is done with its adapter (finished, aborted or failed)."""
        if out.adapter is not None:
            self.loras.release(out.adapter)
            out.adapter = None

    # ---- the loop thread: the step loop -----------------------------------------------------

    def _run(self) -> None:
        # A short switch interval: the step loop reacquires the GIL after every torch op and
        # must not wait out the default 5 ms each time the event loop thread holds it.
        sys.setswitchinterval(0.0005)
        while not self._stopping:
            self._refresh_snapshot(force=not self.scheduler.has_work())
            for cmd in self._bridge.commands(block=not self.scheduler.has_work()):
                self._apply(cmd)
            if not self.scheduler.has_work():
                self._count_tokens(0, time.monotonic())  # idle: tokens/s decays to 0
                self._gauges()  # an abort may have emptied the batch
                self._bridge.flush()
                continue
            try:
                self._step()
            except Exception as exc:  # a broken step fails its requests loudly, never silently
                log.exception("engine step failed")
                self._fail_requests(RuntimeError(f"engine step failed: {type(exc).__name__}: {exc}"))
            self._bridge.flush()
        for out in self.emission.requests.values():
            out.channel.send(EngineUnavailable("the server is shutting down"))
        self._bridge.flush()

    def _step(self) -> None:
        """One step: schedule, forward, sample, commit, emit."""
        started = time.perf_counter()
        plan = self._schedule()
        if plan.is_empty:
            if not plan.finished:
                time.sleep(0.001)  # nothing runnable this instant (waiting for memory)
            return
        logits = self._forward(plan)
        runs, lps = self._sample(logits, plan)
        got, before = self._commit(plan, runs, started)
        self._emit_step(plan, got, before, lps)

    def _schedule(self) -> SchedulePlan:
        """This step's plan (with the speculator's proposals and the chunker's prefill cap);
        sequences it finished without running (e.g. an aborted prefill) are emitted at once."""
        running = self.scheduler.running
        decodes = sum(1 for s in running if not s.in_prefill)
        prefilling = len(running) - decodes + len(self.scheduler.waiting)
        proposals = self.speculator.propose(running) if self.speculator is not None else None
        plan = self.scheduler.schedule(prefill_cap=self.chunker.prefill_cap(decodes, prefilling), proposals=proposals)
        for seq in plan.finished:
            self._emit_seq(seq, [], None, time.monotonic())
        if plan.preempted:
            self.metrics.preemptions.inc(len(plan.preempted))
        return plan

    def _forward(self, plan: SchedulePlan) -> torch.Tensor:
        batch = plan.to_forward_batch(self.device)
        if self.loras.resident:
            self.loras.begin_step((it.seq.adapter, len(it.token_ids)) for it in plan.items)
        try:
            logits: torch.Tensor = self.runner.forward(batch)
        finally:
            self.loras.end_step()
        # grammar rows (and each proposed position of theirs): disallowed tokens -> -inf
        self.masker.mask(logits, plan.sample_seqs, plan)
        return logits

    def _sample(self, logits: torch.Tensor,
                plan: SchedulePlan) -> tuple[list[list[int]], list[list[TokenLogprob] | None]]:
        """Per sample row: the tokens to append (a verified proposal: several) and logprobs."""
        if self.speculator is not None and plan.num_proposed:
            runs, lps, stats = self.speculator.sample(logits, plan, self.sampler)
            self.metrics.speculation(stats.proposed, stats.accepted, stats.verified,
                                     self.speculator.acceptance_rate, self.speculator.mean_accepted_length)
            return runs, lps
        if not plan.sample_seqs:
            return [], []
        out = self.sampler.sample(logits, plan.sample_seqs)
        lps = [
            [TokenLogprob(t, float(lp), list(top or []))] if s.params.logprobs and lp is not None else None
            for s, t, lp, top in zip(plan.sample_seqs, out.tokens, out.logprobs, out.top_logprobs)]
        return [[t] for t in out.tokens], lps

    def _commit(self, plan: SchedulePlan, runs: list[list[int]],
                started: float) -> tuple[list[Sequence], dict[int, int]]:
        """Append the sampled tokens (the scheduler finishes sequences on EOS, stop ids, length;
        a grammar that is complete finishes its sequence); returns the sequences that got tokens
        and each one's output length before them."""
        before = {id(s): len(s.output_ids) for s in plan.sample_seqs}
        got = self.scheduler.update(plan, runs)
        for row in self.masker.accept(got, before):  # the grammar is complete
            self.scheduler.finish(cast(Sequence, row), FinishReason.STOP)
        decoded = sum(1 for it in plan.items if len(it.token_ids) == 1 + len(it.proposal))
        self.chunker.observe(decoded, plan.num_tokens - decoded, time.perf_counter() - started)
        self.steps += 1
        return got, before

    def _emit_step(self, plan: SchedulePlan, got: list[Sequence], before: dict[int, int],
                   lps: list[list[TokenLogprob] | None]) -> None:
        """Stream each sequence's new tokens, then the step's counters and gauges."""
        rows = {id(s): i for i, s in enumerate(plan.sample_seqs)}
        now = time.monotonic()
        emitted = 0
        for seq in got:
            new = seq.output_ids[before[id(seq)]:]
            lp = lps[rows[id(seq)]]
            emitted += self._emit_seq(seq, new, lp[: len(new)] if lp else None, now)
        self._count_tokens(emitted, now)
        self._gauges()
        self._bridge.flush()

    def _emit_seq(self, seq: Sequence, new: list[int], lps: list[TokenLogprob] | None, now: float) -> int:
        """Stream one sequence's new tokens; returns how many were kept. A stop string that
        emission finds ends the choice: applied here to the scheduler (inside a run of accepted
        tokens it also cuts the run there) before the delta goes out."""
        out = self.emission.get(seq.request_id)
        if out is None:  # aborted meanwhile
            return 0
        stop = out.decode(seq, new, now)
        if stop is not None:
            if stop.cut is not None:
                self.scheduler.truncate(seq, stop.cut)
                new, lps = new[: stop.kept], lps[: stop.kept] if lps else None
            self.scheduler.finish(seq, FinishReason.STOP, stop.text)
        if out.send(seq, new, lps):  # the request's last choice finished
            self.emission.close(out.request_id)
            self._forget(out)
        return len(new)

    def _fail_requests(self, error: BaseException) -> None:
        """A step broke: abort every request it holds and tell each one why."""
        for out in self.emission.close_all():
            self._forget(out)
            for seq in self.scheduler.abort(out.request_id):
                self.emission.record_finish(seq)
            out.channel.send(error)

    # ---- metrics and the replica-state contract ---------------------------------------------

    def _count_tokens(self, n: int, now: float) -> None:
        self.metrics.generation_tokens.inc(n)
        self._recent.append((now, n))
        while self._recent and self._recent[0][0] < now - 5.0:
            self._recent.popleft()
        span = max(now - self._recent[0][0], 1e-3) if len(self._recent) > 1 else 1.0
        self.tokens_per_s = sum(k for _, k in self._recent) / span
        self.metrics.tokens_per_s.set(self.tokens_per_s)

    def _gauges(self) -> None:
        kv = self.kv
        self.metrics.running.set(len(self.scheduler.running))
        self.metrics.waiting.set(len(self.scheduler.waiting))
        self.metrics.kv_usage.set((kv.total - kv.num_free - kv.evictable) / kv.total)
        # prompt tokens found cached / looked up, once per request (kept by the KV manager): the
        # figure behind /metrics' hit and query counters, the hit-rate gauge and /headway/state alike
        self.metrics.observe_prefix_cache(kv.hit_tokens, kv.query_tokens)
        self.metrics.cache_hit_rate.set(kv.hit_rate)

    # ---- the replica-state contract ---------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """The latest snapshot taken by the loop thread (never reads live structures), and the
        grammar compiler's counters (its own lock keeps them)."""
        return {**self._snapshot, "grammar": self.grammars.stats()}

    def _refresh_snapshot(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._snapshot_at < 0.25:
            return
        self._snapshot_at = now
        self._snapshot = self._take_snapshot()
        if self._snapshot["kv_offload"] is not None:  # the tier's counters follow its snapshot, not every step
            self.metrics.observe_offload(self._snapshot["kv_offload"])

    def _take_snapshot(self) -> dict[str, Any]:
        total, free, evictable = self.kv.total, self.kv.num_free, self.kv.evictable
        running, waiting = len(self.scheduler.running), len(self.scheduler.waiting)
        return {
            "in_flight": running + waiting, "queued": waiting, "running": running, "waiting": waiting,
            "kv": {"total_tokens": total, "used_tokens": total - free, "evictable_tokens": evictable},
            "prefix_cache": {"hit_rate": round(self.kv.hit_rate, 4), "hit_tokens": self.kv.hit_tokens,
                             "query_tokens": self.kv.query_tokens},
            "tokens_per_s": round(self.tokens_per_s, 1), "preemptions": self.scheduler.num_preemptions,
            "prefill_tokens_per_s": (round(1.0 / self.chunker.prefill_token_s, 1)
                                     if self.chunker.prefill_token_s else None),
            "prefix_digest": {"block_tokens": 64, "hashes": self.kv.digest(64),
                              # each adapter's chain starts from its own root (its cache is isolated)
                              "roots": {name: root_hash(adapter_cache_key(name, reg.generation))
                                        for name, reg in self.loras.registered.items()}},
            "dtype": str(self.dtype).removeprefix("torch."), "quantization": self.quantization,
            "device": str(self.device),
            "max_model_len": self.max_model_len,
            "speculative": self._speculation_state(),
            "kv_offload": self.kv.offload.stats() if self.kv.offload is not None else None,
            "adapters": list(self.loras.names), "lora": self.loras.stats(),
        }

    def _speculation_state(self) -> dict[str, Any] | None:
        sp = self.speculator
        if sp is None:
            return None
        return {"method": sp.config.method, "num_tokens": sp.config.num_tokens, "max_batch": sp.config.max_batch,
                "proposed_tokens": sp.proposed, "accepted_tokens": sp.accepted,
                "acceptance_rate": round(sp.acceptance_rate, 4),
                "mean_accepted_length": round(sp.mean_accepted_length, 3)}
