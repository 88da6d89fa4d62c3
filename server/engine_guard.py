"""Run a command that dies with the gateway: `python -m server.engine_guard <gateway pid> <program> <args...>`.

The engine runs in its own process group (so that stopping it reaches its engine-core and worker processes),
which also means nothing stops it when the gateway is killed with SIGKILL: it would keep its memory (GiBs)
and its port. Linux's parent-death signal closes that gap; it survives the exec below.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    gateway_pid, program, *args = sys.argv[1:]
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != int(gateway_pid):  # the gateway died before the signal was armed
            sys.exit(f"the gateway (pid {gateway_pid}) is gone; not starting {program}")
    os.execvp(program, [program, *args])


if __name__ == "__main__":
    main()
