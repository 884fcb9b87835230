"""Where a deployment's package may come from: code runs only where its owner put it.

A deployment spec's `package` is one of
- a model-library name (`smollm2-135m-instruct`): pinned, hash-checked weights, no package code;
- a remote weights source (`s3://BUCKET/PREFIX/`, `https://HOST/m.gguf`): weights only; the
  replica builds an `llm` package around it and never runs code from the source;
- a directory (its `headway.yaml` and `model.py` run in a replica) that resolves, after symlinks
  and `..`, under one of the package roots the operator allowed with `headway up --package-root`.

Anything else is refused with the package, the allowed roots and how to allow it. The check
runs when a spec is accepted and again when each replica starts (a symlink may have been
swapped since); the replica is then given the resolved directory, not the name it was sent.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

REMOTE_SCHEMES = ("s3", "https")


class PackageNotAllowed(ValueError):
    """A spec's package is outside every allowed place (the control API answers 400)."""


def normalize_roots(roots: Sequence[str | os.PathLike[str]]) -> tuple[Path, ...]:
    """Each root made absolute with symlinks resolved; a root that is not a directory is an error."""
    out: list[Path] = []
    for r in roots:
        p = Path(os.path.realpath(os.path.expanduser(os.fspath(r))))
        if not p.is_dir():
            raise ValueError(f"package root {os.fspath(r)!r} is not a directory; pass an existing directory, "
                             "e.g. --package-root /srv/models")
        out.append(p)
    return tuple(out)


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _is_library_name(name: str) -> bool:
    from headway.library.catalog import names

    return name in names()


def _describe(roots: Sequence[Path]) -> str:
    return ", ".join(str(r) for r in roots) if roots else "none"


def allowed_package(package: str, roots: Sequence[Path]) -> str:
    """`package` as a replica should be given it (a directory: its resolved path), or
    PackageNotAllowed saying what was wrong, what is allowed and how to allow it."""
    if "://" in package:
        scheme = package.split("://", 1)[0].lower()
        if scheme in REMOTE_SCHEMES:
            return package
        raise PackageNotAllowed(f"package '{package}': the scheme '{scheme}://' is not a remote weights source; "
                                f"allowed: {', '.join(s + '://' for s in REMOTE_SCHEMES)} (weights only), e.g. "
                                "s3://models/llama-3-8b/")
    if _is_library_name(package):
        return package
    raw = Path(os.path.expanduser(package))
    if not raw.is_absolute():
        raise PackageNotAllowed(f"package '{package}' is neither a model-library name (`headway library list`), "
                                "a remote weights source (s3://BUCKET/PREFIX/, https://HOST/m.gguf) nor an absolute "
                                "package directory; e.g. package: smollm2-135m-instruct")
    resolved = Path(os.path.realpath(raw))
    if resolved.name == "headway.yaml":
        resolved = resolved.parent
    for root in roots:
        if _under(resolved, root):
            return str(resolved)
    where = f" (it resolves to {resolved})" if str(resolved) != package.rstrip("/") else ""
    raise PackageNotAllowed(
        f"package '{package}'{where} is not under an allowed package root (allowed: {_describe(roots)}); a package "
        f"directory runs its own code, so the control plane serves only directories its operator allowed. Start "
        f"it with `headway up --package-root {resolved.parent}` (repeatable) to allow it, or deploy a model-library "
        "name (e.g. smollm2-135m-instruct) or a remote weights source (s3://BUCKET/PREFIX/)")
