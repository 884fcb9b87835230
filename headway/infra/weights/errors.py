"""Errors raised while fetching weights; each message names the source and says what to do."""
from __future__ import annotations


class FetchError(Exception):
    """Base class: a weight source could not be fetched onto this node."""


class BadSourceError(FetchError, ValueError):
    """A source string that is not a fetchable URL (wrong scheme, no bucket, no host)."""


class SourceNotFoundError(FetchError):
    """The endpoint answered, but the bucket, object, prefix or URL does not exist."""


class AccessDeniedError(FetchError):
    """The endpoint refused the credentials (or their absence)."""


class IntegrityError(FetchError):
    """Downloaded bytes do not match the source's size, ETag/MD5 or the sha256 asked for."""


class TransferError(FetchError):
    """A byte range still failed after every retry (connection reset, 5xx, short body)."""
