"""The engine's LoRA options through a second real engine, against the session server (float32 slots, every layer
wrapped): QUIVER_LORA_DTYPE=bfloat16 (vLLM's --lora-dtype) and QUIVER_LORA_TARGET_MODULES (--lora-target-modules,
here the attention projections only). An adapter saved in bfloat16 (as many published adapters are) holds the same
values in either dtype, the engine plugin's kernel widens bfloat16 exactly, and layers left unwrapped compute what
wrapped layers with no adapter weights do: the answers must be the same tokens with the same logprobs, alone and
in mixed batches. An adapter training another layer is refused. The official openai client."""

from __future__ import annotations

import concurrent.futures
import shutil
from pathlib import Path

import pytest

from conftest import QuiverServer
from lora_factory import ATTENTION

PROMPTS = ["What is the capital of France?", "Write one sentence about the sea.", "List three fruits."]
NAME = "saved-bf16"


@pytest.fixture(scope="module")
def bf16_saved_adapter(lora_adapters, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("bf16-saved") / "adapter"
    shutil.copytree(lora_adapters.random_a, folder)
    weights = folder / "adapter_model.safetensors"
    save_file({key: value.bfloat16() for key, value in load_file(weights).items()}, weights)
    return folder


@pytest.fixture(scope="module")
def bf16_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("bf16-server")
    server = QuiverServer(model_dir=model_dir, store_dir=root / "store", state_dir=root / "state",
                          extra_env={"QUIVER_LORA_DTYPE": "bfloat16", "QUIVER_LORA_TARGET_MODULES": ",".join(ATTENTION)})
    try:
        yield server.start()
    finally:
        server.stop()


def answer(server: QuiverServer, model: str, prompt: str) -> tuple[list[str], list[float]]:
    reply = server.openai().completions.create(model=model, prompt=prompt, temperature=0, max_tokens=16, logprobs=1)
    return reply.choices[0].logprobs.tokens, reply.choices[0].logprobs.token_logprobs


def test_a_bfloat16_saved_adapter_answers_the_same_from_bfloat16_attention_only_slots(
        quiver_server: QuiverServer, bf16_server: QuiverServer, bf16_saved_adapter: Path, lora_adapters) -> None:
    for server in (quiver_server, bf16_server):
        registered = server.register(NAME, bf16_saved_adapter)
        assert registered.status_code == 201, registered.text
    float32_slots = {prompt: answer(quiver_server, NAME, prompt) for prompt in PROMPTS}
    bfloat16_slots = {prompt: answer(bf16_server, NAME, prompt) for prompt in PROMPTS}
    assert bfloat16_slots == float32_slots  # tokens and logprobs, exactly
    base = {prompt: answer(bf16_server, bf16_server.model_name, prompt)[0] for prompt in PROMPTS}
    assert base != {prompt: tokens for prompt, (tokens, _) in bfloat16_slots.items()}  # the adapter acts

    # In mixed batches (base and adapter requests together) each request still gets its own answer.
    jobs = [(model, prompt) for model in (bf16_server.model_name, NAME) for prompt in PROMPTS]
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        together = dict(zip(jobs, pool.map(lambda job: answer(bf16_server, *job)[0], jobs)))
    assert {prompt: together[(NAME, prompt)] for prompt in PROMPTS} == {
        prompt: tokens for prompt, (tokens, _) in bfloat16_slots.items()}
    assert {prompt: together[(bf16_server.model_name, prompt)] for prompt in PROMPTS} == base

    # An adapter that also trains down_proj, which this engine leaves unwrapped: refused, nothing stored.
    refused = bf16_server.register("trains-mlp", lora_adapters.random_b)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "target_module_not_served"
    assert "down_proj" in refused.json()["error"]["message"]
    assert "trains-mlp" not in {a["name"] for a in bf16_server.admin().get("/v1/adapters").json()["data"]}
