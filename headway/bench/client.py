"""Streaming OpenAI-compatible load client: runs a workload against one target and times it.

Owns the HTTP side of a benchmark: one ``httpx.AsyncClient`` per run, streaming requests to
``/v1/chat/completions`` or ``/v1/completions`` with ``stream=true`` and
``stream_options.include_usage``, and per-request timings:

- TTFT: request sent -> first chunk carrying non-empty content;
- ITL: the gaps between consecutive content chunks (one entry per gap);
- end-to-end: request sent -> stream finished;
- output tokens: ``usage.completion_tokens`` when the server reports it, else content chunks.

Invariants: every request of the workload yields exactly one ``RequestResult`` (failures carry
the HTTP status and message; turns never sent say why); every loop is bounded (events per
stream, per-request timeout, the run's ``duration_limit_s``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import httpx

from headway.bench.workloads import Session, Workload, build_messages, render_prompt

Api = Literal["chat", "completions"]
_ERROR_BODY_LIMIT = 2000


@dataclass(frozen=True)
class Target:
    """An OpenAI-compatible endpoint to benchmark. ``base_url`` ends before ``/v1``."""

    name: str
    base_url: str
    model: str
    api: Api = "chat"
    ignore_eos: bool = False  # fixed-length outputs (sends vLLM's ignore_eos and min_tokens)
    eos_token_ids: tuple[int, ...] = ()  # with ignore_eos: also banned through logit_bias (OpenAI API)

    def url(self) -> str:
        path = "/v1/chat/completions" if self.api == "chat" else "/v1/completions"
        return self.base_url.rstrip("/") + path


@dataclass
class RequestResult:
    """Timings and outcome of one request (one turn of one session)."""

    session: int
    turn: int
    ok: bool
    start_s: float  # offset from the run's start
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    output_tokens: int = 0
    usage_reported: bool = False
    prompt_tokens: int | None = None
    status: int | None = None
    error: str | None = None
    text: str = ""


@dataclass
class RunResult:
    """All request results of one workload against one target."""

    target: str
    results: list[RequestResult]
    wall_s: float
    meta: dict[str, object] = field(default_factory=dict)


ProgressFn = Callable[[RequestResult], None]


def _request_body(target: Target, messages: list[dict[str, str]], max_tokens: int) -> dict[str, object]:
    body: dict[str, object] = {"model": target.model, "max_tokens": max_tokens, "stream": True,
                               "stream_options": {"include_usage": True}, "temperature": 0.0}
    if target.ignore_eos:
        body["ignore_eos"] = True
        body["min_tokens"] = max_tokens
        if target.eos_token_ids:
            body["logit_bias"] = {str(t): -100 for t in target.eos_token_ids}
    if target.api == "chat":
        body["messages"] = messages
    else:
        body["prompt"] = render_prompt(messages)
    return body


def _error_message(status: int, raw: bytes) -> str:
    text = raw[:_ERROR_BODY_LIMIT].decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
        err = data.get("error", data) if isinstance(data, dict) else data
        msg = err.get("message", err) if isinstance(err, dict) else err
        text = str(msg if msg is not None else text)
    except ValueError:
        pass
    return f"HTTP {status}: {text or '(empty body)'}"


async def send_request(client: httpx.AsyncClient, target: Target, messages: list[dict[str, str]],
                       max_tokens: int, *, session: int = 0, turn: int = 0,
                       run_start: float | None = None) -> RequestResult:
    """Send one streaming request and time it. Never raises for HTTP or stream failures."""
    t0 = time.perf_counter()
    res = RequestResult(session=session, turn=turn, ok=False, start_s=t0 - (run_start or t0))
    max_events = 8 * max_tokens + 64
    last: float | None = None
    pieces: list[str] = []
    chunks = 0
    done = False
    try:
        async with client.stream("POST", target.url(), json=_request_body(target, messages, max_tokens)) as resp:
            res.status = resp.status_code
            if resp.status_code != 200:
                res.error = _error_message(resp.status_code, await resp.aread())
                return res
            events = 0
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                events += 1
                if events > max_events:
                    res.error = f"stream exceeded {max_events} events for max_tokens={max_tokens}"
                    return res
                payload = line[5:].strip()
                if payload == "[DONE]":
                    done = True
                    break
                try:
                    event = json.loads(payload)
                except ValueError:
                    res.error = f"bad stream event (not JSON): {payload[:200]!r}"
                    return res
                if "error" in event:
                    err = event["error"]
                    res.error = f"stream error: {err.get('message', err) if isinstance(err, dict) else err}"
                    return res
                usage = event.get("usage")
                if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
                    res.output_tokens = int(usage["completion_tokens"])
                    res.prompt_tokens = usage.get("prompt_tokens")
                    res.usage_reported = True
                for choice in event.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content") if target.api == "chat" else choice.get("text")
                    if content:
                        now = time.perf_counter()
                        if last is None:
                            res.ttft_s = now - t0
                        else:
                            res.itl_s.append(now - last)
                        last = now
                        chunks += 1
                        pieces.append(content)
    except httpx.TimeoutException as exc:
        res.error = f"timeout after {time.perf_counter() - t0:.1f}s: {type(exc).__name__} {exc}".strip()
        return res
    except httpx.HTTPError as exc:
        res.error = f"{type(exc).__name__}: {str(exc) or 'connection failed'} ({target.url()})"
        return res
    finally:
        res.text = "".join(pieces)
    if not done:
        res.error = f"stream ended without [DONE] after {chunks} content chunks (HTTP {res.status})"
        return res
    res.e2e_s = time.perf_counter() - t0
    if not res.usage_reported:
        res.output_tokens = chunks
    res.ok = True
    return res


def _missing(session: Session, turn: int, why: str, start_s: float) -> RequestResult:
    return RequestResult(session=session.id, turn=turn, ok=False, start_s=start_s, error=why)


async def warm_up(target: Target, n: int = 1, *, timeout_s: float = 120.0) -> list[RequestResult]:
    """Send ``n`` short untimed requests one by one (first-request setup costs stay out of the run)."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s))) as client:
        return [await send_request(client, target, [{"role": "user", "content": "Say hello."}], 4) for _ in range(n)]


async def run_workload(target: Target, workload: Workload, *, duration_limit_s: float = 600.0,
                       request_timeout_s: float = 300.0, progress: ProgressFn | None = None,
                       warmup: int = 0) -> RunResult:
    """Run ``workload`` against ``target`` (after ``warmup`` untimed requests); returns one result
    per request of the workload."""
    if duration_limit_s <= 0:
        raise ValueError(f"duration_limit_s must be > 0, got {duration_limit_s}")
    warm = await warm_up(target, warmup, timeout_s=request_timeout_s) if warmup > 0 else []
    results: dict[tuple[int, int], RequestResult] = {}
    gate = asyncio.Semaphore(workload.concurrency)
    timeout = httpx.Timeout(request_timeout_s, connect=min(10.0, request_timeout_s))
    limits = httpx.Limits(max_connections=workload.concurrency, max_keepalive_connections=workload.concurrency)
    run_start = time.perf_counter()

    def record(r: RequestResult) -> None:
        results[(r.session, r.turn)] = r
        if progress is not None:
            progress(r)

    async def run_session(client: httpx.AsyncClient, session: Session) -> None:
        if session.arrival_s is not None:
            await asyncio.sleep(max(0.0, run_start + session.arrival_s - time.perf_counter()))
        async with gate:
            answers: list[str] = []
            for k, turn in enumerate(session.turns):
                r = await send_request(client, target, build_messages(session, k, answers), turn.max_tokens,
                                       session=session.id, turn=k, run_start=run_start)
                record(r)
                if not r.ok:
                    for j in range(k + 1, len(session.turns)):
                        record(_missing(session, j, f"not sent: turn {k} of this conversation failed",
                                        time.perf_counter() - run_start))
                    return
                answers.append(r.text)

    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        tasks = [asyncio.create_task(run_session(client, s)) for s in workload.sessions]
        _, pending = await asyncio.wait(tasks, timeout=duration_limit_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        for task in tasks:
            if not task.cancelled() and (error := task.exception()) is not None:
                raise error  # a bug in this module, not a request failure
    wall = time.perf_counter() - run_start
    ordered: list[RequestResult] = []
    for s in workload.sessions:
        for k in range(len(s.turns)):
            r = results.get((s.id, k))
            if r is None:
                r = _missing(s, k, f"cancelled: duration limit {duration_limit_s:g}s reached", wall)
                record(r)
            ordered.append(r)
    return RunResult(target=target.name, results=ordered, wall_s=wall,
                     meta={"base_url": target.base_url, "model": target.model, "api": target.api,
                           "warmup_requests": len(warm),
                           "warmup_errors": [w.error for w in warm if not w.ok]})
