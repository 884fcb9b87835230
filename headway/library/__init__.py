"""Headway's model library: named, pinned models carried by installable PyPI packages.

Public API: `resolve(name)` -> `ResolvedModel` (a verified, ready-to-load directory in the
cache), the `CATALOG` of entries and the errors below. The CLI lives in `headway.library.cli`.
"""
from __future__ import annotations

from headway.library.catalog import CATALOG, CatalogEntry, get_entry, names
from headway.library.errors import (
    ArtifactMissingError,
    ChecksumMismatchError,
    ConversionError,
    InstallError,
    LibraryError,
    PackageMissingError,
    UnknownModelError,
)
from headway.library.resolve import ResolvedModel, resolve, resolve_entry

__all__ = [
    "CATALOG", "CatalogEntry", "ResolvedModel", "get_entry", "names", "resolve", "resolve_entry",
    "LibraryError", "UnknownModelError", "PackageMissingError", "InstallError",
    "ChecksumMismatchError", "ArtifactMissingError", "ConversionError",
]
