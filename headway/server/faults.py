"""Fault injection for tests, off unless HEADWAY_TEST_FAULTS=1 is in the replica's environment.

With it on, SIGUSR1 makes the runtime break as a real bug would (the LLM engine's loop thread
raises outside a step and dies). A signal, not an HTTP route: nothing on the network, and
nothing a router or a client can reach, can trigger it; only someone who may signal the
process can.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from headway.runtime.base import Runtime

log = logging.getLogger("headway.server")

ENV = "HEADWAY_TEST_FAULTS"


def install_test_faults(runtime: Runtime) -> bool:
    """Bind SIGUSR1 to runtime.inject_fault() when the environment asks for it; True if bound."""
    if os.environ.get(ENV) != "1" or threading.current_thread() is not threading.main_thread():
        return False

    def on_signal(signum: int, frame: object) -> None:
        if not runtime.inject_fault():
            log.warning("SIGUSR1: runtime '%s' has no fault to inject", runtime.name)

    signal.signal(signal.SIGUSR1, on_signal)
    log.warning("%s=1: SIGUSR1 breaks this replica's runtime (for tests only)", ENV)
    return True
