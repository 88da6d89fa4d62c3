"""Run a command that dies with the gateway: `python -m quiver.engine_guard <gateway pid> <program> <args...>`.

The engine runs in its own process group (so that stopping it reaches its engine-core and worker processes),
which also means nothing stops it when the gateway is killed with SIGKILL: it would keep its memory (GiBs)
and its port. Linux's parent-death signal closes that gap; it survives the exec below.

`QUIVER_ENGINE_NICE` (set from the settings' `engine_nice`) lowers the engine's CPU priority first; every
process it starts inherits it, so the gateway wins a busy core whenever it has work.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
NICE_ENV = "QUIVER_ENGINE_NICE"


def main() -> None:
    gateway_pid, program, *args = sys.argv[1:]
    nice = int(os.environ.get(NICE_ENV) or 0)
    if nice:
        os.nice(nice)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != int(gateway_pid):  # the gateway died before the signal was armed
            sys.exit(f"the gateway (pid {gateway_pid}) is gone; not starting {program}")
    os.execvp(program, [program, *args])


if __name__ == "__main__":
    main()
