"""What a runtime needs to know of the host it loads on: its CPU share and where a model lives.

Shared by the modality runtimes (and the benchmarks' baselines) so each sizes its threads and
finds its model the same way.
"""

from __future__ import annotations

import os
from pathlib import Path


def cpu_share() -> int:
    """CPUs this replica may use: OMP_NUM_THREADS when set (the fleet sets it from the
    deployment's `resources.cpu`), else the process's CPU affinity, capped by a cgroup v2 quota."""
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def local_or_library(source: str, package_root: Path) -> Path:
    """A model directory: `source` relative to the package (or absolute, or file://), if it is
    one; else a model-library name, resolved (installed and converted once) by the library."""
    local = package_root / Path(source.removeprefix("file://")).expanduser()
    if local.is_dir():
        return local
    from headway.library import resolve

    return resolve(source).path
