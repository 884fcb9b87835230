"""A fetched GGUF converted once into a Hugging Face directory, in the library's cache.

The conversion is keyed by the GGUF's sha256 (entry name `gguf`), so one GGUF converts once per
node whatever URL it came from; the library's `EntryCache` gives the lock, the temp build
directory and the manifest-last atomic publish.
"""
from __future__ import annotations

import time
import uuid
from pathlib import Path

from headway.library.cache import MODEL_SUBDIR, EntryCache
from headway.library.catalog import ArtifactFile, CatalogEntry


def converted_dir(gguf: Path, sha256: str, *, cache_dir: Path | None = None,
                  progress: bool = False) -> tuple[Path, bool]:
    """(the HF directory converted from `gguf`, whether it was already converted)."""
    entry = CatalogEntry(name="gguf", runtime="llm", description=f"converted from {gguf.name}",
                         license="unknown", packages=(),
                         files=(ArtifactFile(gguf.name, (), sha256, gguf.stat().st_size),),
                         convert="gguf-to-hf", gguf_file=gguf.name)
    cache = EntryCache(entry, cache_dir)
    if cache.load() is not None:
        return cache.model_dir, True
    with cache.lock():
        if cache.load() is not None:
            return cache.model_dir, True
        cache.clean_stale()
        build = cache.new_build_dir()
        from headway.library.convert import convert_gguf_to_hf

        t = time.perf_counter()
        convert_gguf_to_hf(gguf, build / MODEL_SUBDIR, model_name=gguf.stem, progress=progress)
        cache.write_manifest(build, {"runtime": "llm", "layout": "hf", "convert": "gguf-to-hf",
                                     "build_id": uuid.uuid4().hex, "built_at": time.time(),
                                     "sources": [str(gguf)], "gguf_file": str(gguf),
                                     "build_timings": {"convert_s": time.perf_counter() - t}})
        cache.publish(build)
    return cache.model_dir, False
