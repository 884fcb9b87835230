"""The layers point one way: every import in headway/ is parsed (with `ast`, nothing imported)
and each edge that breaks the rules below fails the test, listed as file:line.

- `headway.runtime` (engines and their HTTP apps) imports none of `headway.server`,
  `headway.infra`, `headway.cli`, `headway.bench`.
- `headway.infra` (router, autoscaler, fleet, weights) imports none of `headway.bench`,
  `headway.cli`, `headway.runtime.llm` (the router tokenizes through `headway.tokenization`).
- `headway.server` may import `headway.runtime`, never `headway.cli` or `headway.bench`.
- Neutral top-level modules (`headway/digest.py`, `headway/wire.py`, `headway/tokenization.py`,
  ...; not `headway/__main__.py`, the CLI's entry point) import none of those layers: anyone may
  import them.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "headway"

LAYERS = ("runtime", "server", "infra", "cli", "bench")
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "headway.runtime": ("headway.server", "headway.infra", "headway.cli", "headway.bench"),
    "headway.infra": ("headway.bench", "headway.cli", "headway.runtime.llm"),
    "headway.server": ("headway.cli", "headway.bench"),
}
NEUTRAL_FORBIDDEN = tuple(f"headway.{layer}" for layer in LAYERS)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(source: str, name: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the source of module `name`, relative imports
    resolved; also imports inside functions and under TYPE_CHECKING (a lazy import is still an edge)."""
    package = name.split(".") if is_package else name.split(".")[:-1]
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            # `from headway import cli` names a module through its alias
            out.extend((node.lineno, f"{target}.{alias.name}") for alias in node.names
                       if target == "headway" and alias.name in LAYERS)
    return out


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def forbidden_for(module: str) -> tuple[str, ...]:
    for owner, banned in FORBIDDEN.items():
        if within(module, owner):
            return banned
    if module == "headway.__main__":
        return ()                    # `python -m headway`: the CLI's entry point
    if module.count(".") == 1 and (PACKAGE / f"{module.split('.')[1]}.py").exists():
        return NEUTRAL_FORBIDDEN     # a top-level module: neutral
    return ()


def violations() -> list[str]:
    bad: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = module_name(path)
        banned = forbidden_for(source)
        for line, target in imports(path.read_text(encoding="utf-8"), source, path.name == "__init__.py"):
            hit = next((b for b in banned if within(target, b)), None)
            if hit is not None:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {source} imports {target} ({hit} is off limits)")
    return bad


def test_layers_point_one_way() -> None:
    bad = violations()
    assert not bad, "imports against the layering rules:\n" + "\n".join(bad)


def test_the_check_sees_every_kind_of_forbidden_edge() -> None:
    """The rule catches what it must: absolute, relative, lazy and TYPE_CHECKING imports, and a
    layer imported by name from the package; allowed edges stay allowed."""
    cases = {
        "headway.runtime.llm.x": "from headway.server.app import create_app\n",
        "headway.runtime.y": "def f():\n    from ..cli import main\n",
        "headway.infra.router.z": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                  "    import headway.runtime.llm.engine\n",
        "headway.infra.w": "from headway import bench\n",
        "headway.server.v": "from headway.runtime.base import Runtime\nfrom headway.wire import ClientGone\n",
        "headway.infra.router.u": "from headway.tokenization import ModelTokenizer\nfrom . import types\n",
    }
    found = [(name, line) for name, text in cases.items() for line, target in imports(text, name)
             if any(within(target, b) for b in forbidden_for(name))]
    assert found == [("headway.runtime.llm.x", 1), ("headway.runtime.y", 2), ("headway.infra.router.z", 3),
                     ("headway.infra.w", 1)], found
    assert imports("from . import types\n", "headway.infra.router.u") == [(1, "headway.infra.router")]
    assert imports("from .. import x\n", "headway.infra", is_package=True) == [(1, "headway")]
    assert forbidden_for("headway.wire") == NEUTRAL_FORBIDDEN
    assert forbidden_for("headway.tokenization") == NEUTRAL_FORBIDDEN
