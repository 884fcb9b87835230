"""Remote bytes are verified before anything has a final name: a download is written inside a
private (0700, unpredictably named) temp directory, checked, and only then renamed into the
content-addressed cache; a tampered object leaves nothing behind, and no cache directory is
writable by other users (even under a permissive umask)."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from headway.infra.weights.cache import NodeCache
from headway.infra.weights.errors import IntegrityError

GOOD = b"the weights the store lists" * 1000
TAMPERED = b"X" + GOOD[1:]


def _everything(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if not p.name.endswith(".lock")]


@pytest.mark.parametrize("kind", ["md5", "size", "sha256"])
def test_tampered_object_leaves_nothing_under_a_final_name(tmp_path: Path, kind: str) -> None:
    old = os.umask(0)                  # the cache must not inherit a permissive umask
    try:
        cache = NodeCache(tmp_path / "weights")
    finally:
        os.umask(old)
    for d in [cache.root, *(cache.root / s for s in ("blobs", "index", "locks", "tmp", "dirs"))]:
        assert stat.S_IMODE(d.stat().st_mode) & 0o022 == 0, d
    good_sha = hashlib.sha256(GOOD).hexdigest()
    seen: list[Path] = []

    def fetch(tmp: Path) -> None:
        seen.append(tmp)
        private = tmp.parent
        assert private.parent == cache.root / "tmp" and stat.S_IMODE(private.stat().st_mode) == 0o700
        tmp.write_bytes(TAMPERED if kind != "size" else GOOD[:-1])
        assert not cache.blob_path(good_sha).exists()

    md5 = hashlib.md5(GOOD).hexdigest() if kind == "md5" else None
    sha = good_sha if kind == "sha256" else None
    with pytest.raises(IntegrityError, match="nothing was cached"):
        cache.get("s3://models/w.bin etag=1", len(GOOD), fetch, what="s3://models/w.bin", md5=md5, sha256=sha)
    assert seen and not seen[0].exists() and not seen[0].parent.exists()
    assert _everything(cache.root / "blobs") == [] and _everything(cache.root / "index") == []
    assert _everything(cache.root / "tmp") == [] and _everything(cache.root / "dirs") == []
    assert cache.lookup("s3://models/w.bin etag=1") is None


def test_two_fetches_get_different_private_directories(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path / "weights")
    dirs: list[Path] = []

    def fetch(tmp: Path) -> None:
        dirs.append(tmp.parent)
        tmp.write_bytes(GOOD)

    blob = cache.get("k1", len(GOOD), fetch, what="k1")
    cache.get("k2", len(GOOD), fetch, what="k2", sha256=blob.sha256)
    assert len(set(dirs)) == 2 and blob.path.read_bytes() == GOOD
    assert stat.S_IMODE(blob.path.stat().st_mode) == 0o444
    assert _everything(cache.root / "tmp") == []


def test_a_world_writable_cache_of_another_user_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from headway.library import fileops

    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, 0o777)
    monkeypatch.setattr(fileops.os, "getuid", lambda: os.stat(d).st_uid + 1)
    with pytest.raises(PermissionError, match="HEADWAY_CACHE"):
        fileops.cache_dir(d)
