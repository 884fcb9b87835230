"""What a runtime needs to know of the host it loads on: its CPU share.

Shared by the modality runtimes (and the benchmarks' baselines) so each sizes its threads the
same way. Where a model lives (a local directory or a library name) is
`headway.tokenization.model_dir`, which the router uses too.
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
