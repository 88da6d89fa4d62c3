"""The serving core end to end: the real `quiver serve` (gateway + vLLM engine), the official openai client."""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import openai
import pytest

from conftest import PIRATE_ANSWER, QuiverServer

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = ["What is the capital of France?", "Write one sentence about the sea.", "List three fruits."]


def chat(server: QuiverServer, model: str, content: str, max_tokens: int = 24) -> str:
    response = server.openai().chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], temperature=0, max_tokens=max_tokens
    )
    return response.choices[0].message.content


@pytest.fixture(scope="module")
def registered(quiver_server: QuiverServer, lora_adapters) -> dict[str, str]:
    names = {"random-a": lora_adapters.random_a, "random-b": lora_adapters.random_b, "pirate": lora_adapters.pirate}
    for name, folder in names.items():
        response = quiver_server.register(name, folder)
        assert response.status_code == 201, response.text
    return {name: name for name in names}


def test_health_and_ready(quiver_server: QuiverServer) -> None:
    assert httpx.get(f"{quiver_server.base_url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{quiver_server.base_url}/ready").status_code == 200


def test_base_model_answers_a_factual_question(quiver_server: QuiverServer) -> None:
    answer = chat(quiver_server, quiver_server.model_name, "What is the capital of France?")
    assert "Paris" in answer


def test_registered_adapter_is_served_on_the_next_request(quiver_server: QuiverServer, registered) -> None:
    answer = chat(quiver_server, "pirate", "What is the capital of France?")
    assert answer == PIRATE_ANSWER
    base = chat(quiver_server, quiver_server.model_name, "What is the capital of France?")
    assert base != answer


def test_random_adapters_change_the_output(quiver_server: QuiverServer, registered) -> None:
    for name in ("random-a", "random-b"):
        outputs = [chat(quiver_server, name, prompt) for prompt in PROMPTS]
        bases = [chat(quiver_server, quiver_server.model_name, prompt) for prompt in PROMPTS]
        assert outputs != bases, f"{name} did not change any output"


def test_concurrent_mixed_batch_matches_solo_outputs(quiver_server: QuiverServer, registered) -> None:
    """Base and three adapters share batches; each request must get exactly its own adapter's output."""
    models = [quiver_server.model_name, "random-a", "random-b", "pirate"]
    jobs = [(model, prompt) for model in models for prompt in PROMPTS]
    solo = {job: chat(quiver_server, *job) for job in jobs}
    for order in (jobs, list(reversed(jobs))):
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(order)) as pool:
            together = dict(zip(order, pool.map(lambda job: chat(quiver_server, *job), order)))
        mismatches = {job: (solo[job], together[job]) for job in jobs if solo[job] != together[job]}
        assert not mismatches
    # The four models really differ, so a mix-up would have shown.
    assert len({solo[(model, PROMPTS[1])] for model in models}) == len(models)


def test_streaming_chat_equals_non_streaming(quiver_server: QuiverServer, registered) -> None:
    client = quiver_server.openai()
    for model in (quiver_server.model_name, "pirate"):
        stream = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=24,
                                                stream=True)
        chunks = list(stream)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == chat(quiver_server, model, QUESTION[0]["content"])
        assert all(chunk.usage is None for chunk in chunks), "usage was not asked for, so none is sent"


def test_streaming_usage_when_asked(quiver_server: QuiverServer, registered) -> None:
    stream = quiver_server.openai().chat.completions.create(
        model="pirate", messages=QUESTION, temperature=0, max_tokens=5, stream=True,
        stream_options={"include_usage": True},
    )
    usage = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert len(usage) == 1 and usage[0].completion_tokens == 5


def test_completions_stream_and_non_stream(quiver_server: QuiverServer, registered) -> None:
    client = quiver_server.openai()
    whole = client.completions.create(model="pirate", prompt="The sea is", max_tokens=8, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="pirate", prompt="The sea is", max_tokens=8, temperature=0, stream=True) if c.choices)
    assert whole.choices[0].text == streamed and len(streamed) > 0
    assert whole.usage.completion_tokens == 8


def test_models_lists_base_and_every_adapter_version(quiver_server: QuiverServer, registered) -> None:
    models = {m.id: m for m in quiver_server.openai().models.list()}
    assert quiver_server.model_name in models
    for name in registered:
        assert name in models and f"{name}@1" in models
        assert models[name].model_extra["parent"] == quiver_server.model_name
    assert quiver_server.openai().models.retrieve("pirate@1").id == "pirate@1"


def test_versions_pinning_promotion_and_deletion(quiver_server: QuiverServer, lora_adapters) -> None:
    name = "versioned"
    assert quiver_server.register(name, lora_adapters.random_a).json()["id"] == f"{name}@1"
    v1_answer = chat(quiver_server, name, PROMPTS[0])
    second = quiver_server.register(name, lora_adapters.pirate).json()
    assert second["version"] == 2 and second["current"] is True
    assert chat(quiver_server, name, PROMPTS[0]) == PIRATE_ANSWER
    assert chat(quiver_server, f"{name}@1", PROMPTS[0]) == v1_answer
    # Registered but not made current: the pinned version serves, the name does not move.
    third = quiver_server.register(name, lora_adapters.random_b, make_current="false").json()
    assert third["version"] == 3 and third["current"] is False
    assert chat(quiver_server, name, PROMPTS[0]) == PIRATE_ANSWER
    with quiver_server.admin() as admin:
        promoted = admin.post(f"/v1/adapters/{name}/promote", json={"version": 1})
        assert promoted.status_code == 200 and promoted.json()["current_version"] == 1
        assert chat(quiver_server, name, PROMPTS[0]) == v1_answer
        assert admin.delete(f"/v1/adapters/{name}@1").json()["deleted"] is True
        with pytest.raises(openai.NotFoundError):
            chat(quiver_server, f"{name}@1", PROMPTS[0])
        # The current version was deleted: no other version is made current behind the admin's back (v3 was
        # registered with make_current=false); the bare name is a 404 until a promote, pins still serve.
        assert admin.get(f"/v1/adapters/{name}").json()["current_version"] is None
        with pytest.raises(openai.NotFoundError):
            chat(quiver_server, name, PROMPTS[0])
        assert name not in {m.id for m in quiver_server.openai().models.list()}
        assert chat(quiver_server, f"{name}@3", PROMPTS[0])
        assert admin.post(f"/v1/adapters/{name}/promote", json={"version": 3}).json()["current_version"] == 3
        assert chat(quiver_server, name, PROMPTS[0]) == chat(quiver_server, f"{name}@3", PROMPTS[0])
        fourth = quiver_server.register(name, lora_adapters.pirate).json()
        assert fourth["version"] == 4, "version numbers are never reused"
        assert admin.delete(f"/v1/adapters/{name}").status_code == 200
        assert admin.get(f"/v1/adapters/{name}").json()["error"]["code"] == "adapter_not_found"
    with pytest.raises(openai.NotFoundError):
        chat(quiver_server, name, PROMPTS[0])
    assert not (quiver_server.store_dir / name / "2").exists()


def test_openai_error_classes(quiver_server: QuiverServer) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        chat(quiver_server, "no-such-adapter", "hi")
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        quiver_server.openai().chat.completions.create(model=quiver_server.model_name, messages=[])
    assert bad.value.status_code == 400
    with pytest.raises(openai.BadRequestError):  # the engine's own validation, passed through in the envelope
        quiver_server.openai().chat.completions.create(model=quiver_server.model_name, messages=QUESTION,
                                                       max_tokens=-1)
    with pytest.raises(openai.AuthenticationError):
        quiver_server.openai(key="wrong-key").models.list()
    with pytest.raises(openai.PermissionDeniedError):
        quiver_server.openai().post("/adapters/x/promote", body={"version": 1}, cast_to=object)


def test_malformed_json_is_a_400_envelope(quiver_server: QuiverServer) -> None:
    response = httpx.post(f"{quiver_server.base_url}/v1/chat/completions", content=b"{not json",
                          headers={"Authorization": f"Bearer {quiver_server.api_key}",
                                   "Content-Type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    # where it broke, said as such (FastAPI's offset is not a field name)
    assert error["message"].startswith("the request body is not valid JSON: ") and "at character 1" in error["message"]
    assert error["param"] is None


def test_metrics_count_requests_and_tokens_per_adapter(quiver_server: QuiverServer, registered) -> None:
    def scrape() -> str:
        return httpx.get(f"{quiver_server.base_url}/metrics").text

    def value(text: str, series: str) -> float:
        for line in text.splitlines():
            if line.startswith(series + " "):
                return float(line.split()[-1])
        return 0.0

    before = scrape()
    list(quiver_server.openai().chat.completions.create(model="random-b", messages=QUESTION, max_tokens=7,
                                                        temperature=0, stream=True))
    chat(quiver_server, "random-b", "hi", max_tokens=3)
    after = scrape()
    completion = 'quiver_completion_tokens_total{adapter="random-b"}'
    assert value(after, completion) - value(before, completion) == 7 + 3
    requests = 'quiver_requests_total{adapter="random-b",endpoint="chat/completions",model="random-b",status="200"}'
    assert value(after, requests) - value(before, requests) == 2
    assert value(after, "quiver_engine_up") == 1
    assert value(after, "quiver_adapters_registered") >= 3
    assert 'quiver_time_to_first_token_seconds_count{adapter="random-b"}' in after
    assert 'quiver_adapter_loads_total{adapter="random-b"}' in after
    assert "vllm:num_requests_running" in after


@pytest.mark.parametrize(
    ("form", "files", "status", "code"),
    [
        ({"name": "Bad/Name"}, "good", 400, "invalid_adapter_name"),
        ({"name": "../escape"}, "good", 400, "invalid_adapter_name"),
        ({"name": "pickled"}, "pickle", 400, "pickle_not_allowed"),
        ({"name": "no-config"}, "weights-only", 400, "missing_adapter_config"),
        ({"name": "too-big-rank"}, "rank-32", 400, "rank_too_large"),
    ],
)
def test_admission_refusals_store_nothing(quiver_server: QuiverServer, lora_adapters, form, files, status, code) -> None:
    adapter = lora_adapters.random_a
    config = json.loads((adapter / "adapter_config.json").read_text())
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    uploads = {
        "good": [("adapter_config.json", json.dumps(config)), ("adapter_model.safetensors", weights)],
        "pickle": [("adapter_config.json", json.dumps(config)), ("adapter_model.bin", b"\x80\x04cos\nsystem\n.")],
        "weights-only": [("adapter_model.safetensors", weights)],
        "rank-32": [("adapter_config.json", json.dumps({**config, "r": 32})), ("adapter_model.safetensors", weights)],
    }[files]
    with quiver_server.admin() as admin:
        response = admin.post("/v1/adapters", data=form, files=[("files", item) for item in uploads])
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert not (quiver_server.store_dir / form["name"]).exists()
    assert form["name"] not in {m.id for m in quiver_server.openai().models.list()}


def test_bad_uploads_under_traffic_harm_no_request(quiver_server: QuiverServer, lora_adapters, registered) -> None:
    """A stream of normal requests runs while bad adapters are thrown at the registry: none of them fails."""
    import threading

    config = (lora_adapters.random_a / "adapter_config.json").read_text()
    weights = (lora_adapters.random_a / "adapter_model.safetensors").read_bytes()
    zoo = [
        [("adapter_config.json", config), ("adapter_model.bin", b"\x80\x04.")],
        [("adapter_config.json", config), ("adapter_model.safetensors", weights[:1000])],
        [("adapter_config.json", "{broken"), ("adapter_model.safetensors", weights)],
        [("adapter_config.json", json.dumps({**json.loads(config), "use_dora": True})),
         ("adapter_model.safetensors", weights)],
        [("adapter_config.json", json.dumps({**json.loads(config), "target_modules": ["c_attn"]})),
         ("adapter_model.safetensors", weights)],
    ]
    statuses: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            reply = httpx.post(f"{quiver_server.base_url}/v1/chat/completions", timeout=120,
                               headers={"Authorization": f"Bearer {quiver_server.api_key}"},
                               json={"model": "random-a", "max_tokens": 8,
                                     "messages": [{"role": "user", "content": "hi"}]})
            statuses.append(reply.status_code)

    runners = [threading.Thread(target=traffic) for _ in range(2)]
    for runner in runners:
        runner.start()
    refusals = 0
    try:
        with quiver_server.admin() as admin:
            # At least 3 rounds, and on until the traffic has really run alongside (uploads are refused fast).
            while refusals < 3 * len(zoo) or (len(statuses) < 10 and refusals < 100 * len(zoo)):
                for number, uploads in enumerate(zoo):
                    refused = admin.post("/v1/adapters", data={"name": f"zoo-{number}"},
                                         files=[("files", item) for item in uploads])
                    assert 400 <= refused.status_code < 500, refused.text
                    refusals += 1
    finally:
        stop.set()
        for runner in runners:
            runner.join()
    print(f"\nzoo: {refusals} bad uploads refused while {len(statuses)} requests were served, "
          f"{sum(status != 200 for status in statuses)} lost")
    assert statuses and set(statuses) == {200}, statuses
    assert not any((quiver_server.store_dir / f"zoo-{n}").exists() for n in range(len(zoo)))


def test_oversized_bodies_get_413(quiver_server: QuiverServer) -> None:
    response = httpx.post(f"{quiver_server.base_url}/v1/chat/completions",
                          headers={"Authorization": f"Bearer {quiver_server.api_key}"},
                          content=b'{"model": "x", "messages": [], "pad": "' + b"x" * (5 * 1024 * 1024) + b'"}')
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
