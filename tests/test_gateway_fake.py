"""The gateway's own logic (routing, leases, limits, caps, metrics, drain, engine failures, stream aborts),
in-process on the fake engine with the official `openai` client: seconds, not minutes. What crosses a real
engine is tested against vLLM in the `engine` group."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from quiver.fake_engine import FakeEngine, fake_text
from quiver.testing import API_KEY

BASE = "SmolLM2-135M-Instruct"
MESSAGES = [{"role": "user", "content": "Hi"}]


def wait_for(condition, timeout_s: float = 30.0, what: str = "condition") -> None:
    """Waits for an event (generous timeout so a broken build fails instead of hanging)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)




def chat(gateway, model: str, **kwargs):
    return gateway.openai().chat.completions.create(model=model, messages=MESSAGES, max_tokens=3, **kwargs)


def in_background(function, *args, **kwargs) -> dict:
    """Runs a blocking call in a thread; the dict gets `result` or `error` when it ends."""
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = function(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    outcome["thread"] = thread
    return outcome


def test_routing_base_name_and_pinned_versions(make_gateway, fake_adapter: Path):
    gateway = make_gateway()
    assert chat(gateway, BASE).choices[0].message.content == fake_text(BASE, 3)
    assert gateway.register("bot", fake_adapter).status_code == 201
    assert chat(gateway, "bot").choices[0].message.content == fake_text("bot@1", 3)
    assert gateway.register("bot", fake_adapter).status_code == 201
    # the bare name follows the current version; a pin keeps its own weights
    assert chat(gateway, "bot").choices[0].message.content == fake_text("bot@2", 3)
    assert chat(gateway, "bot@1").choices[0].message.content == fake_text("bot@1", 3)
    completion = gateway.openai().completions.create(model="bot@2", prompt="x", max_tokens=2)
    assert completion.choices[0].text == fake_text("bot@2", 2)
    with pytest.raises(openai.NotFoundError) as missing:
        chat(gateway, "bot@3")
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        chat(gateway, "nobody")
    # what reached the engine: engine names only
    assert [body["model"] for body in gateway.engine.requests] == [BASE, "bot@1", "bot@2", "bot@1", "bot@2"]


def test_a_stored_adapter_training_a_layer_this_server_leaves_out_is_never_loaded(make_gateway, fake_adapter: Path,
                                                                                   model_dir: Path, tmp_path: Path):
    """Registered by a replica that wraps every layer, then served by one started with lora_target_modules
    narrower than the adapter: vLLM would load it without those layers and answer as another model, so the
    request gets a 400 naming them and the engine never sees the adapter; adapters within the layers serve."""
    from quiver.testing import random_adapter

    trains_mlp = random_adapter(model_dir, tmp_path / "trains-mlp", seed=5, target_modules=["q_proj", "down_proj"])
    wide = make_gateway()
    assert wide.register("mlp", trains_mlp).status_code == 201
    assert wide.register("attention", fake_adapter).status_code == 201
    narrow = make_gateway(state="narrow", lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    with pytest.raises(openai.BadRequestError) as refused:
        chat(narrow, "mlp")
    assert (refused.value.code, refused.value.body["param"]) == ("target_module_not_served", "model")
    assert "down_proj" in refused.value.message and "mlp@1" not in narrow.engine.load_calls
    assert chat(narrow, "attention").choices[0].message.content == fake_text("attention@1", 3)


def test_a_deleted_version_is_unloaded_only_after_its_last_request(make_gateway, fake_adapter: Path):
    gateway = make_gateway()
    engine = gateway.engine
    assert gateway.register("bot", fake_adapter).status_code == 201
    engine.hold()
    running = in_background(chat, gateway, "bot")
    wait_for(lambda: engine.running == 1, what="the request to reach the engine")
    with gateway.admin() as admin:
        assert admin.delete("/v1/adapters/bot").status_code in (200, 204)
    # deleted, but its request still holds it: not unloaded yet, and new requests no longer find it
    assert engine.unload_calls == []
    with pytest.raises(openai.NotFoundError):
        chat(gateway, "bot")
    engine.release()
    running["thread"].join(30)
    assert running["result"].choices[0].message.content == fake_text("bot@1", 3)
    wait_for(lambda: engine.unload_calls == ["bot@1"], what="the unload after the last request")
    assert "bot@1" not in engine.loaded


def test_limiter_429_with_retry_after_and_slots_come_back(make_gateway):
    gateway = make_gateway(max_running_requests=1, max_waiting_requests=0)
    engine = gateway.engine
    engine.hold()
    first = in_background(chat, gateway, BASE)
    wait_for(lambda: engine.running == 1, what="the first request to hold the slot")
    with pytest.raises(openai.RateLimitError) as refused:
        chat(gateway, BASE)
    assert refused.value.response.headers["Retry-After"] == "1"
    assert refused.value.body["code"] == "server_overloaded"
    engine.release()
    first["thread"].join(30)
    assert "result" in first
    assert chat(gateway, BASE).choices[0].message.content == fake_text(BASE, 3)
    assert gateway.state.inference.limiter.running == 0


def test_caps_on_max_tokens_and_n(make_gateway):
    gateway = make_gateway(max_completion_tokens=16, max_n=2)
    with pytest.raises(openai.BadRequestError) as too_long:
        chat(gateway, BASE, max_completion_tokens=17)
    assert too_long.value.body["code"] == "max_tokens_too_large"
    with pytest.raises(openai.BadRequestError) as too_many:
        chat(gateway, BASE, n=3)
    assert too_many.value.body["code"] == "n_too_large"
    assert gateway.engine.requests == []  # refused before the engine
    assert len(chat(gateway, BASE, n=2).choices) == 2


def test_metrics_labels_come_from_the_registry(make_gateway, fake_adapter: Path):
    gateway = make_gateway()
    assert gateway.register("bot", fake_adapter).status_code == 201
    chat(gateway, "bot")
    with pytest.raises(openai.NotFoundError):
        chat(gateway, "who-knows@1")
    text = httpx.get(f"{gateway.base_url}/metrics").text
    assert 'quiver_requests_total{adapter="bot",endpoint="chat/completions",model="bot",status="200"} 1.0' in text
    # an unknown model is counted under one fixed label (quiver.metrics.UNKNOWN_MODEL)
    assert 'quiver_requests_total{adapter="unknown",endpoint="chat/completions",model="unknown",status="404"} 1.0' in text
    assert "who-knows" not in text
    assert 'quiver_completion_tokens_total{adapter="bot"} 3.0' in text
    assert "vllm:fake_requests_total 1" in text  # the engine's own metrics follow quiver's
    assert "quiver_engine_up 1.0" in text


def test_drain_refuses_new_requests_and_lets_running_ones_finish(make_gateway):
    gateway = make_gateway()
    engine = gateway.engine
    engine.hold()
    running = in_background(chat, gateway, BASE)
    wait_for(lambda: engine.running == 1, what="the request to reach the engine")
    draining = in_background(engine.threadsafe, gateway.state.inference.drain, 60)
    wait_for(lambda: gateway.state.inference.draining, what="draining to start")
    with pytest.raises(openai.InternalServerError) as refused:
        chat(gateway, BASE)
    assert refused.value.status_code == 503 and refused.value.body["code"] == "server_draining"
    assert httpx.get(f"{gateway.base_url}/ready").json()["error"]["code"] == "server_draining"
    assert draining["thread"].is_alive()  # still waiting for the request in flight
    engine.release()
    running["thread"].join(30)
    draining["thread"].join(30)
    assert running["result"].choices[0].message.content == fake_text(BASE, 3)
    assert not draining["thread"].is_alive() and "error" not in draining


def test_engine_down_is_a_503_envelope(make_gateway):
    gateway = make_gateway()
    gateway.engine.threadsafe(gateway.engine.fail, "unavailable")
    response = httpx.post(f"{gateway.base_url}/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"model": BASE, "messages": MESSAGES})
    assert response.status_code == 503
    assert response.headers["Retry-After"]
    assert response.json()["error"]["code"] == "engine_unavailable"
    assert gateway.state.inference.limiter.running == 0


def test_a_hung_engine_is_a_503_in_bounded_time_and_frees_the_slot(make_gateway, fake_adapter: Path):
    engine = FakeEngine(BASE, read_timeout_s=0.5)
    gateway = make_gateway(engine)
    assert gateway.register("bot", fake_adapter).status_code == 201
    engine.threadsafe(engine.fail, "hang")
    with pytest.raises(openai.InternalServerError) as hung:
        gateway.openai(timeout=60).chat.completions.create(model="bot", messages=MESSAGES, max_tokens=3)
    assert hung.value.status_code == 503 and hung.value.body["code"] == "engine_unavailable"
    assert gateway.state.inference.limiter.running == 0
    assert gateway.state.registry._in_flight == {}  # the lease is given back
    # an engine restart heals: adapters are loaded again on first use
    engine.threadsafe(engine.restart)
    assert chat(gateway, "bot").choices[0].message.content == fake_text("bot@1", 3)
    assert engine.load_calls == ["bot@1", "bot@1"]


def test_a_stream_that_hangs_midway_ends_with_an_error_event(make_gateway):
    engine = FakeEngine(BASE, read_timeout_s=0.5, token_delay_s=0.05)
    gateway = make_gateway(engine)
    stream = gateway.openai(timeout=60).chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=50,
                                                                stream=True)
    chunks = iter(stream)
    assert next(chunks).choices[0].delta.content == f"{BASE}#0 "
    engine.threadsafe(engine.fail, "hang")
    with pytest.raises(openai.APIError) as broken:
        for _ in chunks:
            pass
    assert "mid-stream" in str(broken.value)
    wait_for(lambda: gateway.state.inference.limiter.running == 0, what="the slot to come back")


def test_a_client_that_leaves_mid_stream_aborts_the_engine_request(make_gateway):
    engine = FakeEngine(BASE, token_delay_s=0.05)
    gateway = make_gateway(engine)
    with httpx.stream("POST", f"{gateway.base_url}/v1/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": BASE, "messages": MESSAGES, "max_tokens": 200, "stream": True}) as response:
        assert response.status_code == 200
        next(response.iter_bytes())
    wait_for(lambda: engine.aborted == 1, what="the engine request to be aborted")
    wait_for(lambda: engine.running == 0 and gateway.state.inference.limiter.running == 0, what="slots back")
    text = httpx.get(f"{gateway.base_url}/metrics").text
    assert 'status="499"' in text


def test_a_client_that_leaves_before_the_first_token_aborts_the_engine_request(make_gateway):
    """A hang-up while the engine still computes the first token (a long prefill) is noticed at once: the
    engine request is aborted before any token exists, and the request counts as a 499."""
    engine = FakeEngine(BASE)
    gateway = make_gateway(engine)
    engine.hold()
    with httpx.stream("POST", f"{gateway.base_url}/v1/completions", timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": BASE, "prompt": "Hi", "max_tokens": 200, "stream": True}) as response:
        assert response.status_code == 200
        wait_for(lambda: engine.running == 1, what="the request to reach the engine")
    wait_for(lambda: engine.aborted == 1, what="the engine request to be aborted while it holds the first token")
    assert engine.completed == 0
    engine.release()
    wait_for(lambda: engine.running == 0 and gateway.state.inference.limiter.running == 0, what="slots back")

    def counted_499() -> bool:
        lines = httpx.get(f"{gateway.base_url}/metrics").text.splitlines()
        return any(line.startswith("quiver_requests_total{") and 'endpoint="completions"' in line
                   and 'status="499"' in line and line.endswith(" 1.0") for line in lines)

    wait_for(counted_499, what="the 499 to be counted")


def test_a_refused_load_registers_nothing(make_gateway, fake_adapter: Path):
    gateway = make_gateway()
    gateway.engine.refuse_loads = True
    response = gateway.register("bot", fake_adapter)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "engine_rejected"
    with gateway.admin() as admin:
        assert admin.get("/v1/adapters/bot").status_code == 404
    gateway.engine.refuse_loads = False
    assert gateway.register("bot", fake_adapter).status_code == 201


def test_a_deleted_versions_files_stay_for_the_engine_until_it_unloads(make_gateway, fake_adapter: Path):
    """vLLM may re-read an adapter's files while a request waits in it for a slot (its CPU cache evicted the
    adapter); deleting the version must not pull the files from under it (a soak run crashed the engine core so)."""
    gateway = make_gateway()
    engine = gateway.engine
    assert gateway.register("bot", fake_adapter).status_code == 201
    engine.hold()
    running = in_background(chat, gateway, "bot")
    wait_for(lambda: engine.running == 1, what="the request to reach the engine")
    engine_path = engine.loaded["bot@1"]
    with gateway.admin() as admin:
        assert admin.delete("/v1/adapters/bot").status_code in (200, 204)
    assert not list(gateway.settings.store_dir.glob("bot/1/adapter_config.json")), "the store's copy is gone"
    assert (engine_path / "adapter_config.json").is_file(), "the engine's copy stays while the engine holds it"
    engine.release()
    running["thread"].join(30)
    wait_for(lambda: engine.unload_calls == ["bot@1"], what="the unload after the last request")
    wait_for(lambda: not engine_path.exists(), what="the engine's copy to be removed after the unload")


class _DyingEngine(FakeEngine):
    """Answers generation the way vLLM does when its engine core has died: a 500 naming its internals."""

    async def generate(self, endpoint, body):
        from quiver.fake_engine import _FakeResponse

        error = {"error": {"message": "EngineCore encountered an issue. See stack trace (above) for the root cause.",
                           "type": "InternalServerError", "param": None, "code": 500}}
        return _FakeResponse(self, 500, None, json.dumps(error).encode())


def test_an_engine_failure_is_a_retryable_503_never_a_500(make_gateway):
    gateway = make_gateway(engine=_DyingEngine(BASE))
    response = httpx.post(f"{gateway.base_url}/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"model": BASE, "messages": MESSAGES})
    assert response.status_code == 503
    assert response.headers["Retry-After"]
    assert response.json()["error"]["code"] == "engine_unavailable"
    assert "EngineCore" not in response.text
    metrics = httpx.get(f"{gateway.base_url}/metrics").text
    assert f'quiver_requests_total{{adapter="{BASE}",endpoint="chat/completions",model="{BASE}",status="503"}} 1.0' in metrics


def test_every_route_and_dependency_runs_on_the_event_loop(tmp_path: Path) -> None:
    """FastAPI runs a plain `def` endpoint or dependency in its thread pool: a hop to a worker thread and back on
    every request (the generation routes' one such getter took the in-process path to the first byte from 0.35
    to 0.22 ms). Every route and every dependency under it is a coroutine (blocking work inside them goes to
    asyncio.to_thread explicitly)."""
    from fastapi.dependencies.models import Dependant
    from fastapi.routing import APIRoute

    from quiver.app import create_app
    from quiver.settings import Settings

    app = create_app(Settings(store_dir=tmp_path / "store", state_dir=tmp_path / "state",
                              finetuning_dir=tmp_path / "ft"))
    in_thread_pool: list[str] = []

    def walk(dependant: Dependant, path: str) -> None:
        if dependant.call is not None and not dependant.is_coroutine_callable:
            in_thread_pool.append(f"{path}: {getattr(dependant.call, '__qualname__', dependant.call)}")
        for sub in dependant.dependencies:
            walk(sub, path)

    routes = [route for route in app.routes if isinstance(route, APIRoute)]
    assert len(routes) > 30  # the walk reached the app's API, not an empty router
    for route in routes:
        walk(route.dependant, route.path)
    assert not in_thread_pool


def test_a_client_that_hangs_up_right_after_done_is_counted_as_served(make_gateway, monkeypatch):
    """The openai client closes its connection as soon as it reads [DONE], often before the engine's stream has
    ended; the gateway then closes that stream, and the real engine client's next read fails (aiohttp raises on
    a closed response). The answer was whole: it counts as a 200, not a 499."""
    from quiver.engine_client import EngineUnavailable
    from quiver.fake_engine import _FakeResponse

    whole = _FakeResponse.chunks

    async def ends_late(self):
        async for part in whole(self):
            yield part
            if b"[DONE]" in part:
                while not self._closed:  # the engine's end of stream, not yet arrived
                    await asyncio.sleep(0.01)
                raise EngineUnavailable("Connection closed")  # what reading a closed aiohttp response raises

    monkeypatch.setattr(_FakeResponse, "chunks", ends_late)
    gateway = make_gateway()
    streamed = list(gateway.openai().chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}],
                                                             max_tokens=3, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == fake_text(BASE, 3)
    series = f'quiver_requests_total{{adapter="{BASE}",endpoint="chat/completions",model="{BASE}",status="200"}} 1.0'
    deadline = time.monotonic() + 5
    while series not in (text := httpx.get(f"{gateway.base_url}/metrics").text) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert series in text and 'status="499"' not in text
