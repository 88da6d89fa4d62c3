"""Two quiver servers sharing one adapter store, as replicas behind a load balancer would."""

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
                          extra_env={"QUIVER_FINETUNING_DIR": str(root / "finetuning")})
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
    ids = lambda server: {m.id for m in server.openai().models.list()}  # noqa: E731
    eventually(lambda: _assert(ids(quiver_server) == ids(second_replica)))

    with second_replica.admin() as admin:
        assert admin.delete("/v1/adapters/shared-pirate").status_code == 200

    def gone_on_first() -> None:
        try:
            ask(quiver_server, "shared-pirate")
        except openai.NotFoundError:
            return
        raise AssertionError("the first replica still serves a deleted adapter")

    eventually(gone_on_first)
    eventually(lambda: _assert(ids(quiver_server) == ids(second_replica)))


def _assert(condition: bool) -> None:
    assert condition
