"""The LLM engine: one step loop on its own thread, driving scheduler -> runner -> sampler.

Owns the step loop and the bridge between it and asyncio callers: `generate()` queues a
request and yields `ChoiceDelta` lists as tokens are produced; leaving the iterator early
(client disconnect, cancellation) aborts the request and frees its KV at once. Everything the
loop touches (scheduler, cache, runner) is touched only by the loop's thread; other threads
talk to it through a command queue.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from headway.digest import root_hash
from headway.runtime.llm.chunking import PrefillChunker
from headway.runtime.llm.detokenizer import IncrementalDetokenizer
from headway.runtime.llm.device import choose_dtype, default_device
from headway.runtime.llm.grammar import GrammarCompiler, GrammarMasker
from headway.runtime.llm.kv_manager import KVManager
from headway.runtime.llm.kv_offload import KVOffloadTier
from headway.runtime.llm.lora import AdapterCache, AdapterError
from headway.runtime.llm.metrics import EngineMetrics
from headway.runtime.llm.openai_types import OpenAIError
from headway.runtime.llm.outputs import ChoiceDelta, TokenLogprob
from headway.runtime.llm.runner import ModelRunner
from headway.runtime.llm.sampling import Sampler
from headway.runtime.llm.scheduler import SchedulePlan, Scheduler, SchedulerConfig
from headway.runtime.llm.sequence import FinishReason, SamplingParams, Sequence
from headway.runtime.llm.speculation import SpeculativeConfig, Speculator
from headway.tokenization import ModelTokenizer

log = logging.getLogger("headway.llm")

_DONE = object()


def adapter_cache_key(adapter: str, generation: int, salt: Hashable = None) -> tuple[Any, ...]:
    """The radix isolation key of an adapter's requests (published as a digest root per adapter)."""
    return ("lora", adapter, generation, salt)


@dataclass
class _Request:
    """The loop thread's view of one request: where its output goes, per-choice decoders."""

    request_id: str
    n: int
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[Any]
    detoks: dict[int, IncrementalDetokenizer] = field(default_factory=dict)
    last_token_at: dict[int, float] = field(default_factory=dict)
    finished: set[int] = field(default_factory=set)
    adapter: str | None = None  # the LoRA adapter it pins until it is done

    pending: list[_Request] = field(default_factory=list)  # the engine's requests with output to hand over
    outbox: list[Any] = field(default_factory=list)

    def send(self, item: Any) -> None:
        if not self.outbox:
            self.pending.append(self)
        self.outbox.append(item)


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.cancelled():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


def _deliver(items: list[tuple[asyncio.Queue[Any], Any]]) -> None:
    for q, item in items:
        q.put_nowait(item)


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
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._requests: dict[str, _Request] = {}
        self._pending: list[_Request] = []  # touched only by the loop thread
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
        return box["engine"]

    def inject_fault(self) -> None:
        """Make the loop thread raise outside a step, as a real bug would (tests only: the server
        calls this on SIGUSR1 when HEADWAY_TEST_FAULTS=1). Safe to call from a signal handler."""
        self._commands.put(("fault",))

    def _fail(self, exc: BaseException) -> None:
        """The loop thread is ending on an error: record why (the server turns not ready and
        refuses new requests) and fail every request it holds or has not yet taken, at once.
        `failure` is set before the command queue is drained, and `generate()` checks it after it
        queues, so no request can slip in between and wait forever."""
        self.failure = f"{type(exc).__name__}: {exc}"
        log.critical("engine thread died: %s", self.failure, exc_info=exc)
        error = self._failure_error()
        for req in list(self._requests.values()):
            req.send(error)
        self._requests.clear()
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if cmd[0] == "add":
                cmd[1].send(error)
            elif cmd[0] == "call":
                cmd[2].call_soon_threadsafe(_settle, cmd[3], None, error)
        try:
            self._flush()
        except Exception:  # noqa: BLE001 - a loop that closed cannot be told; its callers are gone
            log.exception("could not deliver the engine failure to every request")

    def _failure_error(self) -> OpenAIError:
        return OpenAIError(f"the engine failed and this replica is out of service: {self.failure}",
                           status=503, type="engine_failed", code="engine_failed")

    def stop(self) -> None:
        self._stopping = True
        self._commands.put(("wake",))
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.grammars.shutdown()

    # ---- the asyncio side -------------------------------------------------------------------

    async def generate(self, prompt_ids: list[int], params: SamplingParams, *,
                       cache_key: Hashable = None, adapter: str | None = None) -> AsyncIterator[list[ChoiceDelta]]:
        """Yield each step's new output for this request until all its n choices finish
        (``adapter``: a registered LoRA adapter's name, None for the base model)."""
        self._check_running()
        rid = uuid.uuid4().hex
        req = _Request(rid, params.n, asyncio.get_running_loop(), asyncio.Queue(), pending=self._pending)
        key = cache_key if self.prefix_caching else ("nocache", rid)
        self._commands.put(("add", req, list(prompt_ids), params, key, adapter))
        self._check_running()  # died meanwhile: _fail may have drained the queue before this put
        done = False
        try:
            while True:
                item = await req.out.get()
                if item is _DONE:
                    done = True
                    return
                if isinstance(item, BaseException):
                    done = True
                    raise item
                yield item
        finally:
            if not done:
                self._commands.put(("abort", rid))

    # ---- the loop thread --------------------------------------------------------------------

    def _drain(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(cmd)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, cmd: tuple[Any, ...]) -> None:
        if cmd[0] == "add":
            _, req, prompt_ids, params, key, adapter = cmd
            if adapter is not None:
                try:
                    reg = self.loras.acquire(adapter)
                except AdapterError as exc:
                    req.send(OpenAIError(str(exc), status=exc.status, param="model"))
                    return
                req.adapter = adapter
                key = adapter_cache_key(adapter, reg.generation, key)  # prefix-cache isolation per adapter
            try:
                seq = self.scheduler.add(req.request_id, prompt_ids, params, cache_key=key)
            except ValueError as exc:
                self._forget(req)
                req.send(OpenAIError(str(exc), param="prompt"))
                return
            seq.adapter = adapter
            self._requests[req.request_id] = req
            self.metrics.prompt_tokens.inc(len(prompt_ids))
        elif cmd[0] == "abort":
            rid = cmd[1]
            if (gone := self._requests.pop(rid, None)) is not None:
                self._forget(gone)
                for seq in self.scheduler.abort(rid):
                    self._record_finish(seq)
        elif cmd[0] == "fault":
            raise RuntimeError("fault injected for a test (HEADWAY_TEST_FAULTS=1, SIGUSR1)")
        elif cmd[0] == "call":  # run on this thread for an asyncio caller (adapter load/unload)
            _, fn, loop, fut = cmd
            try:
                result, error = fn(), None
            except Exception as exc:
                result, error = None, exc
            self._snapshot = self._take_snapshot()
            loop.call_soon_threadsafe(_settle, fut, result, error)

    def _forget(self, req: _Request) -> None:
        """The request is done with its adapter (finished, aborted or failed)."""
        if req.adapter is not None:
            self.loras.release(req.adapter)
            req.adapter = None

    def _check_running(self) -> None:
        if self.failure is not None:
            raise self._failure_error()
        if self._thread is None or not self._thread.is_alive():
            raise OpenAIError("the engine is not running", status=503, type="server_error")

    async def _on_loop(self, fn: Any) -> Any:
        self._check_running()
        fut = asyncio.get_running_loop().create_future()
        self._commands.put(("call", fn, asyncio.get_running_loop(), fut))
        self._check_running()
        return await fut

    async def load_adapter(self, name: str, path: str) -> None:
        """Register a PEFT LoRA directory under ``name``; raises AdapterError (400/409)."""
        if name in self.loras.names:
            raise AdapterError(f"adapter {name!r} is already loaded; unload it first or pick another name", 409)
        path = str(Path(path).expanduser().absolute())  # read back from here after an eviction
        weights = await asyncio.to_thread(self.loras.read, name, path)
        await self._on_loop(lambda: self.loras.register(name, path, weights))

    async def unload_adapter(self, name: str) -> None:
        """Stop serving ``name`` (running requests on it finish); raises AdapterError (404)."""
        await self._on_loop(lambda: self.loras.unregister(name))

    def _flush(self) -> None:
        """Hand this step's output to the event loop(s) in one callback per loop: waking the
        loop once per step, not once per request, keeps the GIL with the step loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Any], Any]]] = {}
        for req in self._pending:
            by_loop.setdefault(req.loop, []).extend((req.out, item) for item in req.outbox)
            req.outbox = []
        self._pending.clear()
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop closed (server shutting down)
                pass

    def _run(self) -> None:
        # A short switch interval: the step loop reacquires the GIL after every torch op and
        # must not wait out the default 5 ms each time the event loop thread holds it.
        sys.setswitchinterval(0.0005)
        while not self._stopping:
            self._refresh_snapshot(force=not self.scheduler.has_work())
            self._drain(block=not self.scheduler.has_work())
            if not self.scheduler.has_work():
                self._count_tokens(0, time.monotonic())  # idle: tokens/s decays to 0
                self._gauges()  # an abort may have emptied the batch
                self._flush()
                continue
            try:
                self._step()
            except Exception as exc:  # a broken step fails its requests loudly, never silently
                log.exception("engine step failed")
                for rid, req in list(self._requests.items()):
                    self._forget(req)
                    for seq in self.scheduler.abort(rid):
                        self._record_finish(seq)
                    req.send(RuntimeError(f"engine step failed: {type(exc).__name__}: {exc}"))
                self._requests.clear()
            self._flush()
        for req in self._requests.values():
            req.send(OpenAIError("the server is shutting down", status=503, type="server_error"))
        self._flush()

    def _step(self) -> None:
        started = time.perf_counter()
        running = self.scheduler.running
        decodes = sum(1 for s in running if not s.in_prefill)
        prefilling = len(running) - decodes + len(self.scheduler.waiting)
        proposals = self.speculator.propose(running) if self.speculator is not None else None
        plan = self.scheduler.schedule(prefill_cap=self.chunker.prefill_cap(decodes, prefilling), proposals=proposals)
        for seq in plan.finished:
            self._emit(seq, [], None)
        if plan.preempted:
            self.metrics.preemptions.inc(len(plan.preempted))
        if plan.is_empty:
            if not plan.finished:
                time.sleep(0.001)  # nothing runnable this instant (waiting for memory)
            return
        batch = plan.to_forward_batch(self.device)
        if self.loras.resident:
            self.loras.begin_step((it.seq.adapter, len(it.token_ids)) for it in plan.items)
        try:
            logits = self.runner.forward(batch)
        finally:
            self.loras.end_step()
        # grammar rows (and each proposed position of theirs): disallowed tokens -> -inf
        self.masker.mask(logits, plan.sample_seqs, plan)
        runs, lps = self._sample(logits, plan)
        before = {id(s): len(s.output_ids) for s in plan.sample_seqs}
        got = self.scheduler.update(plan, runs)
        for seq in self.masker.accept(got, before):  # the grammar is complete
            self.scheduler.finish(seq, FinishReason.STOP)
        decoded = sum(1 for it in plan.items if len(it.token_ids) == 1 + len(it.proposal))
        self.chunker.observe(decoded, plan.num_tokens - decoded, time.perf_counter() - started)
        self.steps += 1
        rows = {id(s): i for i, s in enumerate(plan.sample_seqs)}
        now = time.monotonic()
        emitted = 0
        for seq in got:
            new = seq.output_ids[before[id(seq)]:]
            lp = lps[rows[id(seq)]]
            emitted += self._emit(seq, new, lp[: len(new)] if lp else None, now)
        self._count_tokens(emitted, now)
        self._gauges()
        self._flush()

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
        lps: list[list[TokenLogprob] | None] = [
            [TokenLogprob(t, float(lp), list(top or []))] if s.params.logprobs and lp is not None else None
            for s, t, lp, top in zip(plan.sample_seqs, out.tokens, out.logprobs, out.top_logprobs)]
        return [[t] for t in out.tokens], lps

    def _emit(self, seq: Sequence, token_ids: list[int], lps: list[TokenLogprob] | None,
              now: float | None = None) -> int:
        """Stream the sequence's new tokens; returns how many were kept (a stop string inside
        a run of accepted tokens cuts the run there)."""
        req = self._requests.get(seq.request_id)
        if req is None:
            return 0
        now = now or time.monotonic()
        detok = req.detoks.get(seq.index)
        cached: int | None = None
        if detok is None:
            cached = seq.num_cached_prompt_tokens if seq.index == 0 else None
            detok = req.detoks[seq.index] = IncrementalDetokenizer(
                self.tokenizer.tokenizer, prompt_ids=seq.prompt_ids, stop=seq.params.stop)
            self.metrics.ttft.observe(now - seq.arrival_time)
            if seq.index == 0:  # the n choices of a request share one prompt: count it once
                self.metrics.computed_tokens.inc(len(seq.prompt_ids) - seq.num_cached_prompt_tokens)
        elif token_ids and seq.index in req.last_token_at:
            self.metrics.itl.observe(now - req.last_token_at[seq.index])
        if token_ids:
            req.last_token_at[seq.index] = now
        text = ""
        if len(token_ids) > 1 and seq.params.stop:  # find the token that completes a stop string
            for i, tok in enumerate(token_ids):
                delta = detok.push([tok])
                text += delta.text
                if delta.stop is not None:
                    cut = len(seq.output_ids) - (len(token_ids) - i - 1)
                    self.scheduler.truncate(seq, cut)
                    token_ids, lps = token_ids[: i + 1], lps[: i + 1] if lps else None
                    self.scheduler.finish(seq, FinishReason.STOP, delta.stop)
                    break
        elif token_ids:  # special tokens (EOS) decode to no text
            delta = detok.push(token_ids)
            text = delta.text
            if delta.stop is not None:
                self.scheduler.finish(seq, FinishReason.STOP, delta.stop)
        if seq.is_finished and seq.finish_reason is not FinishReason.ABORT and detok.stopped is None:
            text += detok.flush()
        reason = seq.finish_reason.value if seq.is_finished and seq.finish_reason else None
        req.send([ChoiceDelta(seq.index, text, token_ids, lps or None, reason, cached)])
        if seq.is_finished:
            self._record_finish(seq)
            req.finished.add(seq.index)
            if len(req.finished) >= req.n:
                self._requests.pop(req.request_id, None)
                self._forget(req)
                req.send(_DONE)
        return len(token_ids)

    def _record_finish(self, seq: Sequence) -> None:
        if seq.finish_reason is not None:
            self.metrics.finished(seq.finish_reason.value)
        if seq.finish_time is not None and seq.finish_reason is not FinishReason.ABORT:
            self.metrics.e2e.observe(seq.finish_time - seq.arrival_time)

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
