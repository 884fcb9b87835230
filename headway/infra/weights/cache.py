"""The node's weight cache: content-addressed blobs, fetched once per node (single flight).

Layout under `$HEADWAY_CACHE/weights` (default `~/.cache/headway/weights`):

    blobs/<sha256>                 the bytes, named by their sha256, read-only once published
    index/<keyhash>.json           source key (endpoint + URL + ETag/version + size) -> sha256
    locks/<keyhash>.lock           one fetcher per source key across threads and processes
    tmp/<keyhash>.<random>/part    a download in progress: a 0700 directory with an unpredictable name
    dirs/<dirhash>/                model directories assembled from blobs by hard links

Invariants: a blob exists only after its bytes were fully written, fsynced, checked (size,
MD5 when the store gives one, the caller's sha256) and renamed into place, so a crash leaves
at most a private temp directory, which the next holder of that key's lock deletes; nothing
unverified ever has a final name, and no cache directory is group- or world-writable. An index entry is
written after its blob and is used only if that blob exists with the recorded size. Locks are
`flock`s: the kernel drops the lock of a killed process, so a dead fetcher never wedges a key.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from headway.infra.weights.errors import IntegrityError
from headway.infra.weights.ranges import file_digests
from headway.library.cache import cache_root
from headway.library.fileops import atomic_write_text, cache_dir


@dataclass(frozen=True)
class Blob:
    """A published blob and how this call came by it."""

    path: Path
    sha256: str
    size: int
    hit: bool  # True: this call downloaded nothing (cached, or fetched by a concurrent fetcher)
    fetched_bytes: int  # bytes this call downloaded (0 on a hit)
    waited_s: float  # time spent waiting for another fetcher of the same key


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


class NodeCache:
    """Blobs by sha256 plus an index from source keys to blobs, under `root`."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else cache_root() / "weights"
        cache_dir(self.root)
        for sub in ("blobs", "index", "locks", "tmp", "dirs"):
            cache_dir(self.root / sub)

    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256

    @contextmanager
    def lock(self, name: str) -> Iterator[float]:
        """Hold the node-wide lock `name` (a key hash); yields the seconds spent waiting."""
        t = time.perf_counter()
        with FileLock(str(self.root / "locks" / f"{name}.lock")):
            yield time.perf_counter() - t

    def lookup(self, key: str) -> Blob | None:
        """The blob the index maps `key` to, if it is present with its recorded size."""
        try:
            entry = json.loads((self.root / "index" / f"{key_hash(key)}.json").read_text())
            sha, size = str(entry["sha256"]), int(entry["size"])
            if entry.get("key") != key or self.blob_path(sha).stat().st_size != size:
                return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return Blob(self.blob_path(sha), sha, size, True, 0, 0.0)

    def get(self, key: str, size: int, fetch: Callable[[Path], None], *, what: str,
            md5: str | None = None, sha256: str | None = None) -> Blob:
        """The blob for source `key`, calling `fetch(temp_path)` to download it on a miss.

        Single flight: the first caller of a key (in any thread or process on this node)
        fetches; the others wait on the key's lock and then find the published blob."""
        found = self.lookup(key)
        if found is not None and (sha256 is None or found.sha256 == sha256):
            return found
        kh = key_hash(key)
        with self.lock(kh) as waited:
            found = self.lookup(key)
            if found is not None and (sha256 is None or found.sha256 == sha256):
                return Blob(found.path, found.sha256, found.size, True, 0, waited)
            for stale in (self.root / "tmp").glob(f"{kh}.*"):
                shutil.rmtree(stale, ignore_errors=True)  # left by a fetcher that died holding this lock
            private = Path(tempfile.mkdtemp(prefix=f"{kh}.", dir=self.root / "tmp"))   # 0700, unpredictable
            tmp = private / "part"
            try:
                fetch(tmp)
                digest = self._verify(tmp, size, what=what, md5=md5, sha256=sha256)
                blob = self.blob_path(digest)
                if blob.exists() and blob.stat().st_size == size:
                    tmp.unlink()  # the same bytes already came from another source
                else:
                    os.chmod(tmp, 0o444)
                    os.replace(tmp, blob)
            finally:
                shutil.rmtree(private, ignore_errors=True)
            atomic_write_text(self.root / "index" / f"{kh}.json",
                              json.dumps({"key": key, "sha256": digest, "size": size, "fetched_at": time.time()}))
            return Blob(blob, digest, size, False, size, waited)

    def _verify(self, path: Path, size: int, *, what: str, md5: str | None, sha256: str | None) -> str:
        actual_size = path.stat().st_size
        if actual_size != size:
            raise IntegrityError(f"{what}: downloaded {actual_size} bytes, the store lists {size}; nothing was cached")
        digest, got_md5 = file_digests(path, md5=md5 is not None)
        if md5 is not None and got_md5 != md5:
            raise IntegrityError(f"{what}: MD5 of the downloaded bytes is {got_md5}, the store's ETag says "
                                 f"{md5}; the object is corrupt in transit or at rest; nothing was cached")
        if sha256 is not None and digest != sha256.lower():
            raise IntegrityError(f"{what}: sha256 of the downloaded bytes is {digest}, expected {sha256}; "
                                 "nothing was cached")
        return digest
