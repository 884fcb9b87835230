"""What a store tells us about one remote file, shared by the s3 and https stores."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class RemoteFile:
    """One remote file of a source, as listed by its store."""

    url: str  # s3://bucket/key or the https URL (after redirects: where ranges are asked)
    rel: str  # its path inside the fetched model directory (the name under the prefix)
    size: int
    cache_key: str  # names these exact bytes: endpoint, URL, ETag or version, size
    etag: str | None = None  # the store's validator, sent back so a changed object fails
    md5: str | None = None  # the bytes' MD5 when the store's ETag is one (single-part S3 uploads)
    ranged: bool = True  # the store serves byte ranges of it


class Store(Protocol):
    """A place remote files come from: lists a source's files and reads byte ranges of one."""

    def files(self, url: str) -> list[RemoteFile]: ...

    def read(self, f: RemoteFile, start: int, end: int) -> Iterable[bytes]: ...
