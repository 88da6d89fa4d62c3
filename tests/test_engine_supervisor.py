"""The supervisor's healing logic on a stand-in engine process (a tiny HTTP server that answers /health), so
it runs in seconds: a stopped (SIGSTOP) engine is killed and replaced, listeners that fail do not stop it, an
unexpected exception does not kill it, and the restart back-off resets after a healthy period. The same on
the real vLLM engine: test_engine_heals.py."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

import quiver.engine
from quiver.engine import EngineSupervisor
from quiver.settings import Settings

STAND_IN = """
import http.server, sys
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def supervisor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(quiver.engine, "engine_command",
                        lambda settings, model_dir, port: [sys.executable, "-c", STAND_IN, str(port)])
    settings = Settings(state_dir=tmp_path / "state", engine_health_interval_s=0.2, engine_health_timeout_s=0.5,
                        engine_health_failures=2, engine_healthy_reset_s=1.0, engine_start_timeout_s=60)
    return EngineSupervisor(settings, tmp_path)


async def until(condition, what: str, timeout_s: float = 60) -> None:
    """Waits for an event; the timeout only keeps a broken build from hanging."""
    async def poll():
        while not condition():
            await asyncio.sleep(0.05)
    try:
        await asyncio.wait_for(poll(), timeout_s)
    except asyncio.TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


@pytest.mark.anyio
async def test_a_stopped_engine_is_replaced_and_listeners_told(supervisor: EngineSupervisor) -> None:
    told: list[int] = []

    async def failing_listener() -> None:
        raise RuntimeError("a listener that breaks must not stop the supervisor")

    async def listener() -> None:
        told.append(supervisor.pid)

    supervisor.on_restart(failing_listener)
    supervisor.on_restart(listener)
    await supervisor.start()
    try:
        first = supervisor.pid
        os.killpg(first, signal.SIGSTOP)  # hung: the port stays open, nothing answers
        await until(lambda: not supervisor.ready, "the hung engine to be noticed")
        await until(lambda: told, "the restart")
        assert supervisor.ready and supervisor.pid != first and told == [supervisor.pid]
        assert supervisor.restarts == 1
        with pytest.raises(ProcessLookupError):
            os.killpg(first, 0)  # the stopped group was killed, not left behind
        await supervisor.health()

        # again, after the failing listener: the supervisor is still watching
        os.killpg(supervisor.pid, signal.SIGKILL)
        await until(lambda: len(told) == 2, "the second restart")
        assert supervisor.restarts == 2
    finally:
        await supervisor.stop()


@pytest.mark.anyio
async def test_the_restart_back_off_resets_after_a_healthy_period(supervisor: EngineSupervisor) -> None:
    await supervisor.start()
    try:
        os.killpg(supervisor.pid, signal.SIGKILL)
        await until(lambda: supervisor.restart_streak == 1 and supervisor.ready, "the restart")
        await until(lambda: supervisor.restart_streak == 0, "the back-off to reset after a healthy period")
        assert supervisor.restarts == 1
    finally:
        await supervisor.stop()


@pytest.mark.anyio
async def test_the_supervisor_survives_an_unexpected_exception(supervisor: EngineSupervisor,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    await supervisor.start()
    try:
        first = supervisor.pid
        client = supervisor.client
        original = client.health
        calls = {"n": 0}

        async def broken_once() -> None:
            calls["n"] += 1
            if calls["n"] == 1:
                raise KeyError("a bug, not an engine error")
            await original()

        monkeypatch.setattr(client, "health", broken_once)
        await until(lambda: supervisor.ready and supervisor.pid != first, "a fresh engine after the bug")
        await supervisor.health()
        assert calls["n"] >= 1
    finally:
        await supervisor.stop()
