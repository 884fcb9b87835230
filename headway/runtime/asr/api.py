"""OpenAI's POST /v1/audio/transcriptions on an ASR replica: multipart form in, transcript out
(json, text, srt, vtt, verbose_json), or SSE events (transcript.text.delta, transcript.text.done)
with stream=true.

Owns request validation and the request's life: a clear 4xx for every bad input before any
work, one admission ticket from the gate per request (held to the end of a stream), and the
job's chunks dropped from the engine when its client goes away. Audio and text never reach a log.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from headway.multipart import MultipartError, parse
from headway.runtime.admission import Ticket
from headway.runtime.asr.audio import SAMPLE_RATE, AudioError, decode
from headway.runtime.asr.chunks import split
from headway.runtime.asr.decode import DecodeOptions
from headway.runtime.asr.engine import AsrEngine, Job
from headway.runtime.asr.formats import FORMATS, Transcript, render
from headway.runtime.gate import Gate
from headway.wire import ClientGone, cancel_on_disconnect, sse_event

log = logging.getLogger("headway.asr")


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, code: str = "invalid_request", status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": "invalid_request_error",
                                       "param": self.param, "code": self.code}}, status_code=self.status)


@dataclass
class TranscriptionCall:
    audio: bytes
    opts: DecodeOptions
    language: str | None
    response_format: str
    granularities: set[str]
    stream: bool


def _bool(value: str, param: str) -> bool:
    if value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0", ""):
        return False
    raise BadRequest(f"'{param}' must be true or false, got '{value[:20]}'", param)


def parse_call(body: bytes, content_type: str, names: list[str], languages: set[str], beam_size: int
               ) -> TranscriptionCall:
    """Validate the form; raises BadRequest (400, or 404 for an unknown model)."""
    try:
        parts = parse(body, content_type)
    except MultipartError as exc:
        raise BadRequest(f"send the audio as multipart/form-data with a 'file' part: {exc}", "file") from None
    files = [p for p in parts if p.name == "file"]
    if len(files) != 1 or files[0].filename is None:
        raise BadRequest("exactly one 'file' part (an uploaded audio file) is required", "file")
    fields: dict[str, list[str]] = {}
    for p in parts:
        if p.name != "file":
            try:
                fields.setdefault(p.name.removesuffix("[]"), []).append(p.text())
            except MultipartError as exc:
                raise BadRequest(str(exc), p.name) from None
    one = {k: v[-1] for k, v in fields.items()}
    model = one.get("model")
    if not model:
        raise BadRequest(f"'model' is required; this server serves {', '.join(map(repr, names))}", "model")
    if model not in names:
        raise BadRequest(f"The model '{model}' does not exist; this server serves {', '.join(map(repr, names))}",
                         "model", "model_not_found", 404)
    fmt = one.get("response_format", "json")
    if fmt not in FORMATS:
        raise BadRequest(f"response_format must be one of {', '.join(FORMATS)}, got '{fmt[:40]}'", "response_format")
    granularities = set(fields.get("timestamp_granularities", []))
    if bad := granularities - {"word", "segment"}:
        raise BadRequest(f"timestamp_granularities[] takes word and/or segment, got {sorted(bad)}",
                         "timestamp_granularities")
    if granularities and fmt != "verbose_json":
        raise BadRequest("timestamp_granularities[] needs response_format=verbose_json", "timestamp_granularities")
    try:
        temperature = float(one.get("temperature", "0") or 0)
    except ValueError:
        raise BadRequest(f"temperature must be a number between 0 and 1, got '{one['temperature'][:20]}'",
                         "temperature") from None
    if not 0 <= temperature <= 1:
        raise BadRequest(f"temperature must be between 0 and 1, got {temperature}", "temperature")
    language = one.get("language") or None
    if language is not None and language not in languages:
        raise BadRequest(f"language must be an ISO-639-1 code this model knows (e.g. 'en'), got '{language[:20]}'",
                         "language")
    stream = _bool(one.get("stream", "false"), "stream")
    if stream and fmt not in ("json", "text"):
        raise BadRequest("stream=true works with response_format json or text", "stream")
    opts = DecodeOptions(prompt=one.get("prompt") or None, temperature=temperature,
                         word_timestamps=fmt in ("srt", "vtt", "verbose_json"), beam_size=beam_size)
    return TranscriptionCall(files[0].data, opts, language, fmt, granularities, stream)


class TranscriptionServer:
    def __init__(self, engine: Callable[[], AsrEngine | None], names: list[str], gate: Gate | None,
                 max_audio_seconds: float):
        self.engine = engine
        self.names = names
        self.gate = gate
        self.max_audio_seconds = max_audio_seconds

    async def _start(self, call: TranscriptionCall, engine: AsrEngine) -> tuple[Job | None, Transcript]:
        """Decode, cut at silences, queue the chunks. No speech: no job."""
        audio = await asyncio.to_thread(decode, call.audio, self.max_audio_seconds)
        chunks = await asyncio.to_thread(split, audio)
        transcript = Transcript(duration=audio.size / SAMPLE_RATE, language=call.language or "en")
        if not chunks:
            return None, transcript
        return engine.submit(chunks, call.opts, call.language, transcript.duration), transcript

    async def _collect(self, job: Job | None, transcript: Transcript) -> Transcript:
        if job is not None:
            async for chunk, result in job.results():
                transcript.add(chunk, result)
        return transcript

    def router(self) -> APIRouter:
        router = APIRouter()

        @router.post("/v1/audio/transcriptions")
        async def transcriptions(request: Request) -> Response:
            engine = self.engine()
            assert engine is not None   # the gate refuses model routes until the engine is loaded
            languages = set(engine.model.supported_languages) if engine.model is not None else {"en"}
            try:
                call = parse_call(await request.body(), request.headers.get("content-type", ""), self.names,
                                  languages, engine.beam_size)
            except BadRequest as exc:
                return exc.response()
            ticket = await self.gate.admit() if self.gate is not None else None
            try:
                job, transcript = await cancel_on_disconnect(self._start(call, engine), request)
            except AudioError as exc:
                _release(ticket)
                return BadRequest(str(exc), "file", exc.code).response()
            except ClientGone:
                _release(ticket)
                return Response(status_code=499)
            except BaseException:
                _release(ticket)
                raise
            if call.stream:
                return self._stream(job, transcript, call, engine, ticket)
            try:
                done = await cancel_on_disconnect(self._collect(job, transcript), request)
            except ClientGone:
                engine.metrics.finished(transcript.duration, "cancelled")
                return Response(status_code=499)
            except Exception as exc:
                engine.metrics.finished(transcript.duration, "failed")
                log.error("transcription failed: %s", type(exc).__name__)
                return JSONResponse({"error": {"message": f"transcription failed: {exc}", "type": "server_error",
                                               "param": None, "code": "model_error"}}, status_code=500)
            finally:
                if job is not None:
                    engine.cancel(job)
                _release(ticket)
            engine.metrics.finished(done.duration, "ok")
            body, media = render(done, call.response_format, call.granularities)
            if isinstance(body, dict):
                return JSONResponse(body)
            return Response(body, media_type=media)

        return router

    def _stream(self, job: Job | None, transcript: Transcript, call: TranscriptionCall, engine: AsrEngine,
                ticket: Ticket | None) -> StreamingResponse:
        async def events() -> AsyncIterator[bytes]:
            outcome = "cancelled"
            try:
                if job is not None:
                    async for chunk, result in job.results():
                        if delta := transcript.add(chunk, result):
                            yield sse_event({"type": "transcript.text.delta", "delta": delta}, ascii_only=False)
                yield sse_event({"type": "transcript.text.done", "text": transcript.text,
                                 "usage": {"type": "duration", "seconds": round(transcript.duration, 3)}},
                                ascii_only=False)
                outcome = "ok"
            except Exception as exc:
                outcome = "failed"
                log.error("transcription stream failed: %s", type(exc).__name__)
                yield sse_event({"error": {"message": f"transcription failed: {exc}", "type": "server_error",
                                           "code": "model_error"}}, event="error", ascii_only=False)
            finally:
                if job is not None:
                    engine.cancel(job)   # a client gone mid-stream: its waiting chunks leave the queue
                _release(ticket)
                engine.metrics.finished(transcript.duration, outcome)

        from starlette.background import BackgroundTask

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(_abandon, engine, job, ticket))


def _abandon(engine: AsrEngine, job: Job | None, ticket: Ticket | None) -> None:
    """A stream's last word, even one cancelled before it started: no chunk left queued, no slot held."""
    if job is not None:
        engine.cancel(job)
    _release(ticket)


def _release(ticket: Ticket | None) -> None:
    if ticket is not None:
        ticket.release()
