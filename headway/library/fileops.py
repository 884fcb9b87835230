"""Byte-level file work for the library: streamed concatenation, sha256, verification stamps.

Nothing here holds a whole file in memory: files move in 8 MiB blocks. A verification stamp
records that the file at (path, size, mtime_ns) hashed to a digest, so a verified 1.5 GB file
is not rehashed on every load; any change of size or mtime invalidates the stamp.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

BLOCK = 8 << 20


@contextmanager
def _bar(total: int, desc: str, progress: bool) -> Iterator[tqdm]:
    bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
               disable=not progress, file=sys.stderr, leave=False)
    try:
        yield bar
    finally:
        bar.close()


def sha256_file(path: Path, *, progress: bool = False, desc: str | None = None) -> str:
    """The hex sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with _bar(path.stat().st_size, desc or f"hash {path.name}", progress) as bar, path.open("rb") as f:
        while block := f.read(BLOCK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def concat_files(parts: Sequence[Path], dest: Path, *, progress: bool = False,
                 desc: str | None = None) -> str:
    """Write `parts` in order into `dest` (streamed) and return the sha256 of what was written."""
    digest = hashlib.sha256()
    total = sum(p.stat().st_size for p in parts)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _bar(total, desc or f"assemble {dest.name}", progress) as bar, dest.open("wb") as out:
        for part in parts:
            with part.open("rb") as f:
                while block := f.read(BLOCK):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def copy_file(src: Path, dest: Path) -> None:
    """Copy `src` to `dest` (a copy, never a hard link: editing the cache must not be able to
    change an installed package's file)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temp file and a rename (readers never see half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class StampStore:
    """Verification stamps, one small JSON file per verified path, under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _stamp_path(self, path: Path) -> Path:
        key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
        return self.root / f"{key}.json"

    def lookup(self, path: Path) -> str | None:
        """The digest stamped for `path`, if its stamp still matches its size and mtime."""
        try:
            data = json.loads(self._stamp_path(path).read_text())
            st = path.stat()
        except (OSError, ValueError):
            return None
        if (data.get("path") == str(path.resolve()) and data.get("size") == st.st_size
                and data.get("mtime_ns") == st.st_mtime_ns):
            digest = data.get("sha256")
            return digest if isinstance(digest, str) else None
        return None

    def record(self, path: Path, digest: str) -> None:
        st = path.stat()
        payload = {"path": str(path.resolve()), "size": st.st_size,
                   "mtime_ns": st.st_mtime_ns, "sha256": digest}
        atomic_write_text(self._stamp_path(path), json.dumps(payload))

    def digest(self, path: Path, *, progress: bool = False) -> tuple[str, bool]:
        """(sha256 of `path`, whether it came from a stamp); hashes and stamps on a miss."""
        stamped = self.lookup(path)
        if stamped is not None:
            return stamped, True
        digest = sha256_file(path, progress=progress)
        self.record(path, digest)
        return digest, False


def cache_dir(path: Path) -> Path:
    """`path` made (with parents) as a cache directory nobody else can write into: created 0755,
    group/world write taken away when this user owns it; a directory another user owns that anyone
    may write into is refused (a planted file could then take a final name in it)."""
    path.mkdir(mode=0o755, parents=True, exist_ok=True)
    st = os.stat(path)
    if st.st_uid == os.getuid():
        if st.st_mode & 0o022:
            os.chmod(path, st.st_mode & 0o7755)
    elif st.st_mode & 0o002:
        raise PermissionError(f"cache directory {path} is writable by every user and owned by another; point "
                              "$HEADWAY_CACHE at a directory only you can write, e.g. ~/.cache/headway")
    return path
