"""`fetch_source(url)`: a remote model source -> a ready Hugging Face directory on this node.

s3://BUCKET/PREFIX/ (a model directory: config.json + *.safetensors + tokenizer files, or one
.gguf), s3://BUCKET/KEY.gguf and https://HOST/PATH.gguf. Every file goes through the node cache
(downloaded once per node, in parallel byte ranges), the files are assembled into a directory
of hard links to their blobs, and a GGUF is converted once into the library's cache.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from headway.infra.weights.cache import Blob, NodeCache, key_hash
from headway.infra.weights.converted import converted_dir
from headway.infra.weights.errors import BadSourceError, FetchError
from headway.infra.weights.https import HttpStore
from headway.infra.weights.ranges import TransferOptions, download
from headway.infra.weights.remote import RemoteFile, Store
from headway.infra.weights.s3 import S3Store

DIR_MANIFEST = ".headway-fetched.json"


@dataclass(frozen=True)
class FetchedModel:
    """A remote source on local disk, and what getting it cost."""

    source: str
    path: Path  # a Hugging Face model directory
    files: int
    total_bytes: int
    fetched_bytes: int  # downloaded by this call (0: every file came from the node cache)
    fetch_s: float  # listing + downloading + verifying (+ waiting for another fetcher of a file)
    convert_s: float = 0.0  # GGUF -> HF conversion by this call (0 when already converted)
    blobs: tuple[Blob, ...] = field(default=(), repr=False)

    @property
    def cache_hit(self) -> bool:
        return self.fetched_bytes == 0

    def facts(self) -> dict[str, Any]:
        """The figures a replica reports in /headway/state's startup block."""
        return {"source": self.source, "files": self.files, "total_bytes": self.total_bytes,
                "fetched_bytes": self.fetched_bytes, "cache_hit": self.cache_hit,
                "fetch_s": round(self.fetch_s, 3), "convert_s": round(self.convert_s, 3),
                "lock_wait_s": round(sum(b.waited_s for b in self.blobs), 3)}


def open_store(url: str, *, endpoint_url: str | None = None, max_connections: int = 16) -> Store:
    """The store for `url`'s scheme."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "s3":
        return S3Store(endpoint_url, max_connections=max_connections)
    if scheme in ("http", "https"):
        return HttpStore(max_connections=max_connections)
    raise BadSourceError(f"'{url}' is not a remote source; allowed: s3://BUCKET/PREFIX/, s3://BUCKET/KEY.gguf, "
                         "https://HOST/PATH.gguf")


def fetch_file(store: Store, f: RemoteFile, cache: NodeCache, options: TransferOptions,
               sha256: str | None = None) -> Blob:
    """One remote file into the node cache (downloaded at most once per node)."""
    return cache.get(f.cache_key, f.size, lambda tmp: download(tmp, f.size, lambda a, b: store.read(f, a, b),
                                                                 options, what=f.url, ranged=f.ranged),
                     what=f.url, md5=f.md5, sha256=sha256)


def fetch_source(source: str, *, cache_dir: Path | None = None, options: TransferOptions | None = None,
                 endpoint_url: str | None = None) -> FetchedModel:
    """Fetch `source` onto this node and return its ready directory (see the module doc).

    cache_dir: overrides `$HEADWAY_CACHE`; options: part size, streams, retries, progress;
    endpoint_url: the S3 endpoint (default: `AWS_ENDPOINT_URL`)."""
    options = options or TransferOptions()
    cache = NodeCache(cache_dir / "weights" if cache_dir is not None else None)
    t = time.perf_counter()
    store = open_store(source, endpoint_url=endpoint_url, max_connections=options.concurrency + 2)
    try:
        remote = store.files(source)
        for f in remote:
            _check_rel(source, f.rel)
        blobs = tuple(fetch_file(store, f, cache, options) for f in remote)
    finally:
        close = getattr(store, "close", None)
        if close is not None:
            close()
    directory = _assemble(cache, [(f.rel, b) for f, b in zip(remote, blobs)])
    fetch_s = time.perf_counter() - t
    fetched = sum(b.fetched_bytes for b in blobs)
    total = sum(b.size for b in blobs)
    names = sorted(f.rel for f in remote)
    if (directory / "config.json").is_file():
        path, convert_s = directory, 0.0
    else:
        ggufs = [n for n in names if n.endswith(".gguf")]
        if len(ggufs) != 1:
            raise FetchError(f"{source} holds neither a model directory (config.json + *.safetensors + "
                             f"tokenizer.json) nor exactly one .gguf file; found: {', '.join(names[:12])}")
        gguf_blob = blobs[[f.rel for f in remote].index(ggufs[0])]
        t = time.perf_counter()
        path, already = converted_dir(directory / ggufs[0], gguf_blob.sha256, cache_dir=cache_dir,
                                      progress=options.show_bar())
        convert_s = 0.0 if already else time.perf_counter() - t
    return FetchedModel(source=source, path=path, files=len(remote), total_bytes=total, fetched_bytes=fetched,
                        fetch_s=fetch_s, convert_s=convert_s, blobs=blobs)


def _check_rel(source: str, rel: str) -> None:
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or ".." in p.parts:
        raise BadSourceError(f"{source}: object name {rel!r} cannot be placed inside a model directory")


def _assemble(cache: NodeCache, files: list[tuple[str, Blob]]) -> Path:
    """A directory of hard links named `rel` to each blob, published once by rename."""
    listing = {rel: blob.sha256 for rel, blob in sorted(files)}
    dh = key_hash(json.dumps(listing, sort_keys=True))
    final = cache.root / "dirs" / dh
    if _complete(final, listing):
        return final
    with cache.lock(f"dir-{dh}"):
        if _complete(final, listing):
            return final
        for stale in (cache.root / "dirs").glob(f".tmp-{dh}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        build = Path(tempfile.mkdtemp(prefix=f".tmp-{dh}-", dir=cache.root / "dirs"))   # 0700 until published
        try:
            for rel, blob in files:
                (build / rel).parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(blob.path, build / rel)
                except OSError:  # a file system without hard links
                    os.symlink(blob.path, build / rel)
            (build / DIR_MANIFEST).write_text(json.dumps(listing, indent=1, sort_keys=True))
            for sub in [build, *(p for p in build.rglob("*") if p.is_dir() and not p.is_symlink())]:
                os.chmod(sub, 0o755)
            if final.exists():  # damaged: replaced under the lock
                shutil.rmtree(final)
            os.rename(build, final)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
    return final


def _complete(directory: Path, listing: dict[str, str]) -> bool:
    try:
        if json.loads((directory / DIR_MANIFEST).read_text()) != listing:
            return False
    except (OSError, ValueError):
        return False
    return all((directory / rel).is_file() for rel in listing)


def main(argv: list[str] | None = None) -> int:
    """`python -m headway.infra.weights URL`: fetch a source and print where it is."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m headway.infra.weights s3://BUCKET/PREFIX/ | https://HOST/m.gguf", file=sys.stderr)
        return 2
    try:
        got = fetch_source(args[0])
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"path": str(got.path), **got.facts()}))
    return 0

