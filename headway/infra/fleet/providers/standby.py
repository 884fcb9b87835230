"""A standby replica process: an interpreter that has already imported what every replica needs
(torch, the engine, the server) and waits on stdin for the `headway serve` arguments of the
replica it will become.

Importing torch and the server is a second or more of every cold start; the local provider keeps
one standby ready and hands the next replica to it, then starts another. The first line on stdin
is JSON: {"argv": [...], "env": {...}, "log": PATH}. The process then writes its output to PATH,
takes the environment and its thread count, and runs `headway ARGV` as if started with it.
"""

from __future__ import annotations

import json
import os
import sys


def _preload() -> None:
    import torch  # noqa: F401
    import uvicorn.lifespan.on  # noqa: F401
    import uvicorn.protocols.http.httptools_impl  # noqa: F401
    import uvicorn.protocols.http.h11_impl  # noqa: F401

    import headway.cli.main  # noqa: F401
    import headway.infra.weights  # noqa: F401
    import headway.library  # noqa: F401
    import headway.runtime.llm.engine  # noqa: F401
    import headway.runtime.llm.openai_api  # noqa: F401
    import headway.runtime.llm.serving  # noqa: F401
    import headway.server.app  # noqa: F401


def main() -> None:
    _preload()
    line = sys.stdin.readline()
    if not line:
        return                        # the provider went away without using this standby
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
    from headway.cli.main import app

    sys.argv = ["headway", *order["argv"]]
    app()


if __name__ == "__main__":
    main()
