"""The speech endpoints: OpenAI's POST /v1/audio/speech and the WebSocket /v1/audio/speech/stream.

HTTP: the body is validated (request.py; a 4xx names what to fix), an admission ticket is taken
(429 past the queue), the text is split into sentences and queued on the synthesizer at once,
and the audio streams out sentence by sentence as it is synthesized (`stream_format` audio: the
encoded bytes; sse: `speech.audio.delta` events with base64 audio, then `speech.audio.done`).

WebSocket: the query picks voice, response_format (pcm | wav) and speed. The client sends JSON
text frames: {"text": "..."} (any piece: a token), {"flush": true} (speak what is held even
without an end mark), {"end": true} (no more text). Each sentence is queued the moment it is
complete, so speech starts before the text is finished. The server sends {"type":
"speech.start", sample_rate, ...}, binary audio frames, {"type": "speech.sentence", ...} after
each sentence's audio, and {"type": "speech.done", ...} before closing (1000).

Invariants: one admission ticket per request or connection, held until its audio ends or its
client leaves, then released; a request's job is cancelled on every exit path (a client that
leaves frees its queued sentences at once). Text is never logged.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Callable

import numpy as np
from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from headway.runtime.admission import Ticket
from headway.runtime.gate import Gate, Refused
from headway.runtime.tts.encode import CONTENT_TYPES, encoder_for, resample
from headway.runtime.tts.metrics import TTSMetrics
from headway.runtime.tts.request import (
    MAX_INPUT_CHARS,
    Limits,
    SpeechError,
    SpeechRequest,
    parse_speech,
    parse_stream_query,
)
from headway.runtime.tts.sentences import SentenceBuffer, split_sentences
from headway.runtime.tts.synth import Job, Synthesizer
from headway.wire import ClientGone, cancel_on_disconnect, sse_event

STREAM_PATH = "/v1/audio/speech/stream"
MAX_STREAM_CHARS = 100_000      # per WebSocket connection (its sentences wait in memory until spoken)


def _refusal(exc: Refused) -> JSONResponse:
    r = exc.refusal
    return JSONResponse({"error": {"message": r.message, "type": r.kind, "param": None, "code": r.kind}},
                        status_code=r.status, headers=r.headers)


class SpeechAPI:
    def __init__(self, synth: Callable[[], Synthesizer], limits: Callable[[], Limits], gate: Gate | None,
                 metrics: TTSMetrics, out_rate: Callable[[], int], idle_s: float = 60.0):
        self.synth, self.limits, self.gate, self.metrics, self.out_rate = synth, limits, gate, metrics, out_rate
        self.idle_s = idle_s   # a WebSocket silent this long is closed (it holds an admission slot)

    def router(self) -> APIRouter:
        router = APIRouter()
        router.add_api_route("/v1/audio/speech", self.speech, methods=["POST"])
        router.add_api_websocket_route(STREAM_PATH, self.stream)
        return router

    def _samples(self, samples: np.ndarray) -> np.ndarray:
        return resample(samples, self.synth().sample_rate, self.out_rate())

    # -- HTTP
    async def speech(self, request: Request) -> Response:
        arrived = time.monotonic()
        try:
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise SpeechError(f"the request body is not valid JSON: {exc}") from None
            req = parse_speech(body, self.limits())
        except SpeechError as exc:
            self.metrics.requests.labels(self.metrics.model, "http", "invalid").inc()
            return JSONResponse(exc.body(), status_code=exc.status)
        try:
            ticket = await cancel_on_disconnect(self.gate.admit(), request) if self.gate else None
        except Refused as exc:
            return _refusal(exc)
        except ClientGone:
            return Response(status_code=499)
        job = self.synth().open(req.speed)
        job.add(split_sentences(req.input))
        job.end()

        def done() -> None:   # a stream cancelled before it started never runs its finally
            job.cancel()
            if ticket is not None:
                ticket.release()

        sse = req.stream_format == "sse"
        media = "text/event-stream" if sse else CONTENT_TYPES[req.response_format]
        return StreamingResponse(self._http_audio(job, req, ticket, arrived), media_type=media,
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                          "X-Headway-Sample-Rate": str(self.out_rate())},
                                 background=BackgroundTask(done))

    async def _http_audio(self, job: Job, req: SpeechRequest, ticket: Ticket | None,
                          arrived: float) -> AsyncIterator[bytes]:
        enc = encoder_for(req.response_format, self.out_rate())
        sse = req.stream_format == "sse"
        first = True
        outcome = "cancelled"

        def wrap(data: bytes) -> bytes:
            return sse_event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()}) if sse else data

        try:
            async for samples in job.audio():
                data = enc.encode(self._samples(samples))
                if data:
                    if first:
                        first = False
                        self.metrics.first_audio.labels(self.metrics.model, "http").observe(time.monotonic() - arrived)
                    yield wrap(data)
            if tail := enc.finish():
                yield wrap(tail)
            if sse:
                yield sse_event({"type": "speech.audio.done",
                                 "usage": {"input_characters": len(req.input), "audio_seconds": round(job.audio_s, 3)}})
            outcome = "ok"
        except Exception as exc:
            outcome = "error"
            if sse:
                yield sse_event({"error": {"message": f"speech synthesis failed: {type(exc).__name__}",
                                           "type": "server_error"}}, event="error")
            else:
                raise
        finally:
            job.cancel()
            if ticket is not None:
                ticket.release()
            self.metrics.requests.labels(self.metrics.model, "http", outcome).inc()

    # -- WebSocket
    async def stream(self, ws: WebSocket) -> None:
        try:
            req = parse_stream_query(ws.query_params, self.limits())
        except SpeechError as exc:
            await ws.send_denial_response(JSONResponse(exc.body(), status_code=exc.status))
            return
        if self.gate is not None and (refusal := self.gate.refusal()) is not None:
            await ws.send_denial_response(_refusal(Refused(refusal)))
            return
        try:
            ticket = await self.gate.admit() if self.gate else None
        except Refused as exc:
            await ws.send_denial_response(_refusal(exc))
            return
        job = self.synth().open(req.speed)
        try:
            await ws.accept()
            await ws.send_json({"type": "speech.start", "sample_rate": self.out_rate(), "format": req.response_format,
                                "channels": 1, "sample_width": 2})
            await self._converse(ws, job, req)
        except WebSocketDisconnect:
            self.metrics.requests.labels(self.metrics.model, "ws", "cancelled").inc()
        except Exception as exc:   # synthesis failed, or the socket broke: an error frame if it can still go
            self.metrics.requests.labels(self.metrics.model, "ws", "error").inc()
            try:
                await ws.send_json({"type": "error", "message": f"speech synthesis failed: {type(exc).__name__}"})
                await ws.close(code=1011)
            except Exception:
                pass
        finally:
            job.cancel()
            if ticket is not None:
                ticket.release()

    async def _converse(self, ws: WebSocket, job: Job, req: SpeechRequest) -> None:
        completed: list[float] = []          # when each sentence was complete (for time to first audio)
        buffer = SentenceBuffer()

        def queue(sentences: list[str]) -> None:
            completed.extend(time.monotonic() for _ in sentences)
            job.add(sentences)

        async def receive() -> None:
            while True:
                try:
                    msg = json.loads(await asyncio.wait_for(ws.receive_text(), self.idle_s))
                except asyncio.TimeoutError:
                    raise SpeechError(f"no frame for {self.idle_s:g} s; send {{\"end\": true}} when the text is "
                                      "finished") from None
                except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
                    raise SpeechError("send JSON text frames: {\"text\": \"...\"}, {\"flush\": true} or "
                                      "{\"end\": true}") from None
                if not isinstance(msg, dict):
                    raise SpeechError("each frame must be a JSON object such as {\"text\": \"Hello. \"}")
                text = msg.get("text")
                if text is not None:
                    if not isinstance(text, str) or len(text) > MAX_INPUT_CHARS:
                        raise SpeechError(f"'text' must be a string of at most {MAX_INPUT_CHARS} characters",
                                          param="text")
                    if buffer.characters + len(text) > MAX_STREAM_CHARS:
                        raise SpeechError(f"a connection speaks at most {MAX_STREAM_CHARS} characters; open another",
                                          param="text")
                    queue(buffer.feed(text))
                if msg.get("flush") or msg.get("end"):
                    queue(buffer.flush())
                if msg.get("end"):
                    job.end()
                    return

        async def send() -> None:
            enc = encoder_for(req.response_format, self.out_rate())
            index = 0
            async for samples in job.audio():
                await ws.send_bytes(enc.encode(self._samples(samples)))
                if index == 0 and completed:
                    self.metrics.first_audio.labels(self.metrics.model, "ws").observe(time.monotonic() - completed[0])
                await ws.send_json({"type": "speech.sentence", "index": index,
                                    "audio_seconds": round(len(samples) / self.synth().sample_rate, 3)})
                index += 1
            await ws.send_json({"type": "speech.done", "sentences": index, "characters": buffer.characters,
                                "audio_seconds": round(job.audio_s, 3)})

        receiver, sender = asyncio.ensure_future(receive()), asyncio.ensure_future(send())
        try:
            done, _ = await asyncio.wait({receiver, sender}, return_when=asyncio.FIRST_COMPLETED)
            if receiver in done:
                receiver.result()         # a bad frame or a disconnect raises here
                await sender
            else:
                sender.result()
        except SpeechError as exc:
            await ws.send_json({"type": "error", "message": exc.message, "param": exc.param, "code": exc.code})
            await ws.close(code=1008)
            self.metrics.requests.labels(self.metrics.model, "ws", "invalid").inc()
            return
        finally:
            for task in (receiver, sender):
                task.cancel()
        await ws.close(code=1000)
        self.metrics.requests.labels(self.metrics.model, "ws", "ok").inc()
