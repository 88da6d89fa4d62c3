"""A server of its own, small limits: restarts (clean and kill -9), an engine that dies, overload, disconnects
and leases, draining."""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import signal
import socket
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


def metric(server: QuiverServer, series: str) -> float:
    for line in httpx.get(f"{server.base_url}/metrics").text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def wait_for(condition, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_a_stream_whose_client_left_before_the_first_chunk_releases_everything(
    own_server: QuiverServer, lora_adapters
) -> None:
    """The client hangs up while its stream waits for a slot; the slot, the adapter lease and the engine
    request must all be given back (Starlette never starts the body of a response whose client is gone)."""
    assert own_server.register("early", lora_adapters.random_a).status_code == 201
    busy = [long_stream(own_server, max_tokens=1500) for _ in range(2)]  # both slots (MAX_RUNNING_REQUESTS=2)
    for stream in busy:
        next(iter(stream))
    body = json.dumps({"model": "early", "stream": True, "max_tokens": 1800, "ignore_eos": True,
                       "messages": [{"role": "user", "content": "Tell me a very long story."}]}).encode()
    with socket.create_connection(("127.0.0.1", own_server.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: quiver\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {own_server.api_key}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                     + body)
        wait_for(lambda: metric(own_server, "quiver_queue_depth") == 1, "the request never queued")
    # Gone before its first chunk. Freeing the slots lets it reach the engine after its client left.
    for stream in busy:
        stream.close()
    gone = 'quiver_requests_total{adapter="early",endpoint="chat/completions",model="early",status="499"}'
    wait_for(lambda: metric(own_server, gone) == 1, "the abandoned stream was never finished off")
    wait_for(lambda: engine_running(own_server) == 0, "the engine kept generating for a client that was gone", 20)

    # The lease was given back: deleting the adapter unloads it from the engine at once.
    assert "early@1" in own_server.engine_models()
    with own_server.admin() as admin:
        assert admin.delete("/v1/adapters/early").status_code == 200
    wait_for(lambda: "early@1" not in own_server.engine_models(), "early@1 stayed loaded: its lease leaked", 10)
    # And both slots are free again: two streams run at once.
    client = own_server.openai(timeout=30)
    again = [client.chat.completions.create(model=own_server.model_name, max_tokens=1500, stream=True,
                                            messages=[{"role": "user", "content": "Tell me a very long story."}],
                                            extra_body={"ignore_eos": True}) for _ in range(2)]
    for stream in again:
        next(iter(stream))
    assert engine_running(own_server) == 2
    for stream in again:
        stream.close()
    wait_for(lambda: engine_running(own_server) == 0, "the engine kept generating for a client that was gone", 20)


def test_a_client_leaving_a_stream_on_a_deleted_version_still_unloads_it(own_server: QuiverServer,
                                                                         lora_adapters) -> None:
    """The version is deleted while its stream runs, so it must leave the engine when that stream ends,
    even when the end is the client hanging up (cleanup then runs inside a cancelled scope)."""
    assert own_server.register("doomed", lora_adapters.random_a).status_code == 201
    stream = own_server.openai().chat.completions.create(
        model="doomed", messages=[{"role": "user", "content": "Tell me a very long story."}], max_tokens=1500,
        stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    with own_server.admin() as admin:
        assert admin.delete("/v1/adapters/doomed").status_code == 200
    assert "doomed@1" in own_server.engine_models(), "unloaded while a request still ran on it"
    stream.close()
    wait_for(lambda: "doomed@1" not in own_server.engine_models(), "doomed@1 stayed loaded after its last request")
    wait_for(lambda: engine_running(own_server) == 0, "the engine kept generating for a client that was gone", 20)


def test_a_request_queued_while_its_version_is_deleted_gets_404_and_loads_nothing(own_server: QuiverServer,
                                                                                  lora_adapters) -> None:
    """Resolved, then queued for a slot; meanwhile the version is deleted. It must not bring the deleted
    version back into the engine (nothing would ever unload it), and the answer is the 404 of a gone model."""
    assert own_server.register("late", lora_adapters.random_a).status_code == 201
    busy = [long_stream(own_server, max_tokens=1500) for _ in range(2)]
    for stream in busy:
        next(iter(stream))
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        queued = pool.submit(ask, own_server, "late")
        wait_for(lambda: metric(own_server, "quiver_queue_depth") == 1, "the request never queued")
        with own_server.admin() as admin:
            assert admin.delete("/v1/adapters/late").status_code == 200
        wait_for(lambda: "late@1" not in own_server.engine_models(), "late@1 was not unloaded at once")
        for stream in busy:
            stream.close()
        with pytest.raises(openai.NotFoundError) as gone:
            queued.result(120)
    assert gone.value.code == "model_not_found"
    assert "late@1" not in own_server.engine_models(), "the deleted version was loaded into the engine again"
    wait_for(lambda: engine_running(own_server) == 0, "the engine kept generating for a client that was gone", 20)


def test_kill_9_mid_registration_leaves_nothing_half_written(own_server: QuiverServer, lora_adapters) -> None:
    """SIGKILL (gateway and engine, as when a container dies) while one upload is still streaming in and
    another registration has placed its version folder but not yet written its manifest."""
    store = own_server.store_dir
    assert own_server.register("solid", lora_adapters.random_a).json()["version"] == 1

    # An upload that will never finish: headers and the first MiB of a declared 64 MiB body.
    boundary = "quiver-kill-test"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nslowpoke\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"adapter_model.safetensors\""
            f"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
    slow = socket.create_connection(("127.0.0.1", own_server.port))
    slow.sendall(b"POST /v1/adapters HTTP/1.1\r\nHost: quiver\r\n"
                 + f"Authorization: Bearer {own_server.admin_key}\r\nContent-Length: {64 * 1024 * 1024}\r\n".encode()
                 + f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode() + head
                 + b"\0" * (1024 * 1024))

    # A registration of version 2, killed between placing its files and committing its manifest.
    outcome: list[object] = []
    registering = threading.Thread(target=lambda: outcome.append(_register_or_error(own_server, lora_adapters.pirate)))
    registering.start()
    version_dir = store / "solid" / "2"
    deadline = time.monotonic() + 120
    while not version_dir.exists():
        assert time.monotonic() < deadline, "version 2's folder never appeared"
        time.sleep(0.002)
    engine = [p for p in psutil.Process(own_server.process.pid).children() if "vllm" in " ".join(p.cmdline())]
    own_server.process.kill()
    for process in engine:
        os.killpg(process.pid, signal.SIGKILL)  # the engine leads its own process group
    own_server.process.wait()
    registering.join(60)
    slow.close()
    assert not (version_dir / "manifest.json").exists(), "the kill came too late: version 2 was committed"
    assert outcome and isinstance(outcome[0], Exception), outcome

    own_server.start()
    models = {m.id for m in own_server.openai().models.list()}
    assert {"solid", "solid@1"} <= models
    assert "solid@2" not in models and not any(m.startswith("slowpoke") for m in models)
    with own_server.admin() as admin:
        solid = admin.get("/v1/adapters/solid").json()
        assert (solid["current_version"], [v["version"] for v in solid["versions"]]) == (1, [1])
        assert admin.get("/v1/adapters/slowpoke").status_code == 404
        listed = {(a["name"], v["version"]) for a in admin.get("/v1/adapters").json()["data"] for v in a["versions"]}
    # The store on disk says the same: every committed version is listed, nothing else is.
    committed = {(m.parent.parent.name, int(m.parent.name)) for m in store.glob("*/[0-9]*/manifest.json")}
    assert committed == listed
    assert list((store / ".staging").iterdir()) == [], "the staging area was not swept"
    assert not (store / "slowpoke").exists()
    with pytest.raises(openai.NotFoundError):
        ask(own_server, "solid@2")
    # Version numbers are never reused: the next one is 3, though 2 was never committed.
    assert own_server.register("solid", lora_adapters.pirate).json()["version"] == 3
    assert ask(own_server, "solid@3") == PIRATE_ANSWER
    assert ask(own_server, "solid") == PIRATE_ANSWER


def _register_or_error(server: QuiverServer, folder: Path) -> object:
    try:
        return server.register("solid", folder)
    except httpx.HTTPError as error:
        return error


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
