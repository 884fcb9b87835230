"""A package's `requirements:` in a virtual environment of their own, never in the shared interpreter.

One environment per distinct requirement set on a node, under `$HEADWAY_CACHE/venvs/<key>/`,
where key = sha256 of the sorted normalized requirements, the Python version and the interpreter
it extends. It is created with `--system-site-packages` plus a `.pth` that adds this interpreter's
own site-packages (a venv's --system-site-packages alone reaches only the base Python's), so
torch and headway are inherited, not reinstalled; the requirements are then pip-installed into it
with this interpreter's pip (`pip --python`). A node-wide file lock makes concurrent replicas
build it once; the `.headway-ready` marker, written last, says it is complete (a directory
without it is a crashed build, removed and rebuilt under the lock).

`headway serve PACKAGE` re-executes itself with the environment's python (same pid, so a
provider's handle stays valid) when the package has requirements.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

from filelock import FileLock
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from headway.library.cache import cache_root
from headway.library.fileops import cache_dir
from headway.package.load import FieldError, PackageError

log = logging.getLogger("headway.server")
READY = ".headway-ready"
ACTIVE_ENV = "HEADWAY_REQUIREMENTS_VENV"   # set in the re-executed replica: the venv it runs in


def normalize(requirements: list[str]) -> list[str]:
    """Each requirement parsed and written canonically, sorted; a bad one is a field error."""
    out = []
    for spec in requirements:
        try:
            req = Requirement(spec)
        except InvalidRequirement as exc:
            raise PackageError("headway.yaml", [FieldError(
                "requirements", f"'{spec}' is not a pip requirement: {exc}", "requirements: [numpy==2.1.0]")]) from None
        out.append(canonicalize_name(req.name) + str(req)[len(req.name):])
    return sorted(set(out))


def venv_key(requirements: list[str]) -> str:
    """The environment's name: the requirement set, the Python version and the interpreter extended."""
    ident = {"requirements": normalize(requirements), "python": list(sys.version_info[:3]),
             "implementation": sys.implementation.name, "base": sys.prefix}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_venv(requirements: list[str], root: Path | None = None) -> Path:
    """The ready environment for `requirements` (built on first use); returns its directory."""
    venvs = cache_dir((root if root is not None else cache_root()) / "venvs")
    key = venv_key(requirements)
    venv = venvs / key
    if (venv / READY).is_file():
        return venv
    with FileLock(str(venvs / f"{key}.lock")):
        if (venv / READY).is_file():
            return venv
        if venv.exists():
            shutil.rmtree(venv)        # a build that died half way
        log.info("creating a virtual environment for the requirements %s in %s", " ".join(normalize(requirements)),
                 venv)
        try:
            _build(venv, normalize(requirements))
        except BaseException:
            shutil.rmtree(venv, ignore_errors=True)
            raise
    return venv


def _build(venv: Path, requirements: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    os.chmod(venv, 0o755)
    py = venv_python(venv)
    ours = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    inherited = [p for p in site.getsitepackages() if Path(p).is_dir()]
    # processed by the venv's site at start: this interpreter's packages (and their .pth files, e.g. an
    # editable headway) come after the venv's own, so a requirement installed here wins
    Path(ours, "_headway_inherit.pth").write_text(
        "".join(f"import site; site.addsitedir({p!r})\n" for p in inherited))
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--quiet", *requirements],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise PackageError("headway.yaml", [FieldError(
            "requirements", f"pip could not install {' '.join(requirements)} into {venv} (exit {done.returncode}): "
            f"{done.stderr.strip()[-1500:]}", "requirements: [numpy==2.1.0]")])
    (venv / READY).write_text(json.dumps({"requirements": requirements}) + "\n")


def reexec_in_venv(requirements: list[str]) -> None:
    """Run this process again (same argv, same pid) with the python of the requirements' environment;
    returns only when already running in it or when there are no requirements."""
    if not requirements:
        return
    active = os.environ.get(ACTIVE_ENV)
    if active and Path(sys.prefix).resolve() == Path(active).resolve():
        return                          # already re-executed (the key names the interpreter extended, not this one)
    venv = ensure_venv(requirements)
    py = str(venv_python(venv))
    os.environ[ACTIVE_ENV] = str(venv)
    log.info("re-executing with %s for the package's requirements", py)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(py, [py, "-m", "headway", *sys.argv[1:]])
