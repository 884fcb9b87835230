"""Support for router tests (no tests here): real replica and router processes on 127.0.0.1, on chosen ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import EXAMPLES, ROOT, free_port

# A replica that speaks the state contract and echoes WebSocket frames (the custom runtime has no
# WebSocket route of its own), for the router's WebSocket pass-through.
WS_REPLICA = '''
import sys
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute

async def state(request):
    return JSONResponse({"ready": True, "runtime": "custom", "model": "echo-ws", "in_flight": 0, "queued": 0,
                         "max_concurrency": 4})

async def echo(ws):
    await ws.accept()
    try:
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            if msg.get("text") == "close":
                await ws.close(1000)
                return
            if msg.get("text") is not None:
                await ws.send_text("echo:" + msg["text"])
            else:
                await ws.send_bytes(b"echo:" + msg["bytes"])
    except Exception:
        return

async def predict(request):
    return JSONResponse({"echo": (await request.json())})

app = Starlette(routes=[Route("/headway/state", state), Route("/health/ready", state),
                        Route("/v1/models/echo-ws:predict", predict, methods=["POST"]),
                        WebSocketRoute("/v1/models/echo-ws/ws", echo)])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
'''


class Proc:
    """A process serving HTTP on `port`; `args` run under the project's Python."""

    def __init__(self, args: list[str], log_path: Path, port: int | None = None):
        self.args = args
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        log = open(self.log_path, "ab")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, *[a.replace("{port}", str(self.port)) for a in self.args]],
                                     stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        log.close()

    def wait(self, path: str = "/health/ready", timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.args} exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.url}{path} not OK after {timeout} s:\n{self.log_path.read_text()}")

    def kill(self) -> None:
        """SIGKILL: no cleanup, connections die as they are."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def replica(example: str, tmp: Path, port: int | None = None) -> Proc:
    return Proc(["-m", "headway", "serve", str(EXAMPLES / example), "--port", "{port}"],
                tmp / f"replica-{example}-{time.monotonic_ns()}.log", port)


def ws_replica(tmp: Path) -> Proc:
    script = tmp / "ws_replica.py"
    script.write_text(WS_REPLICA)
    return Proc([str(script), "{port}"], tmp / "ws-replica.log")


def router(replicas: list[Proc], tmp: Path, *extra: str, grpc_port: int | None = None) -> Proc:
    args = ["-m", "headway.infra.router.cli", "--port", "{port}", "--health-interval", "0.2", "--log-level", "warning"]
    for r in replicas:
        args += ["--replica", r.url]
    if grpc_port is not None:
        args += ["--grpc-port", str(grpc_port)]
    return Proc([*args, *extra], tmp / f"router-{time.monotonic_ns()}.log")


def sse_events(text: str) -> list[tuple[str, str]]:
    """(event, data) pairs of an SSE body."""
    out = []
    for raw in text.split("\n\n"):
        if not raw.strip():
            continue
        event, data = "", []
        for line in raw.split("\n"):
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        out.append((event, "\n".join(data)))
    return out
