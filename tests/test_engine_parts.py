"""The engine's parts alone, without a model: the bridge between the engine thread and asyncio
(bridge.py), output emission (emission.py) and the engine's errors' wire translation."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
from tokenizers import Tokenizer, decoders, models

from headway.runtime.llm.bridge import DONE, Abort, AddRequest, Bridge, CallOnLoop, InjectFault, Wake
from headway.runtime.llm.emission import Emission, StopHit
from headway.runtime.llm.errors import EngineFailed, EngineUnavailable, InvalidRequest
from headway.runtime.llm.lora import AdapterError
from headway.runtime.llm.metrics import EngineMetrics
from headway.runtime.llm.openai_api import wire_error
from headway.runtime.llm.outputs import ChoiceDelta, TokenLogprob
from headway.runtime.llm.sequence import FinishReason, SamplingParams

# ---- the bridge ------------------------------------------------------------------------------


def _delta(text: str, index: int = 0) -> list[ChoiceDelta]:
    return [ChoiceDelta(index, text, [1])]


async def test_one_callback_per_event_loop_per_step() -> None:
    bridge = Bridge()
    loop = asyncio.get_running_loop()
    a, b = bridge.open(), bridge.open()
    assert a.request_id != b.request_id and a.loop is loop
    calls = []
    real = loop.call_soon_threadsafe

    def counting(*args: object) -> object:
        calls.append(args[0])
        return real(*args)  # type: ignore[arg-type]

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    try:
        def step() -> None:  # the engine thread: two requests' output, then one flush
            a.send(_delta("x"))
            a.send(_delta("y"))
            b.send(_delta("z"))
            b.send(DONE)
            bridge.flush()
            bridge.flush()  # nothing pending: no second wake-up

        await asyncio.to_thread(step)
        assert await a.next() == _delta("x") and await a.next() == _delta("y")
        assert await b.next() == _delta("z")
        assert await b.next() is None and b.closed and not a.closed
    finally:
        del loop.call_soon_threadsafe
    delivers = [c for c in calls if getattr(c, "__name__", "") == "_deliver"]  # (to_thread wakes it too)
    assert len(delivers) == 1  # one wake-up of the loop for the whole step


async def test_an_error_ends_the_channel() -> None:
    bridge = Bridge()
    ch = bridge.open()
    ch.send(_delta("partial"))
    ch.send(EngineFailed("RuntimeError: boom"))
    bridge.flush()
    assert await ch.next() == _delta("partial") and not ch.closed
    with pytest.raises(EngineFailed, match="out of service: RuntimeError: boom"):
        await ch.next()
    assert ch.closed


async def test_commands_are_taken_one_at_a_time_and_failed_when_the_loop_dies() -> None:
    bridge = Bridge()
    loop = asyncio.get_running_loop()
    first, second = bridge.open(), bridge.open()
    fut: asyncio.Future[object] = loop.create_future()
    params = SamplingParams(max_tokens=1)
    bridge.put(AddRequest(first, [1, 2], params, None, None))
    bridge.put(InjectFault())
    bridge.put(AddRequest(second, [3], params, "salt", "sql"))
    bridge.put(CallOnLoop(lambda: 1, loop, fut))
    bridge.put(Abort(first.request_id))
    bridge.put(Wake())
    taken = []
    for cmd in bridge.commands(block=False):  # the loop raises on the fault: the rest stay queued
        taken.append(cmd)
        if isinstance(cmd, InjectFault):
            break
    assert [type(c) for c in taken] == [AddRequest, InjectFault]
    error = EngineFailed("RuntimeError: fault")
    await asyncio.to_thread(bridge.fail_queued, error)  # the dying engine thread answers the rest
    await asyncio.to_thread(bridge.flush)
    with pytest.raises(EngineFailed):
        await second.next()
    with pytest.raises(EngineFailed):
        await fut
    assert list(bridge.commands(block=False)) == []  # drained


async def test_call_on_loop_settles_result_error_and_ignores_a_cancelled_future() -> None:
    loop = asyncio.get_running_loop()
    ok: asyncio.Future[object] = loop.create_future()
    bad: asyncio.Future[object] = loop.create_future()
    gone: asyncio.Future[object] = loop.create_future()
    gone.cancel()

    def engine_thread() -> None:
        CallOnLoop(lambda: None, loop, ok).settle(42, None)
        CallOnLoop(lambda: None, loop, bad).settle(None, ValueError("no"))
        CallOnLoop(lambda: None, loop, gone).settle(1, None)

    await asyncio.to_thread(engine_thread)
    assert await ok == 42
    with pytest.raises(ValueError, match="no"):
        await bad
    await asyncio.sleep(0)
    assert gone.cancelled()


def test_flush_to_a_closed_loop_is_dropped() -> None:
    bridge = Bridge()
    loop = asyncio.new_event_loop()
    ch = loop.run_until_complete(_open(bridge))
    loop.close()
    ch.send(DONE)
    bridge.flush()  # no error: the server is shutting down


async def _open(bridge: Bridge):  # type: ignore[no-untyped-def]
    return bridge.open()


# ---- emission --------------------------------------------------------------------------------

VOCAB = {"a": 0, "b": 1, "<": 2, ">": 3, " ": 4, "<eos>": 5, "x": 6}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    t = Tokenizer(models.WordLevel(VOCAB, unk_token="x"))
    t.decoder = decoders.Fuse()  # ids -> the tokens' text, concatenated
    t.add_special_tokens(["<eos>"])
    return t


@dataclass
class FakeSeq:
    """What emission reads of a Sequence."""

    request_id: str
    index: int = 0
    prompt_ids: list[int] = field(default_factory=lambda: [0, 1])
    stop: tuple[str, ...] = ()
    output_ids: list[int] = field(default_factory=list)
    num_cached_prompt_tokens: int = 0
    arrival_time: float = 0.0
    finish_reason: FinishReason | None = None
    finish_time: float | None = None

    @property
    def params(self) -> SamplingParams:
        return SamplingParams(stop=self.stop)

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def grow(self, *tokens: str) -> list[int]:
        new = [VOCAB[t] for t in tokens]
        self.output_ids += new
        return new


class Sink:
    def __init__(self) -> None:
        self.request_id = "r1"
        self.items: list[object] = []

    def send(self, item: object) -> None:
        self.items.append(item)


def _emission(tok: Tokenizer) -> tuple[Emission, Sink, EngineMetrics]:
    metrics = EngineMetrics("m")
    return Emission(tok, metrics), Sink(), metrics


def test_stop_string_inside_a_run_is_a_decision_with_the_cut(tok: Tokenizer) -> None:
    em, sink, _ = _emission(tok)
    out = em.open(sink, n=1)  # type: ignore[arg-type]
    seq = FakeSeq("r1", stop=("<>",))
    new = seq.grow("a", "b")
    assert out.decode(seq, new, now=1.0) is None  # type: ignore[arg-type]
    out.send(seq, new, None)  # type: ignore[arg-type]
    new = seq.grow("a", "<", ">", "b", "b")  # a run of accepted tokens; the stop ends at its 3rd
    stop = out.decode(seq, new, now=2.0)  # type: ignore[arg-type]
    assert stop == StopHit("<>", kept=3, cut=5)  # keep 2 + 3 output tokens; nothing was applied
    assert seq.output_ids == [0, 1, 0, 2, 3, 1, 1] and not seq.is_finished
    del seq.output_ids[stop.cut:]  # what the engine's commit does: truncate, then finish
    seq.finish_reason, seq.finish_time = FinishReason.STOP, 3.0
    lps = [TokenLogprob(t, -0.5) for t in new]
    assert out.send(seq, new[: stop.kept], lps[: stop.kept])  # type: ignore[arg-type]
    last = sink.items[-2]
    assert last == [ChoiceDelta(0, "a", [0, 2, 3], lps[:3], "stop", None)]
    assert sink.items[-1] is DONE
    texts = "".join(d[0].text for d in sink.items if isinstance(d, list))
    assert texts == "aba"  # the stop string is never streamed


def test_stop_string_on_a_single_token_needs_no_cut(tok: Tokenizer) -> None:
    em, sink, _ = _emission(tok)
    out = em.open(sink, n=1)  # type: ignore[arg-type]
    seq = FakeSeq("r1", stop=("ab",))
    new = seq.grow("a")
    assert out.decode(seq, new, 1.0) is None  # type: ignore[arg-type]
    out.send(seq, new, None)  # type: ignore[arg-type]
    assert sink.items[-1] == [ChoiceDelta(0, "", [0], None, None, 0)]  # "a" held back: may start "ab"
    new = seq.grow("b")
    assert out.decode(seq, new, 2.0) == StopHit("ab", kept=1, cut=None)  # type: ignore[arg-type]


def test_held_back_text_is_released_at_the_end_but_not_on_abort(tok: Tokenizer) -> None:
    for reason, text in ((FinishReason.LENGTH, "<"), (FinishReason.ABORT, "")):
        em, sink, _ = _emission(tok)
        out = em.open(sink, n=1)  # type: ignore[arg-type]
        seq = FakeSeq("r1", stop=("<>",))
        new = seq.grow("<")
        assert out.decode(seq, new, 1.0) is None  # type: ignore[arg-type]
        seq.finish_reason, seq.finish_time = reason, 2.0
        assert out.send(seq, new, None)  # type: ignore[arg-type]
        assert sink.items[0] == [ChoiceDelta(0, text, [2], None, reason.value, 0)]


def test_first_output_counts_the_computed_prompt_once_per_request_and_n_choices_end_it(tok: Tokenizer) -> None:
    em, sink, metrics = _emission(tok)
    out = em.open(sink, n=2)  # type: ignore[arg-type]
    seqs = [FakeSeq("r1", index=i, prompt_ids=[0, 1, 0, 1], num_cached_prompt_tokens=3) for i in range(2)]
    for step in range(2):
        for s in seqs:
            new = s.grow("a")
            if step == 1:
                s.finish_reason, s.finish_time = FinishReason.LENGTH, 5.0
            assert out.decode(s, new, float(step)) is None  # type: ignore[arg-type]
            assert out.send(s, new, None) is (step == 1 and s.index == 1)  # type: ignore[arg-type]
    deltas = [d[0] for d in sink.items if isinstance(d, list)]
    assert [d.cached_tokens for d in deltas] == [3, None, None, None]  # on the request's first delta
    assert sink.items[-1] is DONE and sink.items.count(DONE) == 1
    text = metrics.render().decode()
    assert 'headway_llm_requests_finished_total{model="m",reason="length"} 2.0' in text
    assert 'headway_llm_computed_prefill_tokens_total{model="m"} 1.0' in text  # 4 prompt - 3 cached, once


def test_an_aborted_request_is_forgotten(tok: Tokenizer) -> None:
    em, sink, _ = _emission(tok)
    em.open(sink, n=1)  # type: ignore[arg-type]
    assert em.get("r1") is not None
    assert em.close("r1") is not None and em.get("r1") is None and em.close("r1") is None
    second = Sink()
    second.request_id = "r2"
    opened = [em.open(sink, n=1), em.open(second, n=2)]  # type: ignore[arg-type]
    assert em.close_all() == opened and em.requests == {}  # a failing engine forgets them all


# ---- the engine's errors on the wire ---------------------------------------------------------


def test_engine_errors_keep_their_openai_wire_shape() -> None:
    failed = wire_error(EngineFailed("RuntimeError: boom"))
    assert failed.status == 503 and failed.body() == {"error": {
        "message": "the engine failed and this replica is out of service: RuntimeError: boom",
        "type": "engine_failed", "param": None, "code": "engine_failed"}}
    down = wire_error(EngineUnavailable("the server is shutting down"))
    assert down.status == 503 and down.body()["error"] == {
        "message": "the server is shutting down", "type": "server_error", "param": None, "code": None}
    bad = wire_error(InvalidRequest("prompt too long", param="prompt"))
    assert bad.status == 400 and bad.body()["error"] == {
        "message": "prompt too long", "type": "invalid_request_error", "param": "prompt", "code": None}
    busy = wire_error(AdapterError("adapter 'sql' cannot be made resident now", status=503))
    assert busy.status == 503 and busy.body()["error"]["param"] == "model"
    assert busy.body()["error"]["type"] == "invalid_request_error"
    assert isinstance(InvalidRequest("x"), ValueError)  # callers that caught ValueError still do


def test_engine_code_does_not_import_the_wire_format() -> None:
    import pathlib

    root = pathlib.Path(__file__).parents[1] / "headway" / "runtime" / "llm"
    for name in ("engine.py", "bridge.py", "emission.py", "errors.py"):
        src = (root / name).read_text()
        assert "OpenAIError" not in src and "protocol" not in src.replace("Protocol", ""), name

