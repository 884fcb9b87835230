"""The OpenAI-compatible HTTP API of an LLM replica: /v1/chat/completions, /v1/completions,
/v1/models, with SSE streaming, usage, logprobs, n > 1, and cancellation on disconnect.

Owns the translation between OpenAI's wire format and the engine's `generate()` stream.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, Protocol

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from headway.runtime.admission import Ticket
from headway.runtime.gate import Gate, Refused
from headway.runtime.llm.errors import EngineError, EngineFailed, InvalidRequest
from headway.runtime.llm.grammar import GrammarCompiler, GrammarError, GrammarSpec, ToolCallParser, constraint_for
from headway.runtime.llm.grammar.tools import chat_messages, functions_of
from headway.runtime.llm.lora import AdapterError
from headway.runtime.llm.openai_types import ChatCompletionRequest, CompletionRequest, OpenAIError, parse_request
from headway.runtime.llm.outputs import ChoiceDelta, TokenLogprob
from headway.runtime.llm.sequence import SamplingParams
from headway.tokenization import ModelTokenizer, TokenizationError
from headway.wire import ClientGone, cancel_on_disconnect, sse_event


class GenerateEngine(Protocol):
    tokenizer: ModelTokenizer
    max_model_len: int
    grammars: GrammarCompiler

    def generate(self, prompt_ids: list[int], params: SamplingParams, *, cache_key: str | None = None,
                 adapter: str | None = None) -> AsyncIterator[list[ChoiceDelta]]: ...


def _sse(obj: Any) -> bytes:
    return sse_event(obj, ascii_only=False)


def _error_response(exc: OpenAIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def wire_error(exc: EngineError | AdapterError) -> OpenAIError:
    """An engine error in OpenAI's wire shape: the engine says what went wrong, this layer says
    how a client sees it (status, type, param, code)."""
    if isinstance(exc, AdapterError):  # the request's `model` names an adapter that cannot serve it now
        return OpenAIError(str(exc), status=exc.status, param="model")
    if isinstance(exc, InvalidRequest):
        return OpenAIError(exc.message, status=exc.status, param=exc.param)
    if isinstance(exc, EngineFailed):
        return OpenAIError(exc.message, status=exc.status, type="engine_failed", code=exc.code)
    return OpenAIError(exc.message, status=exc.status, type="server_error", code=exc.code)


def _refused_response(exc: Refused) -> JSONResponse:
    r = exc.refusal
    return JSONResponse({"error": {"message": r.message, "type": r.kind, "param": None, "code": r.kind}},
                        status_code=r.status, headers=r.headers)


async def _held(chunks: AsyncGenerator[bytes, None], ticket: Ticket) -> AsyncIterator[bytes]:
    """A stream that holds its admission ticket until it ends (finished, failed or cancelled by
    a disconnect). An error chunk (`data: {"error": ...}`) goes out as an SSE `error` event."""
    try:
        async for chunk in chunks:
            yield b"event: error\n" + chunk if chunk.startswith(b'data: {"error"') else chunk
    finally:
        ticket.release()
        await chunks.aclose()  # closed early: the call's own cleanup (abort in the engine) runs now


class OpenAIServer:
    def __init__(self, engine: GenerateEngine, model_names: list[str], is_ready: Callable[[], bool],
                 adapters: Callable[[], tuple[str, ...]] = tuple, parent: str | None = None,
                 gate: Gate | None = None, max_prompts: int = 16):
        self.engine = engine
        self.gate = gate  # the server's admission (one ticket per request) and readiness; None: no limit
        self.max_prompts = max_prompts  # prompts one /v1/completions request may carry
        self.names = model_names
        self.is_ready = is_ready
        self.adapters = adapters  # the LoRA adapters served now (names clients may put in `model`)
        self.parent = parent or model_names[0]  # the base model's name, the adapters' `parent` in /v1/models

    # ---- request -> prompts and params -------------------------------------------------------

    def _check_model(self, name: str) -> str | None:
        """The LoRA adapter ``name`` selects (None: the base model); 404 for an unknown name."""
        if name in self.names:
            return None
        adapters = self.adapters()
        if name in adapters:
            return name
        raise OpenAIError(f"The model '{name}' does not exist; this server serves "
                          f"{', '.join(repr(n) for n in (*self.names, *adapters))}", status=404, param="model",
                          code="model_not_found")

    def _limits(self, prompt_len: int, requested: int | None, prompt_param: str) -> int:
        limit = self.engine.max_model_len
        if prompt_len >= limit:
            raise OpenAIError(f"This model's maximum context length is {limit} tokens. However, your prompt "
                              f"has {prompt_len} tokens, which leaves no room for output.", param=prompt_param,
                              code="context_length_exceeded")
        if requested is None:
            return limit - prompt_len
        if prompt_len + requested > limit:
            raise OpenAIError(f"This model's maximum context length is {limit} tokens. However, you requested "
                              f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the "
                              "completion). Please reduce the prompt or max_tokens.", param="max_tokens",
                              code="context_length_exceeded")
        return requested

    def _params(self, req: ChatCompletionRequest | CompletionRequest, max_tokens: int, logprobs: int | None
                ) -> SamplingParams:
        greedy_default = 1.0
        return SamplingParams(
            temperature=greedy_default if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k, min_p=req.min_p,
            repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, seed=req.seed, max_tokens=max_tokens,
            stop=tuple(req.stop or ()), stop_token_ids=tuple(req.stop_token_ids or ()),
            ignore_eos=req.ignore_eos, logprobs=logprobs is not None, top_logprobs=logprobs or 0, n=req.n)

    # ---- formatting ------------------------------------------------------------------------------

    def _token_entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.engine.tokenizer.decode([token_id], skip_special_tokens=False)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def _chat_logprobs(self, items: list[TokenLogprob]) -> dict[str, Any]:
        return {"content": [{**self._token_entry(lp.token_id, lp.logprob),
                             "top_logprobs": [self._token_entry(t, p) for t, p in lp.top]} for lp in items]}

    def _completion_logprobs(self, items: list[TokenLogprob], offset: int) -> dict[str, Any]:
        tokens, offsets = [], []
        for lp in items:
            text = self.engine.tokenizer.decode([lp.token_id], skip_special_tokens=False)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in items],
                "top_logprobs": [{self.engine.tokenizer.decode([t], skip_special_tokens=False): p for t, p in lp.top}
                                 for lp in items], "text_offset": offsets}

    # ---- endpoints -------------------------------------------------------------------------------

    def router(self) -> APIRouter:
        router = APIRouter()

        @router.get("/v1/models")
        async def models() -> Any:
            if not self.is_ready():
                return _error_response(OpenAIError("the model is still loading; retry shortly", status=503,
                                                   type="model_loading"))
            return {"object": "list", "data": [
                {"id": n, "object": "model", "created": 0, "owned_by": "headway",
                 "max_model_len": self.engine.max_model_len} for n in self.names] + [
                {"id": a, "object": "model", "created": 0, "owned_by": "headway", "parent": self.parent,
                 "max_model_len": self.engine.max_model_len} for a in self.adapters()]}

        @router.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return await self._handle(request, chat=True)

        @router.post("/v1/completions")
        async def completions(request: Request) -> Response:
            return await self._handle(request, chat=False)

        return router

    def _prepare(self, body: Any, *, chat: bool) -> _Call:
        """Validate a request body and turn it into a call; raises OpenAIError."""
        if not self.is_ready():
            raise OpenAIError("the model is still loading; retry shortly", status=503, type="server_error")
        if chat:
            req = parse_request(ChatCompletionRequest, body)
            adapter = self._check_model(req.model)
            try:
                messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {}),
                             **({"tool_calls": m.tool_calls} if m.tool_calls else {}),
                             **({"tool_call_id": m.tool_call_id} if m.tool_call_id else {})} for m in req.messages]
            except ValueError as exc:
                raise OpenAIError(str(exc), param="messages") from None
            tok = self.engine.tokenizer
            tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
            messages, tools_arg = chat_messages(
                messages, tools if req.effective_tool_choice != "none" else None,
                template_renders_tools="tools" in (tok.chat_template or ""))
            try:
                prompts = [tok.encode_chat(messages, add_generation_prompt=req.add_generation_prompt, tools=tools_arg,
                                           **(req.chat_template_kwargs or {}))]
            except TokenizationError as exc:
                raise OpenAIError(exc.message, param=exc.param) from None
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
        else:
            req = parse_request(CompletionRequest, body)
            adapter = self._check_model(req.model)
            given = req.prompts()
            if len(given) > self.max_prompts:
                raise OpenAIError(f"too many prompts: {len(given)} in one request; this server takes at most "
                                  f"{self.max_prompts} per request (runtime_options.max_prompts_per_request). "
                                  "Split them over several requests.", param="prompt", code="too_many_prompts")
            try:
                prompts = [p if isinstance(p, list) else self.engine.tokenizer.encode(p) for p in given]
            except ValueError as exc:  # tokenization's errors
                raise OpenAIError(str(exc), param=getattr(exc, "param", None) or "prompt") from None
            vocab = self.engine.tokenizer.vocab_size
            if any(not 0 <= t < vocab for p in prompts for t in p):
                raise OpenAIError(f"prompt token ids must be in [0, {vocab})", param="prompt")
            logprobs = req.logprobs
        try:
            jobs = [(ids, self._params(req, self._limits(len(ids), req.output_limit, "messages" if chat else "prompt"),
                                       logprobs)) for ids in prompts]
        except ValueError as exc:  # SamplingParams' own checks: a bad parameter, never a server error
            raise OpenAIError(str(exc)) from None
        try:
            spec = constraint_for(req)
        except GrammarError as exc:
            raise OpenAIError(exc.message, param=exc.param) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        return _Call(self, req, jobs, rid, chat, cache_key=req.cache_salt, grammar=spec, adapter=adapter)

    async def compile(self, spec: GrammarSpec, req: Any) -> Any:
        """The compiled grammar; an invalid one is a 400 naming the field (for tools: the
        first function whose parameters schema does not compile)."""
        try:
            return await self.engine.grammars.compile(spec)
        except GrammarError as exc:
            if spec.kind == "structural_tag" and getattr(req, "tools", None):
                fns = functions_of([t.model_dump(exclude_none=True) for t in req.tools])
                for i, schema in enumerate(fns.values()):
                    try:
                        await self.engine.grammars.compile(GrammarSpec.json_schema(
                            schema, param=f"tools.{i}.function.parameters"))
                    except GrammarError as bad:
                        raise OpenAIError(bad.message, param=bad.param) from None
            raise OpenAIError(exc.message, param=exc.param) from None

    def completion_call(self, body: Any) -> _Call:
        return self._prepare(body, chat=False)

    def chat_call(self, body: Any) -> _Call:
        return self._prepare(body, chat=True)

    async def _handle(self, request: Request, *, chat: bool) -> Response:
        try:
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise OpenAIError(f"the request body is not valid JSON: {exc}") from None
            call = self._prepare(body, chat=chat)
        except OpenAIError as exc:
            return _error_response(exc)
        try:  # one admission ticket per request, taken after validation, before any work
            ticket = await cancel_on_disconnect(self.gate.admit(), request) if self.gate else None
        except Refused as exc:
            return _refused_response(exc)
        except ClientGone:
            return Response(status_code=499)
        response: Response | None = None
        try:
            response = await self._run(call, request, ticket)
            return response
        finally:  # a stream's ticket goes with the stream; every other exit releases it here
            if ticket is not None and not isinstance(response, StreamingResponse):
                ticket.release()

    async def _run(self, call: _Call, request: Request, ticket: Ticket | None) -> Response:
        try:
            await call.ready()
        except OpenAIError as exc:
            return _error_response(exc)
        if call.req.stream:
            chunks = call.stream() if ticket is None else _held(call.stream(), ticket)
            return StreamingResponse(chunks, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     # a stream cancelled before it started never runs its finally
                                     background=BackgroundTask(ticket.release) if ticket else None)
        try:
            return JSONResponse(await cancel_on_disconnect(call.collect(), request))
        except ClientGone:
            return Response(status_code=499)
        except OpenAIError as exc:
            return _error_response(exc)
        except Exception as exc:  # a failed generation is a JSON 500, never a bare traceback page
            return _error_response(OpenAIError(f"generation failed: {type(exc).__name__}: {exc}", status=500,
                                               type="server_error"))


class _Call:
    """One API call: one or more prompts, each with n choices, merged into one response."""

    def __init__(self, server: OpenAIServer, req: Any, jobs: list[tuple[list[int], SamplingParams]], rid: str,
                 chat: bool, cache_key: str | None, grammar: GrammarSpec | None = None, adapter: str | None = None):
        self.s, self.req, self.jobs, self.rid, self.chat, self.cache_key = server, req, jobs, rid, chat, cache_key
        self.adapter = adapter
        self.created = int(time.time())
        self.prompt_tokens = sum(len(ids) for ids, _ in jobs)
        self.completion_tokens = 0
        self.cached_tokens = 0        # prompt tokens served from the prefix cache, over the call's prompts
        self.spec = grammar
        # chat with tools the model may call: its text is split into content and tool_calls
        self.tool_parsing = chat and getattr(req, "effective_tool_choice", "none") != "none"

    async def ready(self) -> None:
        """Compile the request's grammar (cached by key) before any of it reaches the engine:
        the step loop never waits for a compile. Raises OpenAIError (400) if it is invalid."""
        if self.spec is None:
            return
        g = await self.s.compile(self.spec, self.req)
        self.jobs = [(ids, dataclasses.replace(p, grammar=g)) for ids, p in self.jobs]
        self.spec = None

    async def deltas(self) -> AsyncIterator[list[ChoiceDelta]]:
        """All prompts' deltas, re-indexed so choice index = prompt_index * n + i."""
        import asyncio

        await self.ready()
        n = self.req.n
        queue: asyncio.Queue[list[ChoiceDelta] | BaseException | None] = asyncio.Queue()

        async def pump(p: int, ids: list[int], params: SamplingParams) -> None:
            try:
                async for deltas in self.s.engine.generate(ids, params, cache_key=self.cache_key,
                                                              adapter=self.adapter):
                    self.cached_tokens += sum(d.cached_tokens or 0 for d in deltas)
                    await queue.put([ChoiceDelta(p * n + d.index, d.text, d.token_ids, d.logprobs, d.finish_reason)
                                     for d in deltas])
                await queue.put(None)
            except (EngineError, AdapterError) as exc:  # the engine's words -> OpenAI's
                await queue.put(wire_error(exc))
            except BaseException as exc:  # reaches the client as an error
                await queue.put(exc)

        tasks = [asyncio.create_task(pump(p, ids, params)) for p, (ids, params) in enumerate(self.jobs)]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    self.completion_tokens += sum(len(d.token_ids) for d in item)
                    yield item
        finally:
            for t in tasks:
                t.cancel()

    def _usage(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    def _head(self) -> dict[str, Any]:
        obj = "chat.completion" if self.chat else "text_completion"
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.req.model}

    async def collect(self) -> dict[str, Any]:
        total = len(self.jobs) * self.req.n
        texts = [""] * total
        lps: list[list[TokenLogprob]] = [[] for _ in range(total)]
        reasons: list[str | None] = [None] * total
        async for deltas in self.deltas():
            for d in deltas:
                texts[d.index] += d.text
                lps[d.index].extend(d.logprobs or [])
                reasons[d.index] = d.finish_reason or reasons[d.index]
        want_lp = self.jobs[0][1].logprobs
        choices = []
        for i in range(total):
            if self.chat:
                message: dict[str, Any] = {"role": "assistant", "content": texts[i]}
                if self.tool_parsing:
                    parser = ToolCallParser()
                    content = parser.feed(texts[i])[0] + parser.finish()[0]
                    if parser.calls:
                        message = {"role": "assistant", "content": content or None, "tool_calls": [
                            {"id": c["id"], "type": "function",
                             "function": {"name": c["name"], "arguments": c["arguments"]}} for c in parser.calls]}
                        reasons[i] = "tool_calls" if reasons[i] == "stop" else reasons[i]
                choices.append({"index": i, "message": message,
                                "logprobs": self.s._chat_logprobs(lps[i]) if want_lp else None,
                                "finish_reason": reasons[i]})
            else:
                text = texts[i]
                if self.req.echo:
                    text = self.s.engine.tokenizer.decode(self.jobs[i // self.req.n][0]) + text
                choices.append({"index": i, "text": text,
                                "logprobs": self.s._completion_logprobs(lps[i], 0) if want_lp else None,
                                "finish_reason": reasons[i]})
        return {**self._head(), "choices": choices, "usage": self._usage()}

    async def stream(self) -> AsyncGenerator[bytes, None]:
        head = {**self._head(), "object": "chat.completion.chunk" if self.chat else "text_completion"}
        usage_field = {"usage": None} if self.req.include_usage else {}
        want_lp = self.jobs[0][1].logprobs
        offsets = [0] * (len(self.jobs) * self.req.n)
        parsers = [ToolCallParser() for _ in offsets] if self.tool_parsing else []
        # Nothing is written before the first token: the chat role chunk goes out with the first
        # token's chunk, so a replica that dies while prefilling has sent no byte and the router can
        # retry the request elsewhere (a stream that has started cannot be retried).
        opening = _sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}
                                            for i in range(len(offsets))], **usage_field}) if self.chat else b""
        try:
            async for deltas in self.deltas():
                choices = []
                for d in deltas:
                    if not d.text and not d.finish_reason:
                        continue
                    if self.chat:
                        delta = _tool_delta(parsers[d.index], d) if parsers else (
                            {"content": d.text} if d.text else {})
                        if parsers and not delta and not d.finish_reason:
                            continue  # held back: may be the start of a tool call
                        choice: dict[str, Any] = {"index": d.index, "delta": delta,
                                                  "logprobs": self.s._chat_logprobs(d.logprobs or []) if want_lp else None}
                    else:
                        choice = {"index": d.index, "text": d.text,
                                  "logprobs": self.s._completion_logprobs(d.logprobs or [], offsets[d.index])
                                  if want_lp else None}
                        offsets[d.index] += len(d.text)
                    choice["finish_reason"] = d.finish_reason
                    if parsers and d.finish_reason == "stop" and parsers[d.index].calls:
                        choice["finish_reason"] = "tool_calls"
                    choices.append(choice)
                if choices:
                    yield opening + _sse({**head, "choices": choices, **usage_field})
                    opening = b""
            if opening:
                yield opening   # no choice had any text: the role chunk still opens the stream
            if self.req.include_usage:
                yield _sse({**head, "choices": [], "usage": self._usage()})
            yield b"data: [DONE]\n\n"
        except OpenAIError as exc:
            yield _sse(exc.body())
        except Exception as exc:  # a stream that dies ends with an error event, never silently
            yield _sse({"error": {"message": f"generation failed: {type(exc).__name__}: {exc}",
                                  "type": "server_error", "param": None, "code": None}})


def _tool_delta(parser: ToolCallParser, d: ChoiceDelta) -> dict[str, Any]:
    """A chat stream delta from a choice's new text: content, and OpenAI ``tool_calls`` chunks
    (the first chunk of a call carries its id, type and name; later ones argument text)."""
    content, calls = parser.feed(d.text)
    if d.finish_reason:
        more_content, more_calls = parser.finish()
        content, calls = content + more_content, calls + more_calls
    delta: dict[str, Any] = {"content": content} if content else {}
    if calls:
        delta["tool_calls"] = [
            {"index": c.index, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            if c.id else {"index": c.index, "function": {"arguments": c.arguments}} for c in calls]
    return delta
