"""Device and dtype choice: `auto` picks the dtype that is faster on this device, measured."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _machine_key(device: str) -> str:
    """What the probe's answer depends on: the CPU model and its core count, and torch's version."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor()
    raw = f"{device}|{cpu}|{os.cpu_count()}|{torch.get_num_threads()}|{torch.__version__}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=4)
def _faster_dtype(device: str) -> torch.dtype:
    """The faster of float32 and bfloat16 on `device`: measured once per machine, then remembered
    in the node's cache (the probe took 0.3-2 s of every replica's cold start)."""
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    from headway.library.cache import cache_root
    from headway.library.fileops import atomic_write_text

    memo = cache_root() / "probes" / f"dtype-{_machine_key(device)}.json"
    try:
        return DTYPES[json.loads(memo.read_text())["dtype"]]
    except (OSError, ValueError, KeyError):
        pass
    chosen = _probe_dtype(device)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(memo, json.dumps({"dtype": str(chosen).removeprefix("torch.")}))
    except OSError:
        pass   # a read-only cache: probe again next time
    return chosen


def _probe_dtype(device: str) -> torch.dtype:
    """Time a decode-shaped GEMM in float32 and bfloat16 on `device`; return the faster."""
    # decode- and prefill-shaped GEMMs, the two dtypes interleaved so a change in machine load
    # during the probe hits both alike; the best of several rounds each
    shapes = [(32, 576, 1536), (256, 576, 1536)]
    mats = {dt: [(torch.randn(m, k, dtype=dt, device=device), torch.randn(k, n, dtype=dt, device=device))
                 for m, k, n in shapes] for dt in (torch.float32, torch.bfloat16)}
    timings = {dt: float("inf") for dt in mats}
    for _ in range(6):
        for dt, pairs in mats.items():
            t0 = time.perf_counter()
            for a, b in pairs:
                for _ in range(4):
                    a @ b
            timings[dt] = min(timings[dt], time.perf_counter() - t0)
    # bfloat16 must be clearly faster to be worth its precision cost
    return torch.bfloat16 if timings[torch.bfloat16] < 0.8 * timings[torch.float32] else torch.float32


def choose_dtype(name: str, device: torch.device | str) -> torch.dtype:
    if name == "auto":
        return _faster_dtype(str(device))
    if name not in DTYPES:
        raise ValueError(f"dtype '{name}' is not supported; use auto, float32 or bfloat16")
    return DTYPES[name]
