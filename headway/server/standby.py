"""A standby replica process: an interpreter that has already imported what every replica needs
(torch, the engine, the server) and waits on stdin for the `headway serve` arguments of the
replica it will become. It sits next to the server: it runs `headway serve` (headway.server.cli)
and imports nothing of the CLI or the fleet.

Importing torch and the server is a second or more of every cold start; the local provider keeps
one standby ready and hands the next replica to it, then starts another. The first line on stdin
is JSON: {"argv": [...], "env": {...}, "log": PATH}. The process then writes its output to PATH,
takes the environment and its thread count, and runs `headway ARGV` (always `serve ...`) as if
started with it.

A standby dies with the control plane that started it (its pid is the first argument): on Linux
the kernel sends it SIGKILL when that parent dies (PR_SET_PDEATHSIG), and everywhere a watchdog
thread exits once its parent pid changes (reparented) or its stdin closes. Both are switched off
the moment it becomes a replica: replicas outlive their control plane, a standby does not.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading

_PR_SET_PDEATHSIG = 1
_handed_off = threading.Event()


def _set_parent_death_signal(sig: int) -> bool:
    """prctl(PR_SET_PDEATHSIG, sig) on Linux (0 clears it); False where there is no prctl."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int, poll_s: float = 0.2) -> None:
    while not _handed_off.wait(poll_s):
        if os.getppid() != parent:
            os._exit(0)           # the control plane is gone and nobody will hand this standby a replica


def die_with_parent(parent: int) -> None:
    """From now until `become_replica()`, this process ends when `parent` does."""
    _set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:    # it died before the signal was armed
        os._exit(0)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="standby-parent-watch").start()


def become_replica() -> None:
    _handed_off.set()
    _set_parent_death_signal(0)


def _preload() -> None:
    import torch  # noqa: F401
    import uvicorn.lifespan.on
    import uvicorn.protocols.http.h11_impl
    import uvicorn.protocols.http.httptools_impl  # noqa: F401

    import headway.infra.weights
    import headway.library
    import headway.runtime.llm.engine
    import headway.runtime.llm.openai_api
    import headway.runtime.llm.serving
    import headway.server.app
    import headway.server.cli  # noqa: F401


def main() -> None:
    if len(sys.argv) > 1:
        die_with_parent(int(sys.argv[1]))
    _preload()
    line = sys.stdin.readline()
    if not line:
        return                        # the provider went away without using this standby
    become_replica()
    order = json.loads(line)
    fd = os.open(order["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.update(order["env"])
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    from headway.server.cli import run_serve

    argv = order["argv"]
    if not argv or argv[0] != "serve":
        sys.exit(f"a standby only becomes a replica (`headway serve ...`), not `headway {' '.join(argv)}`")
    sys.argv = ["headway", *argv]
    run_serve(argv[1:])


if __name__ == "__main__":
    main()
