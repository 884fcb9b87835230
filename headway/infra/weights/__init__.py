"""Weights onto a node, fast and once: S3-compatible and https sources fetched in parallel byte
ranges into a content-addressed node cache with single flight, GGUFs converted once.

Public API: `fetch_source(url)` -> `FetchedModel` (a ready Hugging Face directory and what the
fetch cost), `TransferOptions`, `NodeCache` and the errors below. Lower layers, for callers
that fetch single files: `S3Store`, `HttpStore`, `fetch_file`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from headway.infra.weights.cache import Blob, NodeCache
from headway.infra.weights.errors import (
    AccessDeniedError,
    BadSourceError,
    FetchError,
    IntegrityError,
    SourceNotFoundError,
    TransferError,
)
from headway.infra.weights.fetch import FetchedModel, fetch_file, fetch_source, open_store
from headway.infra.weights.https import HttpStore
from headway.infra.weights.ranges import TransferOptions
from headway.infra.weights.s3 import S3Store


def fetch_for_runtime(source: str) -> tuple[Path, dict[str, Any]]:
    """The fetcher the CLI hands the LLM runtime: (ready directory, facts for /headway/state)."""
    got = fetch_source(source)
    return got.path, got.facts()


__all__ = [
    "fetch_source", "fetch_for_runtime", "fetch_file", "open_store", "FetchedModel", "TransferOptions",
    "NodeCache", "Blob", "S3Store", "HttpStore", "FetchError", "BadSourceError", "SourceNotFoundError",
    "AccessDeniedError", "IntegrityError", "TransferError",
]
