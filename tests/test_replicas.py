"""Two quiver servers sharing one adapter store, as replicas behind a load balancer would.

The second replica runs vLLM's stock CPU LoRA path (QUIVER_CPU_LORA_PLUGIN=0), the first quiver's plugin,
so the same requests on both also prove the plugin changes no output.
"""

from __future__ import annotations

import time

import openai
import pytest

from conftest import PIRATE_ANSWER, QuiverServer

POLL_BOUND_S = 15  # the store is re-read every 2 s; generous for a busy CI machine


@pytest.fixture(scope="module")
def second_replica(quiver_server: QuiverServer, model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("replica")
    server = QuiverServer(model_dir=model_dir, store_dir=quiver_server.store_dir, state_dir=root / "state",
                          extra_env={"QUIVER_FINETUNING_DIR": str(root / "finetuning"),
                                     "QUIVER_CPU_LORA_PLUGIN": "0"})
    try:
        yield server.start()
    finally:
        server.stop()


def ask(server: QuiverServer, model: str) -> str:
    reply = server.openai().chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0,
        max_tokens=16)
    return reply.choices[0].message.content


def eventually(check, timeout_s: float = POLL_BOUND_S):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return check()
        except (AssertionError, openai.NotFoundError):  # not yet seen by the other replica
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_register_on_one_serve_on_the_other_delete_on_the_other(quiver_server, second_replica, lora_adapters):
    assert quiver_server.register("shared-pirate", lora_adapters.pirate).status_code == 201
    assert eventually(lambda: ask(second_replica, "shared-pirate")) == PIRATE_ANSWER
    eventually(lambda: require(model_ids(quiver_server) == model_ids(second_replica)))

    with second_replica.admin() as admin:
        assert admin.delete("/v1/adapters/shared-pirate").status_code == 200

    eventually(lambda: stopped_serving(quiver_server, "shared-pirate"))
    eventually(lambda: require(model_ids(quiver_server) == model_ids(second_replica)))


def model_ids(server: QuiverServer) -> set[str]:
    return {m.id for m in server.openai().models.list()}


def stopped_serving(server: QuiverServer, model: str) -> None:
    try:
        ask(server, model)
    except openai.NotFoundError:
        return
    raise AssertionError(f"{server.base_url} still serves the deleted {model}")


def require(condition: bool) -> None:
    assert condition


def test_the_engine_plugin_gives_exactly_the_stock_outputs(quiver_server, second_replica, lora_adapters):
    names = {"parity-a": lora_adapters.random_a, "parity-b": lora_adapters.random_b}
    for name, folder in names.items():
        assert quiver_server.register(name, folder).status_code == 201
    prompts = ["What is the capital of France?", "Write one sentence about the sea.", "List three fruits."]
    for name in names:
        eventually(lambda: ask(second_replica, name))

    def answer(server: QuiverServer, model: str, prompt: str) -> str:
        return server.openai().chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=32,
        ).choices[0].message.content

    for model in [quiver_server.model_name, *names]:
        for prompt in prompts:
            assert answer(quiver_server, model, prompt) == answer(second_replica, model, prompt), (model, prompt)
    stock_log = (second_replica.state_dir / "engine.log").read_text()
    assert "quiver CPU LoRA plugin active" not in stock_log
    assert "quiver CPU LoRA plugin active" in (quiver_server.state_dir / "engine.log").read_text()
