"""Validation of speech requests: the body of POST /v1/audio/speech and the query of the
WebSocket, into a `SpeechRequest` or a `SpeechError` (a 4xx in OpenAI's error shape whose
message says what to send instead). Never echoes the input text in a message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from headway.runtime.tts.encode import FORMATS

MAX_INPUT_CHARS = 4096          # OpenAI's limit for `input`
MIN_SPEED, MAX_SPEED = 0.25, 4.0


class SpeechError(Exception):
    def __init__(self, message: str, *, param: str | None = None, status: int = 400,
                 code: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": "invalid_request_error" if self.status < 500 else
                          "server_error", "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class SpeechRequest:
    input: str
    voice: str
    response_format: str
    speed: float
    stream_format: str          # audio | sse


@dataclass(frozen=True)
class Limits:
    """What this replica serves: model names, voices, response formats (first: the default)."""

    models: Sequence[str]
    voices: Sequence[str]
    formats: Sequence[str]


def _string(body: Mapping[str, Any], key: str, default: str | None = None) -> str:
    value = body.get(key, default)
    if value is None:
        raise SpeechError(f"'{key}' is required", param=key)
    if not isinstance(value, str):
        raise SpeechError(f"'{key}' must be a string, not {type(value).__name__}", param=key)
    return value


def check_model(name: str, limits: Limits) -> None:
    if name not in limits.models:
        raise SpeechError(f"model '{name}' is not served here; this replica serves '{limits.models[0]}'",
                          param="model", status=404, code="model_not_found")


def check_voice(voice: str, limits: Limits) -> str:
    if voice not in limits.voices:
        raise SpeechError(f"unknown voice '{voice}'; this model has: {', '.join(limits.voices)}", param="voice")
    return voice


def check_format(fmt: str, limits: Limits, allowed: Sequence[str] | None = None) -> str:
    usable = [f for f in limits.formats if allowed is None or f in allowed]
    if fmt not in usable:
        why = "is not a response format" if fmt not in FORMATS else "is not available on this server"
        raise SpeechError(f"response_format '{fmt}' {why}; available: {', '.join(usable)}",
                          param="response_format")
    return fmt


def check_speed(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpeechError(f"'speed' must be a number from {MIN_SPEED} to {MAX_SPEED}, not {type(value).__name__}",
                          param="speed")
    if not MIN_SPEED <= value <= MAX_SPEED:
        raise SpeechError(f"'speed' must be from {MIN_SPEED} to {MAX_SPEED}, got {value}", param="speed")
    return float(value)


def parse_speech(body: Any, limits: Limits) -> SpeechRequest:
    """A POST /v1/audio/speech body -> SpeechRequest; SpeechError (4xx) on anything wrong."""
    if not isinstance(body, dict):
        raise SpeechError("the body must be a JSON object like {\"model\": \"...\", \"input\": \"Hello.\", "
                          "\"voice\": \"...\"}")
    check_model(_string(body, "model"), limits)
    text = _string(body, "input")
    if not text.strip():
        raise SpeechError("'input' is empty; give the text to speak", param="input")
    if len(text) > MAX_INPUT_CHARS:
        raise SpeechError(f"'input' is {len(text)} characters; at most {MAX_INPUT_CHARS} per request "
                          "(split longer texts, or stream them over the WebSocket)", param="input")
    voice = check_voice(_string(body, "voice"), limits)
    fmt = check_format(_string(body, "response_format", limits.formats[0]), limits)
    speed = check_speed(body.get("speed", 1.0))
    stream_format = _string(body, "stream_format", "audio")
    if stream_format not in ("audio", "sse"):
        raise SpeechError(f"stream_format '{stream_format}' is not one of: audio, sse", param="stream_format")
    instructions = body.get("instructions")
    if instructions not in (None, ""):
        raise SpeechError("'instructions' is not supported by Piper voices; leave it out", param="instructions")
    return SpeechRequest(text, voice, fmt, speed, stream_format)


def parse_stream_query(query: Mapping[str, str], limits: Limits) -> SpeechRequest:
    """The WebSocket's query (?voice=&response_format=pcm|wav&speed=) -> SpeechRequest (no input)."""
    if "model" in query:
        check_model(query["model"], limits)
    voice = check_voice(query.get("voice", limits.voices[0]), limits)
    fmt = check_format(query.get("response_format", "pcm"), limits, allowed=("pcm", "wav"))
    try:
        speed = float(query.get("speed", "1"))
    except ValueError:
        raise SpeechError(f"'speed' must be a number from {MIN_SPEED} to {MAX_SPEED}", param="speed") from None
    return SpeechRequest("", voice, fmt, check_speed(speed), "audio")
