"""A server of its own, small limits: restarts, an engine that dies, overload, disconnects and draining."""

from __future__ import annotations

import concurrent.futures
import io
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from conftest import PIRATE_ANSWER, QuiverServer

QUESTION = "What is the capital of France?"


def ask(server: QuiverServer, model: str) -> str:
    response = server.openai().chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=16
    )
    return response.choices[0].message.content


@pytest.fixture(scope="module")
def own_server(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("restart")
    server = QuiverServer(model_dir=model_dir, store_dir=root / "store", state_dir=root / "state",
                          extra_env={"QUIVER_MAX_RUNNING_REQUESTS": "2", "QUIVER_MAX_WAITING_REQUESTS": "2",
                                     "QUIVER_MAX_N": "2", "QUIVER_DRAIN_TIMEOUT_S": "60"})
    try:
        yield server.start()
    finally:
        server.stop()


def test_registered_adapters_survive_a_whole_server_restart(own_server: QuiverServer, lora_adapters) -> None:
    assert own_server.register("pirate", lora_adapters.random_a).status_code == 201
    assert own_server.register("pirate", lora_adapters.pirate).status_code == 201
    pinned_before = ask(own_server, "pirate@1")
    assert ask(own_server, "pirate") == PIRATE_ANSWER
    admin = own_server.openai(key=own_server.admin_key)
    examples = (Path(__file__).parent.parent / "examples" / "pirate.jsonl").read_bytes()
    uploaded = admin.files.create(file=("pirate.jsonl", io.BytesIO(examples)), purpose="fine-tune")
    job = admin.fine_tuning.jobs.create(model=own_server.model_name, training_file=uploaded.id)
    assert admin.fine_tuning.jobs.cancel(job.id).status == "cancelled"

    own_server.stop()
    own_server.start()

    assert admin.files.retrieve(uploaded.id).bytes == len(examples)
    assert admin.fine_tuning.jobs.retrieve(job.id).status == "cancelled"

    assert ask(own_server, "pirate") == PIRATE_ANSWER
    assert ask(own_server, "pirate@1") == pinned_before
    ids = {m.id for m in own_server.openai().models.list()}
    assert {"pirate", "pirate@1", "pirate@2"} <= ids


def pirate_loads(server: QuiverServer) -> float:
    series = 'quiver_adapter_loads_total{adapter="pirate"} '
    line = next(line for line in httpx.get(f"{server.base_url}/metrics").text.splitlines() if line.startswith(series))
    return float(line.split()[-1])


def test_a_killed_engine_is_restarted_and_adapters_served_again(own_server: QuiverServer, lora_adapters) -> None:
    assert ask(own_server, "pirate") == PIRATE_ANSWER
    loads_before = pirate_loads(own_server)
    engine = next(p for p in psutil.Process(own_server.process.pid).children() if "vllm" in " ".join(p.cmdline()))
    os.kill(engine.pid, signal.SIGKILL)

    deadline = time.monotonic() + 30
    while httpx.get(f"{own_server.base_url}/ready").status_code == 200:
        assert time.monotonic() < deadline, "the gateway never noticed the engine died"
        time.sleep(0.2)
    unavailable = httpx.post(f"{own_server.base_url}/v1/chat/completions",
                             headers={"Authorization": f"Bearer {own_server.api_key}"},
                             json={"model": "pirate", "messages": [{"role": "user", "content": QUESTION}]})
    assert unavailable.status_code == 503
    assert unavailable.json()["error"]["code"] == "engine_unavailable"

    own_server.wait_ready()
    assert ask(own_server, "pirate") == PIRATE_ANSWER
    assert pirate_loads(own_server) == loads_before + 1, "the new engine process had to load the adapter again"


def engine_running(server: QuiverServer) -> float:
    for line in httpx.get(f"{server.base_url}/metrics").text.splitlines():
        if line.startswith("vllm:num_requests_running{"):
            return float(line.split()[-1])
    raise AssertionError("no vllm:num_requests_running series")


def long_stream(server: QuiverServer, max_tokens: int = 400):
    return server.openai().chat.completions.create(
        model=server.model_name, messages=[{"role": "user", "content": "Tell me a very long story."}],
        max_tokens=max_tokens, stream=True, extra_body={"ignore_eos": True},
    )


def test_caps_on_max_tokens_and_n(own_server: QuiverServer) -> None:
    client = own_server.openai()
    with pytest.raises(openai.BadRequestError) as too_many:
        client.chat.completions.create(model=own_server.model_name, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=10**6)
    assert (too_many.value.code, too_many.value.param) == ("max_tokens_too_large", "max_tokens")
    with pytest.raises(openai.BadRequestError) as too_many_n:
        client.chat.completions.create(model=own_server.model_name, messages=[{"role": "user", "content": "hi"}],
                                       n=3)
    assert too_many_n.value.code == "n_too_large"


def test_overload_gets_429_with_retry_after(own_server: QuiverServer) -> None:
    """2 may run and 2 may wait: of 8 concurrent requests at least 4 are turned away, none fail otherwise."""
    def one(_: int) -> httpx.Response:
        return httpx.post(f"{own_server.base_url}/v1/chat/completions", timeout=300,
                          headers={"Authorization": f"Bearer {own_server.api_key}"},
                          json={"model": own_server.model_name, "max_tokens": 64, "ignore_eos": True,
                                "messages": [{"role": "user", "content": "Count to fifty."}]})

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(one, range(8)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 429} and statuses.count(429) >= 4, statuses
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["Retry-After"] and refused.json()["error"]["code"] == "server_overloaded"
    assert 'quiver_rejected_requests_total{reason="overloaded"}' in httpx.get(f"{own_server.base_url}/metrics").text


def test_a_client_that_hangs_up_mid_stream_cancels_its_engine_request(own_server: QuiverServer) -> None:
    stream = long_stream(own_server, max_tokens=1500)
    for _ in zip(range(3), stream):
        pass
    assert engine_running(own_server) == 1
    stream.close()
    deadline = time.monotonic() + 20
    while engine_running(own_server) != 0:
        assert time.monotonic() < deadline, "the engine kept generating for a client that was gone"
        time.sleep(0.2)


def test_sigterm_drains_in_flight_streams_then_stops(own_server: QuiverServer) -> None:
    """Runs last in this module: it stops the server."""
    stream = long_stream(own_server, max_tokens=200)
    first = next(iter(stream))
    received: list[str] = [first.choices[0].delta.content or ""]
    reader = threading.Thread(target=lambda: received.extend(c.choices[0].delta.content or "" for c in stream
                                                             if c.choices))
    reader.start()
    own_server.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while httpx.get(f"{own_server.base_url}/ready").status_code == 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    refused = httpx.post(f"{own_server.base_url}/v1/chat/completions",
                         headers={"Authorization": f"Bearer {own_server.api_key}"},
                         json={"model": own_server.model_name, "messages": [{"role": "user", "content": "hi"}]})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_draining"
    reader.join(120)
    assert not reader.is_alive()
    assert own_server.process.wait(120) == 0
    assert len(received) >= 200, "the stream was cut short instead of running to its end"
