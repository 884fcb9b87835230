"""Where POST /v1/load_lora_adapter may read adapters from: the adapter roots the operator
configured (`headway serve --lora-root DIR`, repeatable, or `engine.lora_roots` in headway.yaml).

Adapters named at start (`--lora NAME=PATH`, `engine.lora_adapters`) were named by the operator
and need no root. A path sent at run time is resolved (symlinks and `..`) before it is checked,
and the adapter is then read from the resolved path; with no roots, loading from a path at run
time is refused with a message saying how to allow it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from headway.runtime.llm.lora.adapter import AdapterError


def resolve_roots(roots: Sequence[str | os.PathLike[str]], base: Path | None = None) -> tuple[Path, ...]:
    """Each root absolute (relative ones against `base`, the package directory) and symlink-free."""
    out = []
    for r in roots:
        p = Path(os.path.expanduser(os.fspath(r)))
        if not p.is_absolute() and base is not None:
            p = base / p
        out.append(Path(os.path.realpath(p)))
    return tuple(out)


def allowed_adapter_path(path: str, roots: Sequence[Path]) -> str:
    """The resolved adapter directory if it lies under one of `roots`; AdapterError (403) if not."""
    resolved = Path(os.path.realpath(os.path.expanduser(path)))
    if not roots:
        raise AdapterError(
            f"loading LoRA adapters from a path at run time is off on this server (lora_path {path!r}); allow a "
            "directory with `headway serve --lora-root /srv/adapters` (repeatable) or engine.lora_roots in "
            "headway.yaml, or name the adapter at start with --lora NAME=PATH", 403)
    if any(resolved == r or r in resolved.parents for r in roots):
        return str(resolved)
    shown = f" (it resolves to {resolved})" if str(resolved) != path.rstrip("/") else ""
    raise AdapterError(
        f"lora_path {path!r}{shown} is outside the adapter roots ({', '.join(str(r) for r in roots)}); put the "
        "adapter under one of them, or start the server with another --lora-root DIR", 403)
