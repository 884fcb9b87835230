"""The library's on-disk cache: one directory per entry, published atomically, built once.

Layout under `$HEADWAY_CACHE` (default `~/.cache/headway`):

    library/<name>-<digest12>/            a published entry (never written in place)
        model/                            the ready-to-load directory
        source/<file>                     assembled multi-part files that are not in model/
        headway-library.json              the manifest, written last inside the temp dir
    library/.tmp-<name>-<digest12>-<id>/  an entry being built (renamed into place when done)
    library/.locks/<name>-<digest12>.lock a file lock: one builder per entry across processes
    library/.stamps/                      verification stamps (see fileops.StampStore)

Invariants: an entry directory is used only if its manifest names the same entry, digest and
format version and every file the manifest lists exists with its recorded size; anything else
at that path (a half-written or damaged directory) is ignored and replaced under the lock.
Temp directories of an entry are only touched by the process holding that entry's lock.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock

from headway.library.catalog import CatalogEntry
from headway.library.fileops import StampStore, atomic_write_text, cache_dir

FORMAT_VERSION = 1
MANIFEST = "headway-library.json"
MODEL_SUBDIR = "model"
SOURCE_SUBDIR = "source"


def cache_root() -> Path:
    """`$HEADWAY_CACHE` if set, else `~/.cache/headway`."""
    env = os.environ.get("HEADWAY_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "headway"


def list_files(root: Path) -> dict[str, int]:
    """Relative path -> size of every regular file under `root`."""
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


class EntryCache:
    """The cache directory, lock and manifest of one catalog entry."""

    def __init__(self, entry: CatalogEntry, root: Path | None = None) -> None:
        self.entry = entry
        self.root = (root if root is not None else cache_root()) / "library"
        self.key = f"{entry.name}-{entry.digest[:12]}"
        self.final_dir = self.root / self.key
        self.stamps = StampStore(self.root / ".stamps")

    @property
    def model_dir(self) -> Path:
        return self.final_dir / MODEL_SUBDIR

    def load(self) -> dict[str, Any] | None:
        """The manifest of a complete, valid published entry, or None. Cheap: a JSON read and
        one stat per listed file; no hashing, no heavy imports."""
        try:
            manifest = json.loads((self.final_dir / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(manifest, dict) or (
            manifest.get("format_version") != FORMAT_VERSION
            or manifest.get("name") != self.entry.name
            or manifest.get("sha256") != self.entry.digest
        ):
            return None
        files = manifest.get("files")
        if not isinstance(files, dict) or not files:
            return None
        for rel, size in files.items():
            try:
                if (self.final_dir / rel).stat().st_size != size:
                    return None
            except OSError:
                return None
        return manifest

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold this entry's cross-process build lock."""
        lock_path = self.root / ".locks" / f"{self.key}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(lock_path)):
            yield

    def new_build_dir(self) -> Path:
        """A fresh temp directory for building this entry (call under the lock)."""
        cache_dir(self.root)
        return Path(tempfile.mkdtemp(prefix=f".tmp-{self.key}-", dir=self.root))   # 0700, unpredictable

    def clean_stale(self) -> list[Path]:
        """Remove temp dirs left by builders that died (call under the lock)."""
        stale = sorted(self.root.glob(f".tmp-{self.key}-*"))
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return stale

    def write_manifest(self, build_dir: Path, manifest: dict[str, Any]) -> None:
        """Record every file of the build (sizes) and write the manifest, last, into it."""
        full = dict(manifest, format_version=FORMAT_VERSION, name=self.entry.name,
                    sha256=self.entry.digest, files=list_files(build_dir))
        atomic_write_text(build_dir / MANIFEST, json.dumps(full, indent=2, sort_keys=True))

    def publish(self, build_dir: Path) -> None:
        """Flush a finished build to disk and move it into place, replacing an invalid
        directory (under the lock). After the rename the entry is complete or absent."""
        for path in build_dir.rglob("*"):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        if self.final_dir.exists():
            trash = self.root / f".tmp-{self.key}-trash-{uuid.uuid4().hex[:12]}"
            os.rename(self.final_dir, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.chmod(build_dir, 0o755)   # readable once complete; never writable by others
        os.rename(build_dir, self.final_dir)
