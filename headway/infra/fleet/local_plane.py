"""A control plane as a real `headway up` process on 127.0.0.1, for benchmarks that drive one."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx


@contextmanager
def local_plane(port: int, env: dict[str, str] | None = None, timeout_s: float = 30.0,
                extra: list[str] | None = None) -> Iterator[str]:
    """Start `headway up` with a fresh state directory; yield its URL once it answers; stop it."""
    state = tempfile.mkdtemp(prefix="headway-plane-")
    proc = subprocess.Popen([sys.executable, "-m", "headway", "up", "--port", str(port), "--state-dir", state,
                             "--log-level", "warning", *(extra or [])], env={**os.environ, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"`headway up --port {port}` exited with {proc.returncode} (port taken?)")
            try:
                httpx.get(url + "/health/live", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(60)
