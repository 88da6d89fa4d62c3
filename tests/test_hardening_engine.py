"""Hardening checks that cross the engine: the real `quiver serve` (tests/conftest.py's session server), the
official openai client. The gateway-only checks are in test_hardening.py."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from conftest import QuiverServer

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def greedy(server: QuiverServer, model: str) -> str:
    reply = server.openai().chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=16)
    return reply.choices[0].message.content


@pytest.fixture(scope="module")
def untrained_adapter(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PEFT's default initialisation (B = 0), saved before any training step, as a forgetful pipeline would."""
    from peft import LoraConfig, get_peft_model

    from lora_factory import ATTENTION, load_base

    out = tmp_path_factory.mktemp("untrained") / "adapter"
    model = get_peft_model(load_base(model_dir), LoraConfig(r=8, lora_alpha=16, target_modules=ATTENTION,
                                                            task_type="CAUSAL_LM"))
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.mark.parametrize("model", ["hard-pin@²", "hard-pin@01", "hard-pin@0", "hard-pin@99999999999", "Hard-Pin"])
def test_malformed_model_ids_are_400_through_the_openai_client(quiver_server: QuiverServer, lora_adapters,
                                                                model: str) -> None:
    if "hard-pin" not in {a["name"] for a in quiver_server.admin().get("/v1/adapters").json()["data"]}:
        assert quiver_server.register("hard-pin", lora_adapters.random_a).status_code == 201
    client = quiver_server.openai()
    for call in (lambda: client.chat.completions.create(model=model, messages=QUESTION, max_tokens=4),
                 lambda: client.completions.create(model=model, prompt="hi", max_tokens=4),
                 lambda: client.models.retrieve(model)):
        with pytest.raises(openai.BadRequestError) as refused:
            call()
        assert refused.value.code == "invalid_model_id"
    assert greedy(quiver_server, "hard-pin@1")  # the well-formed spelling serves


@pytest.mark.parametrize("params", [{"n": 100.0}, {"n": "100"}, {"n": 9}, {"max_tokens": "100"},
                                    {"max_tokens": 5.0}, {"max_completion_tokens": 1e9}, {"top_logprobs": 2.0}])
def test_numbers_must_be_integers_and_capped_before_the_engine(quiver_server: QuiverServer, params: dict) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        quiver_server.openai().chat.completions.create(model=quiver_server.model_name, messages=QUESTION,
                                                       **params)
    assert refused.value.body["param"] == next(iter(params))
    # The same values as JSON integers within the caps are served.
    served = quiver_server.openai().chat.completions.create(model=quiver_server.model_name, messages=QUESTION,
                                                            n=2, max_tokens=3)  # n > 1: not greedy
    assert len(served.choices) == 2 and served.usage.completion_tokens <= 6


def test_a_version_not_made_current_is_never_served_under_the_bare_name(quiver_server: QuiverServer,
                                                                         lora_adapters) -> None:
    name = "hard-quiet"
    first = quiver_server.register(name, lora_adapters.pirate, make_current="false")
    assert first.status_code == 201 and first.json()["current"] is False
    client = quiver_server.openai()
    with pytest.raises(openai.NotFoundError):
        greedy(quiver_server, name)
    pinned = greedy(quiver_server, f"{name}@1")
    ids = {m.id for m in client.models.list()}
    assert f"{name}@1" in ids and name not in ids
    with quiver_server.admin() as admin:
        assert admin.get(f"/v1/adapters/{name}").json()["current_version"] is None
        second = quiver_server.register(name, lora_adapters.random_a)
        assert second.json()["current"] is True
        # Deleting the current version: no other one takes over, pins still serve.
        assert admin.delete(f"/v1/adapters/{name}@2").status_code == 200
        with pytest.raises(openai.NotFoundError):
            greedy(quiver_server, name)
        assert greedy(quiver_server, f"{name}@1") == pinned
        assert admin.post(f"/v1/adapters/{name}/promote", json={"version": 1}).json()["current_version"] == 1
        assert greedy(quiver_server, name) == pinned
        assert admin.delete(f"/v1/adapters/{name}").status_code == 200


def test_a_noop_adapter_is_served_with_its_warning_shown(quiver_server: QuiverServer,
                                                         untrained_adapter: Path) -> None:
    registered = quiver_server.register("hard-noop", untrained_adapter)
    assert registered.status_code == 201, registered.text
    warnings = registered.json()["warnings"]
    assert len(warnings) == 1 and warnings[0].startswith("noop_adapter:")
    cards = {m.id: m for m in quiver_server.openai().models.list()}
    assert cards["hard-noop"].model_extra["warnings"] == warnings == cards["hard-noop@1"].model_extra["warnings"]
    assert cards[quiver_server.model_name].model_extra["warnings"] == []
    with quiver_server.admin() as admin:
        assert admin.get("/v1/adapters/hard-noop").json()["versions"][0]["warnings"] == warnings
    # The warning is true: through the real engine, it answers exactly as the base model does.
    assert greedy(quiver_server, "hard-noop") == greedy(quiver_server, quiver_server.model_name)
    with quiver_server.admin() as admin:
        assert admin.delete("/v1/adapters/hard-noop").status_code == 200


def test_request_counter_labels_come_from_the_registry(quiver_server: QuiverServer, lora_adapters) -> None:
    if "hard-pin" not in {a["name"] for a in quiver_server.admin().get("/v1/adapters").json()["data"]}:
        assert quiver_server.register("hard-pin", lora_adapters.random_a).status_code == 201
    for model in ["hard-pin@01", "hard-pin@001", "hard-pin@1", "no-such-model-xyz", "hard-pin"]:
        try:
            greedy(quiver_server, model)
        except openai.APIStatusError:
            pass
    with quiver_server.admin() as admin:
        text = admin.get("/metrics").text
    labels = {line.split("model=")[1].split('"')[1] for line in text.splitlines()
              if line.startswith("quiver_requests_total{")}
    assert "hard-pin@1" in labels and "hard-pin" in labels and "unknown" in labels
    assert not any("@0" in label or "xyz" in label for label in labels), labels


def test_unauthenticated_upload_is_refused_before_its_body(quiver_server: QuiverServer) -> None:
    """Announce 200 MiB, send none of it: the 401 comes back at once (the server neither waits for nor
    spools the body)."""
    import socket

    with socket.create_connection(("127.0.0.1", quiver_server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/adapters HTTP/1.1\r\nHost: quiver\r\n"
                     b"Content-Type: multipart/form-data; boundary=x\r\n"
                     b"Content-Length: %d\r\n\r\n" % (200 * 1024 * 1024))
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401"), head
    assert b'"missing_api_key"' in body
