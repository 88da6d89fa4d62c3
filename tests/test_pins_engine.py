"""Pinning on the real engine (vLLM's `pin_lora` behind quiver's engine-side route): a pinned version stays in
its slot and in the engine's CPU cache while more adapters than the free slots (and the CPU cache) go through,
and the engine survives batches that would need the pinned slot (the scheduler is kept off it).

How "stays loaded" is seen from outside: after pinning, the weights file behind `hot@1` and behind the unpinned
`cold@1` (the engine's own copies, under the gateway's state dir) are replaced by another adapter's. An adapter
the engine evicts is read again from that path on its next request, and answers like the other adapter; a
pinned one is never read again, and answers as before. `cold` is the control that shows the churn evicts."""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from quiver.testing import QuiverServer, random_adapter

PROMPT = [{"role": "user", "content": "Name three colours."}]


def answer(server: QuiverServer, model: str) -> str:
    reply = server.openai().chat.completions.create(model=model, messages=PROMPT, max_tokens=8, temperature=0)
    return reply.choices[0].message.content


@pytest.fixture(scope="module")
def pin_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("pins")
    adapters = {name: random_adapter(model_dir, root / "adapters" / name, seed=seed, scale=8.0)
                for seed, name in enumerate(("hot", "cold", "alt", "f1", "f2", "f3"), start=20)}
    # 2 slots, 1 kept for pins: the scheduler batches one adapter at a time; 2 adapters in the CPU cache.
    server = QuiverServer(model_dir=model_dir, store_dir=root / "store", state_dir=root / "state", extra_env={
        "QUIVER_MAX_LORAS": "2", "QUIVER_PINNED_SLOTS": "1", "QUIVER_MAX_CPU_LORAS": "2"})
    server.start()
    try:
        for name, folder in adapters.items():
            assert server.register(name, folder).status_code == 201
        yield server, adapters
    finally:
        server.stop()


def test_pinned_adapter_stays_loaded_under_churn(pin_server):
    server, adapters = pin_server
    with server.admin() as admin:
        response = admin.post("/v1/adapters/hot/pin")
        assert response.status_code == 200, response.text
        assert response.json()["pin"]["version"] == 1
        response = admin.post("/v1/adapters/cold/pin")  # the one pin slot is taken
        assert response.status_code == 409 and response.json()["error"]["code"] == "too_many_pins"

    before = {model: answer(server, model) for model in ("hot@1", "cold@1", "alt@1")}
    assert len(set(before.values())) == 3, before  # three adapters, three answers

    copies = server.state_dir / "engine-adapters"
    for model in ("hot@1", "cold@1"):
        weights = copies / model / "adapter_model.safetensors"
        assert weights.is_file()
        swap = weights.with_name("swap.tmp")
        shutil.copyfile(adapters["alt"] / "adapter_model.safetensors", swap)
        os.replace(swap, weights)  # a new file: the store's (hard-linked) one is untouched

    # More adapters than the one free slot and the CPU cache, 8 requests at a time, several rounds.
    churn = ["f1@1", "f2@1", "f3@1", "alt@1"] * 6
    with ThreadPoolExecutor(8) as pool:
        assert all(list(pool.map(lambda model: answer(server, model), churn)))

    assert answer(server, "cold@1") == before["alt@1"]  # evicted, read again: the control
    assert answer(server, "hot@1") == before["hot@1"]  # pinned: never read again

    # Unpinned, it leaves like any other: its next load reads the (swapped) file.
    with server.admin() as admin:
        response = admin.post("/v1/adapters/hot/unpin")
        assert response.status_code == 200 and response.json()["pin"] is None
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda model: answer(server, model), churn[:8]))
    assert answer(server, "hot@1") == before["alt@1"]


def test_engine_pin_route_is_sealed_and_checks_input(pin_server):
    server, _ = pin_server
    url = f"{server.engine_url}/quiver/pin_lora_adapter"
    assert httpx.post(url, json={"lora_name": "hot@1"}, timeout=30).status_code == 401
    key = {"Authorization": f"Bearer {server.engine_key}"}
    response = httpx.post(url, json={"lora_name": "nope@1"}, headers=key, timeout=30)
    assert response.status_code == 404 and response.json()["error"]["type"] == "NotFoundError"
    response = httpx.post(url, content=b"not json", headers=key, timeout=30)
    assert response.status_code == 400 and "lora_name" in response.json()["error"]["message"]
