"""Local stores for tests and the benchmark, on 127.0.0.1: a file server that serves byte
ranges (or refuses to), and moto's S3 server; both can cap each connection's bandwidth, count
GETs and bytes served, and cut responses short on purpose.

`Shaper` is what both share: every response body passes through `Shaper.pace`, which sends it
in 64 KiB chunks no faster than `rate` bytes/s per response, counts it, and, while `cut_next`
is above zero, stops one response halfway and drops the connection (a reset mid-body); while
`corrupt_next` is above zero, flips one byte of a response (bit rot in transit).
"""
from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

CHUNK = 64 * 1024
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class CutShort(Exception):
    """Raised inside a response body to drop the connection mid-body (fault injection)."""


class Shaper:
    """Per-response bandwidth cap, GET/byte counters and cut-short faults (thread-safe)."""

    def __init__(self, rate: float | None = None) -> None:
        self.rate = rate  # bytes/s per response; None: unlimited
        self.cut_next = 0  # the next N bodies are cut halfway
        self.corrupt_next = 0  # the next N bodies have their first byte flipped
        self.gets = 0
        self.bytes_sent = 0
        self._lock = threading.Lock()

    def reset(self) -> None:
        with self._lock:
            self.gets = self.bytes_sent = 0

    def begin(self) -> str | None:
        """Count a GET; the fault to inject into its body: "cut", "corrupt" or None."""
        with self._lock:
            self.gets += 1
            if self.cut_next > 0:
                self.cut_next -= 1
                return "cut"
            if self.corrupt_next > 0:
                self.corrupt_next -= 1
                return "corrupt"
            return None

    def pace(self, blocks: Iterable[bytes], length: int, fault: str | None) -> Iterator[bytes]:
        cut = fault == "cut"
        limit = length // 2 if cut else length
        start, sent = time.perf_counter(), 0
        for block in blocks:
            view = memoryview(block)
            for i in range(0, len(view), CHUNK):
                piece = view[i:i + min(CHUNK, limit - sent)]
                if piece:
                    out = bytes(piece)
                    if fault == "corrupt" and sent == 0:
                        out = bytes([out[0] ^ 0xFF]) + out[1:]
                    yield out
                    sent += len(piece)
                    with self._lock:
                        self.bytes_sent += len(piece)
                if cut and sent >= limit:
                    raise CutShort()
                if self.rate:
                    ahead = sent / self.rate - (time.perf_counter() - start)
                    if ahead > 0:
                        time.sleep(ahead)
        if cut:
            raise CutShort()


class _FileHandler(BaseHTTPRequestHandler):
    server: "_FileHTTPServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        store = self.server.store
        path = self.path.split("?", 1)[0]
        if path.startswith("/redirect/"):
            self.send_response(302)
            self.send_header("Location", "/" + path[len("/redirect/"):])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if not body and not store.head_allowed:
            self.send_response(405)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        file = (store.root / path.lstrip("/")).resolve()
        if store.root not in file.parents or not file.is_file():
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        size = file.stat().st_size
        start, end, status = 0, size, 200
        rng = self.headers.get("Range")
        if rng and store.ranges:
            m = _RANGE.match(rng.strip())
            if m is None or int(m.group(1)) >= max(size, 1):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = int(m.group(1))
            end = min(int(m.group(2)) + 1, size) if m.group(2) else size
            status = 206
        self.send_response(status)
        self.send_header("Content-Length", str(end - start))
        self.send_header("ETag", f'"{int(file.stat().st_mtime_ns)}-{size}"')
        if store.ranges:
            self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if not body:
            return
        fault = store.shaper.begin()
        try:
            for piece in store.shaper.pace(_read_blocks(file, start, end), end - start, fault):
                self.wfile.write(piece)
        except CutShort:
            self.close_connection = True
            self.connection.shutdown(2)


def _read_blocks(file: Path, start: int, end: int) -> Iterator[bytes]:
    fd = os.open(file, os.O_RDONLY)
    try:
        pos = start
        while pos < end:
            block = os.pread(fd, min(1 << 20, end - pos), pos)
            if not block:
                return
            yield block
            pos += len(block)
    finally:
        os.close(fd)


class _FileHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    store: "FileServer"

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that hang up (a probe closing early, a cut-short body) are expected here


class _Running:
    """A server on a background thread for the life of a `with` block (subclasses set `_server`
    to a socketserver-style server before entering)."""

    _server: Any

    def __enter__(self) -> Any:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"


class FileServer(_Running):
    """Serves the files under `root` on 127.0.0.1; `ranges=False` ignores Range headers (and
    sends no Accept-Ranges), `head_allowed=False` answers HEAD with 405; `/redirect/NAME`
    redirects to `/NAME`. Use as a context manager."""

    def __init__(self, root: Path, *, ranges: bool = True, head_allowed: bool = True,
                 rate: float | None = None) -> None:
        self.root = root.resolve()
        self.ranges = ranges
        self.head_allowed = head_allowed
        self.shaper = Shaper(rate)
        self._server = _FileHTTPServer(("127.0.0.1", 0), _FileHandler)
        self._server.store = self


class S3Server(_Running):
    """moto's S3-compatible server on 127.0.0.1 with a `Shaper` on object GET bodies. Needs
    `moto[server]` (the `test` extra). Use as a context manager; `url` is the endpoint."""

    def __init__(self, *, rate: float | None = None) -> None:
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import WSGIRequestHandler, make_server

        class Quiet(WSGIRequestHandler):
            def log(self, type: str, message: str, *args: Any) -> None:  # cut-short bodies log tracebacks
                pass

        self.shaper = Shaper(rate)
        self._moto = DomainDispatcherApplication(create_backend_app)
        self._server = make_server("127.0.0.1", 0, self._app, threaded=True, request_handler=Quiet)

    def _app(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        result = self._moto(environ, start_response)
        path = environ.get("PATH_INFO", "")
        query = environ.get("QUERY_STRING", "")
        is_object_get = (environ.get("REQUEST_METHOD") == "GET" and path.strip("/").count("/") >= 1
                         and query in ("", "x-id=GetObject"))
        if not is_object_get:
            return result
        fault = self.shaper.begin()
        blocks = list(result)
        if hasattr(result, "close"):
            result.close()
        return self.shaper.pace(blocks, sum(len(b) for b in blocks), fault)


def main(argv: list[str] | None = None) -> None:
    """`python -m headway.infra.weights.localstore (--files DIR | --s3) [--rate BYTES_PER_S]`:
    run one store in its own process (the benchmark's remote end); prints its URL, then serves
    until killed."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--files", type=Path, help="serve the files under this directory")
    parser.add_argument("--s3", action="store_true", help="serve moto's S3 API instead")
    parser.add_argument("--rate", type=float, default=None, help="bytes/s cap per response (default: none)")
    parser.add_argument("--no-ranges", action="store_true", help="ignore Range headers (files only)")
    args = parser.parse_args(argv)
    if args.s3 == (args.files is not None):
        parser.error("give exactly one of --files DIR and --s3")
    server: FileServer | S3Server = (S3Server(rate=args.rate) if args.s3
                                     else FileServer(args.files, ranges=not args.no_ranges, rate=args.rate))
    with server:
        print(server.url, flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
