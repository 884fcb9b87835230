"""Parallel byte-range transfer into one preallocated file: the engine under s3 and https.

A source is a `RangeReader`: `read(start, end)` yields the bytes of [start, end) in chunks. The
object is cut into parts of `part_size`; `concurrency` threads fetch parts and write each chunk
at its own offset (`os.pwrite`) into a file preallocated to the final size. A part that fails
(reset connection, 5xx, short body) is retried from the byte where it stopped, with backoff;
a `FetchError` from the reader (404, 403, changed object) is final and stops every part.

Invariant: when `download` returns, every byte of [0, size) was written exactly by its part and
each part wrote exactly its length; otherwise it raises and the caller discards the file.
"""
from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from headway.infra.weights.errors import FetchError, IntegrityError, TransferError

RangeReader = Callable[[int, int], Iterable[bytes]]
MiB = 1 << 20


@dataclass(frozen=True)
class TransferOptions:
    """How one object is fetched. `concurrency=1` is a single stream."""

    part_size: int = 16 * MiB
    concurrency: int = 8
    retries: int = 4  # further attempts per part after its first
    backoff_s: float = 0.25  # sleep before retry n is backoff_s * 2**n
    progress: bool | None = None  # None: a progress bar when stderr is a terminal

    def __post_init__(self) -> None:
        if self.part_size < 64 * 1024:
            raise ValueError(f"part_size {self.part_size} is too small; allowed: >= 65536 bytes (e.g. 16 MiB)")
        if not 1 <= self.concurrency <= 64:
            raise ValueError(f"concurrency {self.concurrency} is out of range; allowed: 1..64 streams")
        if not 0 <= self.retries <= 20:
            raise ValueError(f"retries {self.retries} is out of range; allowed: 0..20")

    def show_bar(self) -> bool:
        return sys.stderr.isatty() if self.progress is None else self.progress


@dataclass(frozen=True)
class Part:
    start: int
    end: int  # exclusive

    @property
    def length(self) -> int:
        return self.end - self.start


def plan_parts(size: int, part_size: int) -> list[Part]:
    """[0, size) cut into consecutive parts of `part_size` (the last one shorter); none for 0."""
    return [Part(s, min(s + part_size, size)) for s in range(0, size, part_size)]


class _Cancelled(Exception):
    pass


def download(dest: Path, size: int, read: RangeReader, options: TransferOptions, *, what: str,
             ranged: bool = True) -> None:
    """Fetch `size` bytes into `dest` (created or truncated). `ranged=False`: the reader serves
    only whole objects, so there is one part and a retry starts again from byte 0."""
    parts = plan_parts(size, options.part_size) if ranged else ([Part(0, size)] if size else [])
    stop = threading.Event()
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    bar = tqdm(total=size, desc=what[-40:], unit="B", unit_scale=True, unit_divisor=1024,
               disable=not options.show_bar(), file=sys.stderr, leave=False)
    bar_lock = threading.Lock()

    def advance(n: int) -> None:
        with bar_lock:
            bar.update(n)

    try:
        if size:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError:  # file systems without fallocate: a sparse file of the final size
                os.ftruncate(fd, size)
        workers = max(1, min(options.concurrency, len(parts)))
        with ThreadPoolExecutor(workers, thread_name_prefix="fetch") as pool:
            futures = [pool.submit(_fetch_part, fd, p, read, options, stop, advance, what, ranged) for p in parts]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in done if f.exception() is not None]
            if failed:
                stop.set()
                for f in futures:
                    f.cancel()
                exc = failed[0].exception()
                assert exc is not None
                raise exc
        os.fsync(fd)
    finally:
        bar.close()
        os.close(fd)
    actual = dest.stat().st_size
    if actual != size:
        raise IntegrityError(f"{what}: wrote {actual} bytes, expected {size}")


def _fetch_part(fd: int, part: Part, read: RangeReader, options: TransferOptions, stop: threading.Event,
                advance: Callable[[int], None], what: str, ranged: bool) -> None:
    done = 0
    for attempt in range(options.retries + 1):
        if not ranged:
            done = 0
        try:
            for chunk in read(part.start + done, part.end):
                if stop.is_set():
                    raise _Cancelled()
                if done + len(chunk) > part.length:
                    raise IntegrityError(f"{what}: bytes {part.start}-{part.end - 1} returned more than "
                                         f"{part.length} bytes; the object changed or the server ignores ranges")
                _pwrite_all(fd, chunk, part.start + done)
                done += len(chunk)
                advance(len(chunk))
            if done == part.length:
                return
            raise _ShortRead(f"body ended after {done} of {part.length} bytes")
        except (FetchError, _Cancelled):
            raise
        except Exception as exc:  # noqa: BLE001 (transport errors of any client library are retried)
            if attempt == options.retries:
                raise TransferError(f"{what}: bytes {part.start}-{part.end - 1} failed after "
                                    f"{options.retries + 1} attempts: {type(exc).__name__}: {exc}") from exc
            time.sleep(options.backoff_s * 2**attempt)
    raise AssertionError("unreachable")


class _ShortRead(Exception):
    pass


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def file_digests(path: Path, *, md5: bool = False) -> tuple[str, str | None]:
    """(sha256, md5 or None) of a file in one streamed pass."""
    sha = hashlib.sha256()
    m = hashlib.md5(usedforsecurity=False) if md5 else None
    with path.open("rb") as f:
        while block := f.read(8 * MiB):
            sha.update(block)
            if m is not None:
                m.update(block)
    return sha.hexdigest(), (m.hexdigest() if m is not None else None)
