"""A hung engine heals: stopped with SIGSTOP (it keeps its port and answers nothing), the supervisor's health
probe gives up on it, requests in flight end with a 503 envelope, their slots are given back, the engine is
killed and started again with a new key, adapters are loaded again, and serving comes back without an
operator. Events are ordered; the timeouts are only there so a broken build fails instead of hanging."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from quiver.testing import QuiverServer

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def healing_server(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("heal")
    server = QuiverServer(model_dir=model_dir, store_dir=root / "store", state_dir=root / "state", extra_env={
        # one slot, no queue: a slot the hung requests kept would turn the request after the heal into a 429
        "QUIVER_MAX_RUNNING_REQUESTS": "2", "QUIVER_MAX_WAITING_REQUESTS": "0",
        "QUIVER_ENGINE_HEALTH_INTERVAL_S": "1", "QUIVER_ENGINE_HEALTH_TIMEOUT_S": "2",
        "QUIVER_ENGINE_HEALTH_FAILURES": "2", "QUIVER_ENGINE_READ_TIMEOUT_S": "120",
    })
    try:
        yield server.start()
    finally:
        server.stop()


def ask(server: QuiverServer, model: str) -> str:
    reply = server.openai(timeout=300).chat.completions.create(model=model, messages=QUESTION, temperature=0,
                                                               max_tokens=12)
    return reply.choices[0].message.content


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def ready(server: QuiverServer) -> bool:
    try:
        return httpx.get(f"{server.base_url}/ready", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_stopped_engine_is_replaced_and_serving_comes_back(healing_server: QuiverServer, fake_adapter: Path):
    server = healing_server
    assert server.register("healer", fake_adapter).status_code == 201
    before = ask(server, "healer")
    old_engine = server.engine_process()
    old_key = server.engine_key
    old_url = server.engine_url

    # a stream in flight: its first chunk has arrived when the engine stops
    events: list[bytes] = []
    first_chunk = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", timeout=600,
                          headers={"Authorization": f"Bearer {server.api_key}"},
                          json={"model": "healer", "messages": QUESTION, "max_tokens": 1500, "stream": True,
                                "temperature": 0, "ignore_eos": True}) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    events.append(line.encode())
                    first_chunk.set()

    streaming = threading.Thread(target=stream, daemon=True)
    streaming.start()
    assert first_chunk.wait(300), "the stream never started"

    os.killpg(old_engine.pid, signal.SIGSTOP)  # the engine's whole process group: hung, port still open
    try:
        # a request sent to the hung engine fails with the 503 envelope (it does not wait forever)
        response = httpx.post(f"{server.base_url}/v1/chat/completions", timeout=600,
                              headers={"Authorization": f"Bearer {server.api_key}"},
                              json={"model": "healer", "messages": QUESTION, "max_tokens": 4})
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "engine_unavailable"
        # the stream in flight ends with an error event in the same envelope
        streaming.join(600)
        assert not streaming.is_alive()
        last = json.loads(events[-1].partition(b"data:")[2])
        assert last["error"]["code"] == "engine_unavailable" and last["error"]["message"]
    finally:
        if old_engine.is_running():
            os.killpg(old_engine.pid, signal.SIGCONT)

    # the supervisor killed the stopped engine and started a new one, without anyone asking
    wait_for(lambda: ready(server), 900, "the gateway to be ready again")
    assert not old_engine.is_running() or old_engine.status() == "zombie"
    new_engine = server.engine_process()
    assert new_engine.pid != old_engine.pid
    log = server.log_path.read_text(errors="replace")
    assert "stopped answering its health probe" in log

    # the adapter is loaded again on use and answers as before; the slots of the failed requests came back
    # (with 2 slots and no queue, two leaked slots would make this a 429)
    assert ask(server, "healer") == before
    assert ask(server, "healer@1") == before
    # the new engine has a new key: the old one is refused
    assert server.engine_key != old_key
    refused = httpx.get(f"{server.engine_url}/v1/models", headers={"Authorization": f"Bearer {old_key}"}, timeout=30)
    assert refused.status_code == 401
    assert server.engine_url == old_url  # same private port, new process
    metrics = httpx.get(f"{server.base_url}/metrics", timeout=30).text
    assert 'status="503"' in metrics
