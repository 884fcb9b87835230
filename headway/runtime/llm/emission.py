"""Output emission: a sequence's new tokens -> its request's stream of `ChoiceDelta`s.

Owns detokenization (one `IncrementalDetokenizer` per choice), stop strings, logprobs riding
along with their tokens, the per-request output metrics (TTFT, ITL, end-to-end, finish
reasons) and the prompt tokens computed (not found cached), counted once per request at its
first output (the prefix-cache hit counters themselves are the KV manager's). It never
touches the scheduler: a stop string is a decision it returns (`StopHit`) and the engine's
commit applies (truncate + finish) before the delta goes out, so the delta carries the finish
reason the scheduler settled on.

Per sequence and step the engine calls, on the engine thread:

    out = emission.get(seq.request_id)       # None: the request was aborted meanwhile
    stop = out.decode(seq, new_tokens, now)  # text of the new tokens; a stop string?
    ... apply `stop` to the scheduler, keep new_tokens[:stop.kept] ...
    done = out.send(seq, new_tokens, logprobs)  # the delta (and DONE after the last choice)
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer

from headway.runtime.llm.bridge import DONE, RequestChannel
from headway.runtime.llm.detokenizer import IncrementalDetokenizer
from headway.runtime.llm.metrics import EngineMetrics
from headway.runtime.llm.outputs import ChoiceDelta, TokenLogprob
from headway.runtime.llm.sequence import FinishReason, Sequence


@dataclass(frozen=True, slots=True)
class StopHit:
    """A stop string completed by this step's new tokens: the choice ends there."""

    text: str  # the stop string
    kept: int  # how many of the step's new tokens to keep (through the one that completed it)
    cut: int | None  # inside a run of accepted tokens: the output length to truncate to; else None


class _Choice:
    """One choice's decoding state."""

    __slots__ = ("detok", "last_token_at", "text", "cached")

    def __init__(self, detok: IncrementalDetokenizer, cached: int | None) -> None:
        self.detok = detok
        self.last_token_at: float | None = None
        self.text = ""  # decoded by decode(), not yet sent
        self.cached = cached  # prompt tokens served from the cache, on the request's first delta


class RequestOutput:
    """The engine thread's view of one request: its channel, its n choices' decoders, and the
    LoRA adapter it pins until it is done."""

    def __init__(self, emission: Emission, channel: RequestChannel, n: int, adapter: str | None = None) -> None:
        self.emission = emission
        self.channel = channel
        self.request_id = channel.request_id
        self.n = n
        self.adapter = adapter
        self.choices: dict[int, _Choice] = {}
        self.finished: set[int] = set()

    def decode(self, seq: Sequence, token_ids: list[int], now: float) -> StopHit | None:
        """Detokenize the sequence's new tokens (kept for `send`); a stop string they complete
        ends the choice: returned, for the engine to apply to the scheduler."""
        em = self.emission
        choice = self.choices.get(seq.index)
        if choice is None:
            choice = self.choices[seq.index] = _Choice(IncrementalDetokenizer(
                em.tokenizer, prompt_ids=seq.prompt_ids, stop=seq.params.stop),
                seq.num_cached_prompt_tokens if seq.index == 0 else None)
            em.metrics.ttft.observe(now - seq.arrival_time)
            if seq.index == 0:  # the n choices of a request share one prompt: count it once
                em.metrics.computed_tokens.inc(len(seq.prompt_ids) - seq.num_cached_prompt_tokens)
        elif token_ids and choice.last_token_at is not None:
            em.metrics.itl.observe(now - choice.last_token_at)
        if token_ids:
            choice.last_token_at = now
        detok = choice.detok
        if len(token_ids) > 1 and seq.params.stop:  # find the token that completes a stop string
            text = ""
            for i, tok in enumerate(token_ids):
                delta = detok.push([tok])
                text += delta.text
                if delta.stop is not None:
                    choice.text = text
                    return StopHit(delta.stop, i + 1, len(seq.output_ids) - (len(token_ids) - i - 1))
            choice.text = text
        elif token_ids:  # special tokens (EOS) decode to no text
            delta = detok.push(token_ids)
            choice.text = delta.text
            if delta.stop is not None:
                return StopHit(delta.stop, len(token_ids), None)
        return None

    def send(self, seq: Sequence, token_ids: list[int], lps: list[TokenLogprob] | None) -> bool:
        """Send the choice's delta (call after `decode` and after the scheduler applied its stop);
        True when this was the request's last choice to finish (its stream is then over)."""
        choice = self.choices[seq.index]
        text, choice.text = choice.text, ""
        cached, choice.cached = choice.cached, None
        if seq.is_finished and seq.finish_reason is not FinishReason.ABORT and choice.detok.stopped is None:
            text += choice.detok.flush()
        reason = seq.finish_reason.value if seq.is_finished and seq.finish_reason else None
        self.channel.send([ChoiceDelta(seq.index, text, token_ids, lps or None, reason, cached)])
        if not seq.is_finished:
            return False
        self.emission.record_finish(seq)
        self.finished.add(seq.index)
        if len(self.finished) < self.n:
            return False
        self.channel.send(DONE)
        return True


class Emission:
    """The requests the engine is producing output for, and what their output is counted as."""

    def __init__(self, tokenizer: Tokenizer, metrics: EngineMetrics) -> None:
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.requests: dict[str, RequestOutput] = {}

    def open(self, channel: RequestChannel, n: int, adapter: str | None = None) -> RequestOutput:
        out = self.requests[channel.request_id] = RequestOutput(self, channel, n, adapter)
        return out

    def get(self, request_id: str) -> RequestOutput | None:
        return self.requests.get(request_id)

    def close(self, request_id: str) -> RequestOutput | None:
        return self.requests.pop(request_id, None)

    def close_all(self) -> list[RequestOutput]:
        """Forget every open request and return them (the engine is failing them all)."""
        outs = list(self.requests.values())
        self.requests.clear()
        return outs

    def record_finish(self, seq: Sequence) -> None:
        if seq.finish_reason is not None:
            self.metrics.finished(seq.finish_reason.value)
        if seq.finish_time is not None and seq.finish_reason is not FinishReason.ABORT:
            self.metrics.e2e.observe(seq.finish_time - seq.arrival_time)
