"""Shared test fixtures: real server processes on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 15.0) -> bool:
    """Poll `predicate` every 50 ms until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


class ServerProcess:
    """`python -m headway ARGS` as a real process; output captured to a log file."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "headway", *args, "--port", str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_live(self, timeout: float = 30) -> None:
        self._wait("/health/live", timeout)

    def wait_ready(self, timeout: float = 120) -> None:
        self._wait("/health/ready", timeout)

    def _wait(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{path} not OK after {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@contextmanager
def running_server(args: list[str], tmp_path: Path, *, ready: bool = True, env: dict[str, str] | None = None,
                   timeout: float = 120) -> Iterator[ServerProcess]:
    server = ServerProcess(args, tmp_path / f"server-{len(list(tmp_path.glob('server-*.log')))}.log", env)
    try:
        if ready:
            server.wait_ready(timeout)
        else:
            server.wait_live(timeout)
        yield server
    finally:
        server.stop()


def write_package(root: Path, yaml_text: str, model_py: str | None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "headway.yaml").write_text(yaml_text)
    if model_py is not None:
        (root / "model.py").write_text(model_py)
    return root


@pytest.fixture
def server_factory(tmp_path: Path):
    return lambda args, **kw: running_server(args, tmp_path, **kw)
