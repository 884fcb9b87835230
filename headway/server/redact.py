"""What of a failed request may be logged: never the payload (DESIGN.md principle 5).

A model's exception message often quotes its input (``ValueError(f"cannot parse {text!r}")``),
so a failed request is logged as the exception's type and where it was raised, innermost frame
first — enough to find the bug — and its message goes only to the caller, in the error answer.
"""

from __future__ import annotations

import traceback
from pathlib import Path


def failure(exc: BaseException, frames: int = 6) -> str:
    """`module.Type at file.py:12 in fn <- caller.py:40 in g` (and the same for its causes),
    without any exception message."""
    parts = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        stack = traceback.extract_tb(current.__traceback__)[-frames:]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in reversed(stack))
        kind = type(current)
        name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        parts.append(f"{name} at {where}" if where else name)
        current = current.__cause__ or current.__context__
    return "; caused by ".join(parts)
