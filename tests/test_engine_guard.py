"""The engine dies with its gateway, even when the gateway is killed with SIGKILL (no engine needed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

# A stand-in gateway: starts a guarded child in its own session, as EngineSupervisor does, reports its pid.
GATEWAY = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-m", "quiver.engine_guard", str(os.getpid()),
                          sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
print(child.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux's")
def test_guarded_engine_exits_when_the_gateway_is_killed():
    gateway = subprocess.Popen([sys.executable, "-c", GATEWAY], stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(gateway.stdout.readline()))
    try:
        time.sleep(1)  # let the guard arm the signal and exec
        assert child.is_running() and "time.sleep(120)" in " ".join(child.cmdline())
        os.kill(gateway.pid, signal.SIGKILL)
        gateway.wait()
        child.wait(timeout=10)  # raises if the child outlives its gateway
    finally:
        gateway.kill()
        if child.is_running():
            child.kill()


def test_guard_refuses_to_start_for_a_gateway_that_is_already_gone():
    result = subprocess.run([sys.executable, "-m", "quiver.engine_guard", "1", sys.executable, "-c", "print('ran')"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "ran" not in result.stdout and "is gone" in result.stderr


def test_guard_lowers_the_engines_cpu_priority_for_everything_it_starts():
    env = dict(os.environ, QUIVER_ENGINE_NICE="5")
    script = "import os, subprocess, sys; print(os.nice(0)); sys.stdout.flush(); " \
             "subprocess.run([sys.executable, '-c', 'import os; print(os.nice(0))'])"
    result = subprocess.run([sys.executable, "-m", "quiver.engine_guard", str(os.getpid()), sys.executable, "-c",
                             script], capture_output=True, text=True, timeout=30, env=env)
    expected = str(min(os.nice(0) + 5, 19))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [expected, expected]  # the engine and the processes it starts
