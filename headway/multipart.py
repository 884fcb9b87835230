"""multipart/form-data bodies (RFC 7578), parsed with the standard library only: what a replica
reads an OpenAI audio upload from, and what a router reads a multipart request's `model` from.

Owns nothing. Invariant: a malformed body raises MultipartError (never returns a partial form);
part contents are returned as bytes, untouched and unlogged.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

_PARAM = re.compile(r';\s*([A-Za-z0-9_*-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


class MultipartError(ValueError):
    pass


@dataclass(frozen=True)
class Part:
    name: str
    data: bytes
    filename: str | None = None
    content_type: str | None = None

    def text(self) -> str:
        try:
            return self.data.decode("utf-8")
        except UnicodeDecodeError:
            raise MultipartError(f"form field '{self.name}' is not UTF-8 text") from None


def _params(header: str) -> dict[str, str]:
    out = {}
    for key, value in _PARAM.findall(header):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        out[key.lower()] = value
    return out


def boundary_of(content_type: str) -> bytes | None:
    """The boundary of a multipart/form-data content type, else None."""
    if not content_type.lower().lstrip().startswith("multipart/form-data"):
        return None
    b = _params(content_type).get("boundary")
    return b.encode("latin-1") if b else None


def parse(body: bytes, content_type: str) -> list[Part]:
    """Every part of a multipart/form-data body, in order."""
    return list(iter_parts(body, content_type))


def iter_parts(body: bytes, content_type: str) -> Iterator[Part]:
    """The parts one by one (a caller after one short field may stop early)."""
    boundary = boundary_of(content_type)
    if boundary is None:
        raise MultipartError("expected a multipart/form-data body with a boundary")
    delimiter = b"--" + boundary
    if not body.startswith(delimiter):
        start = body.find(b"\r\n" + delimiter)
        if start < 0:
            raise MultipartError("the multipart body has no part")
        body = body[start + 2:]
    pos = len(delimiter)
    while True:
        if body[pos:pos + 2] == b"--":
            return
        if body[pos:pos + 2] != b"\r\n":
            raise MultipartError("malformed multipart body (boundary not followed by CRLF)")
        head_end = body.find(b"\r\n\r\n", pos + 2)
        if head_end < 0:
            raise MultipartError("malformed multipart body (part headers do not end)")
        nxt = body.find(b"\r\n" + delimiter, head_end + 4)
        if nxt < 0:
            raise MultipartError("malformed multipart body (no closing boundary)")
        headers: dict[str, str] = {}
        for line in body[pos + 2:head_end].decode("latin-1").split("\r\n"):
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        disposition = headers.get("content-disposition", "")
        params = _params(";" + disposition.partition(";")[2])
        if "name" not in params:
            raise MultipartError("a multipart part has no name (Content-Disposition: form-data; name=...)")
        yield Part(params["name"], body[head_end + 4:nxt], params.get("filename"), headers.get("content-type"))
        pos = nxt + 2 + len(delimiter)


def field_value(body: bytes, content_type: str, name: str, max_len: int = 256) -> str | None:
    """One short text field of a multipart body (e.g. `model`), or None when absent or malformed."""
    try:
        for part in iter_parts(body, content_type):
            if part.name == name and part.filename is None and len(part.data) <= max_len:
                return part.text()
    except MultipartError:
        return None
    return None
