"""Files from https:// (and http://) URLs through httpx, redirects followed.

A probe finds the size and whether byte ranges are served: HEAD first (`Content-Length`,
`Accept-Ranges: bytes`), and when HEAD is refused or says nothing useful, a GET of `bytes=0-0`
(a 206 with `Content-Range: bytes 0-0/SIZE` means ranges work). Ranges are then asked of the
URL the redirects ended at, with `If-Range` on a strong ETag: a server whose file changed
answers 200 with the whole file, which is refused rather than mixed into the parts.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx

from headway.infra.weights.errors import AccessDeniedError, BadSourceError, FetchError, SourceNotFoundError
from headway.infra.weights.remote import RemoteFile

CHUNK = 1 << 20
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


def check_http_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadSourceError(f"'{url}' is not an http(s) URL with a host; expected https://HOST/PATH/model.gguf")
    name = parts.path.rsplit("/", 1)[-1]
    if not name:
        raise BadSourceError(f"'{url}' names no file (its path ends in '/'); an https source is one file, "
                             "e.g. https://HOST/models/model.gguf")
    return name


class HttpStore:
    """Probes and reads http(s) files; thread-safe (one connection pool)."""

    def __init__(self, *, max_connections: int = 16, timeout_s: float = 60.0) -> None:
        self.client = httpx.Client(follow_redirects=True, headers={"Accept-Encoding": "identity"},
                                   timeout=httpx.Timeout(timeout_s, connect=10.0),
                                   limits=httpx.Limits(max_connections=max_connections,
                                                       max_keepalive_connections=max_connections))

    def close(self) -> None:
        self.client.close()

    def files(self, url: str) -> list[RemoteFile]:
        """The one file `url` names."""
        name = check_http_url(url)
        try:
            head = self.client.head(url)
            size, ranged = _length(head), head.headers.get("accept-ranges", "").lower() == "bytes"
            if head.status_code >= 400 or size is None or not ranged:
                with self.client.stream("GET", url, headers={"Range": "bytes=0-0"}) as probe:
                    _raise_final(probe, url)
                    head = probe
                    if probe.status_code == 206:
                        m = _CONTENT_RANGE.match(probe.headers.get("content-range", ""))
                        if m is None or m.group(3) == "*":
                            raise FetchError(f"{url}: the server answered a range with an unusable "
                                             f"Content-Range {probe.headers.get('content-range')!r}")
                        size, ranged = int(m.group(3)), True
                    else:
                        size, ranged = _length(probe), False
        except httpx.HTTPError as exc:
            raise FetchError(f"cannot fetch {url}: {type(exc).__name__}: {exc}") from None
        if size is None:
            raise FetchError(f"{url}: the server gives no Content-Length; a weight file needs a known size")
        final = str(head.url)
        etag = head.headers.get("etag")
        validator = etag or head.headers.get("last-modified") or ""
        return [RemoteFile(url=final, rel=name, size=size, cache_key=f"{url}|{validator}|{size}",
                           etag=etag if etag and not etag.startswith("W/") else None, ranged=ranged)]

    def read(self, f: RemoteFile, start: int, end: int) -> Iterator[bytes]:
        if start >= end:
            return
        headers: dict[str, str] = {}
        if f.ranged:
            headers["Range"] = f"bytes={start}-{end - 1}"
            if f.etag:
                headers["If-Range"] = f.etag
        with self.client.stream("GET", f.url, headers=headers) as resp:
            _raise_final(resp, f.url)
            if resp.status_code >= 500:
                resp.raise_for_status()  # retried by the transfer
            if f.ranged:
                m = _CONTENT_RANGE.match(resp.headers.get("content-range", ""))
                if resp.status_code != 206 or m is None or int(m.group(1)) != start:
                    raise FetchError(f"{f.url}: asked for bytes {start}-{end - 1}, got status {resp.status_code} "
                                     f"{resp.headers.get('content-range', 'without Content-Range')}; the file "
                                     "changed on the server or it stopped serving ranges")
            yield from resp.iter_raw(CHUNK)


def _length(resp: httpx.Response) -> int | None:
    value = resp.headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None


def _raise_final(resp: httpx.Response, url: str) -> None:
    if resp.status_code in (404, 410):
        raise SourceNotFoundError(f"{url}: not found ({resp.status_code}); check the URL")
    if resp.status_code in (401, 403):
        raise AccessDeniedError(f"{url}: access denied ({resp.status_code}); the URL needs credentials "
                                "or a fresh signature")
    if 400 <= resp.status_code < 500 and resp.status_code not in (408, 429):
        raise FetchError(f"{url}: the server refused the request ({resp.status_code})")
