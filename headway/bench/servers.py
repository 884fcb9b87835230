"""Waiting for a server a benchmark started: ready, exited, or timed out, with the reason."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import httpx


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float, why: Callable[[], str] = lambda: "",
               interval: float = 0.2) -> None:
    """Poll ``url`` (a full readiness URL) until it answers 200. Raises ``RuntimeError`` when
    ``proc`` exits first and ``TimeoutError`` after ``timeout`` s (killing and reaping ``proc``); ``why()``
    adds what the caller knows (its log) to either message."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with {proc.returncode}: {why()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(interval)
    proc.kill()
    proc.wait(timeout=30)  # reaped, not left a zombie
    raise TimeoutError(f"{url} was not ready after {timeout:g} s: {why()}")
