"""Register, promote and delete adapter versions while traffic uses them, through the real server.

No request may fail except with a 404 for a version that was really gone; every answer must be exactly the
output of the version that served it (the engine's `model` field says which); a request that started on a
version finishes on it, and a deleted version leaves the engine only after its last request.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass

import openai
import pytest

from conftest import QuiverServer

PROMPT = [{"role": "user", "content": "Write one sentence about the sea."}]
SHORT = {"temperature": 0, "max_tokens": 24}
LONG = {"temperature": 0, "max_tokens": 160, "extra_body": {"ignore_eos": True}}


def ask(client: openai.OpenAI, model: str, stream: bool, params: dict) -> tuple[str, str]:
    """(the `name@version` that served it, the text)."""
    if not stream:
        reply = client.chat.completions.create(model=model, messages=PROMPT, **params)
        return reply.model, reply.choices[0].message.content
    served, text = set(), []
    for chunk in client.chat.completions.create(model=model, messages=PROMPT, stream=True, **params):
        served.add(chunk.model)
        text += [choice.delta.content or "" for choice in chunk.choices]
    assert len(served) == 1, f"one stream, several models: {served}"
    return served.pop(), "".join(text)


def wait_for(condition, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


@pytest.fixture(scope="module")
def expected(quiver_server: QuiverServer, lora_adapters) -> dict[tuple[str, str], str]:
    """Each adapter's answer on its own, short and long: what any version with those weights must say."""
    weights = {"a": lora_adapters.random_a, "b": lora_adapters.random_b, "p": lora_adapters.pirate}
    client = quiver_server.openai()
    answers = {}
    with quiver_server.admin() as admin:
        for kind, folder in weights.items():
            assert quiver_server.register(f"churn-ref-{kind}", folder).status_code == 201
            for length, params in (("short", SHORT), ("long", LONG)):
                answers[kind, length] = ask(client, f"churn-ref-{kind}", False, params)[1]
            assert admin.delete(f"/v1/adapters/churn-ref-{kind}").status_code == 200
    assert len({answers[kind, "short"] for kind in weights}) == 3, "the adapters must be told apart by their answers"
    return answers


def test_a_stream_finishes_on_its_version_through_promotion_and_deletion(quiver_server, lora_adapters,
                                                                        expected) -> None:
    name = "inflight"
    assert quiver_server.register(name, lora_adapters.random_a).status_code == 201
    assert quiver_server.register(name, lora_adapters.pirate, make_current="false").status_code == 201
    stream = quiver_server.openai().chat.completions.create(model=name, messages=PROMPT, stream=True, **LONG)
    chunks = iter(stream)
    first = next(chunks)
    assert first.model == f"{name}@1"
    with quiver_server.admin() as admin:
        assert admin.post(f"/v1/adapters/{name}/promote", json={"version": 2}).status_code == 200
        assert admin.delete(f"/v1/adapters/{name}@1").status_code == 200
    # Gone for new requests at once; still in the engine for the stream that runs on it.
    assert f"{name}@1" not in {m.id for m in quiver_server.openai().models.list()}
    assert f"{name}@1" in quiver_server.engine_models()
    rest = list(chunks)
    text = "".join(c.choices[0].delta.content or "" for c in [first, *rest] if c.choices)
    assert {c.model for c in rest} == {f"{name}@1"}
    assert text == expected["a", "long"], "the stream did not finish on the version it started on"
    wait_for(lambda: f"{name}@1" not in quiver_server.engine_models(), "the deleted version was never unloaded")
    with pytest.raises(openai.NotFoundError):
        ask(quiver_server.openai(), f"{name}@1", False, SHORT)
    assert ask(quiver_server.openai(), name, False, SHORT) == (f"{name}@2", expected["p", "short"])
    with quiver_server.admin() as admin:
        assert admin.delete(f"/v1/adapters/{name}").status_code == 200


@dataclass
class Outcome:
    model: str
    stream: bool
    started: float
    ended: float
    status: int | str
    served: str | None = None
    text: str | None = None


def test_register_promote_delete_under_traffic(quiver_server: QuiverServer, lora_adapters, expected) -> None:
    name = "churn"
    folders = {"a": lora_adapters.random_a, "b": lora_adapters.random_b, "p": lora_adapters.pirate}
    weights: dict[int, str] = {}  # version -> which weights it holds
    deleted_sent: dict[int, float] = {}  # version -> when its deletion was sent
    deleted_done: dict[int, float] = {}
    outcomes: list[Outcome] = []
    stop = threading.Event()

    def register(kind: str, current: bool = True) -> None:
        form = {} if current else {"make_current": "false"}
        response = quiver_server.register(name, folders[kind], **form)
        assert response.status_code == 201, response.text
        weights[response.json()["version"]] = kind

    def delete(version: int | None) -> None:
        doomed = [version] if version is not None else [v for v in weights if v not in deleted_sent]
        sent = time.monotonic()
        for number in doomed:
            deleted_sent[number] = sent
        with quiver_server.admin() as admin:
            response = admin.delete(f"/v1/adapters/{name}" + (f"@{version}" if version is not None else ""))
        assert response.status_code == 200, response.text
        for number in doomed:
            deleted_done[number] = time.monotonic()

    def promote(version: int) -> None:
        with quiver_server.admin() as admin:
            response = admin.post(f"/v1/adapters/{name}/promote", json={"version": version})
        assert response.status_code == 200, response.text

    def traffic(seed: int) -> None:
        rng = random.Random(seed)
        client = quiver_server.openai(timeout=300)
        while not stop.is_set():
            live = [v for v in list(weights) if v not in deleted_sent]
            gone = [v for v in list(weights) if v in deleted_sent]
            roll = rng.random()
            if roll < 0.25 and live:
                model = f"{name}@{rng.choice(live)}"
            elif roll < 0.3 and gone:
                model = f"{name}@{rng.choice(gone)}"  # asked for on purpose: must be a clean 404
            else:
                model = name
            stream = rng.random() < 0.5
            outcome = Outcome(model, stream, time.monotonic(), 0.0, "?")
            try:
                outcome.served, outcome.text = ask(client, model, stream, SHORT)
                outcome.status = 200
            except openai.NotFoundError as refused:
                outcome.status = 404 if refused.code == "model_not_found" else f"404 {refused.code}"
            except Exception as error:  # noqa: BLE001 - every other outcome is a failure, reported below
                outcome.status = f"{type(error).__name__}: {error}"
            outcome.ended = time.monotonic()
            outcomes.append(outcome)
            if outcome.status != 200:
                time.sleep(0.2)  # refusals are instant: don't let them crowd out the requests that generate

    register("a")  # v1
    workers = [threading.Thread(target=traffic, args=(seed,)) for seed in range(4)]
    for worker in workers:
        worker.start()
    try:
        nth = lambda n: sorted(weights)[n - 1]  # noqa: E731 - the n-th version registered in this test
        steps = [lambda: register("p"), lambda: register("b", current=False), lambda: promote(nth(3)),
                 lambda: delete(nth(1)), lambda: register("a"), lambda: promote(nth(2)), lambda: delete(nth(3)),
                 lambda: delete(nth(4)), lambda: register("b"), lambda: delete(nth(2)), lambda: promote(nth(5)),
                 lambda: delete(None)]
        for step in steps:
            # Paced by the traffic, not the clock (this machine may be slow): every worker answers in between.
            done = len(outcomes)
            wait_for(lambda: len(outcomes) >= done + len(workers), "the traffic stalled", 120)
            step()
        time.sleep(1.0)  # requests for the deleted adapter now, all 404
    finally:
        stop.set()
        for worker in workers:
            worker.join(300)

    failures = []
    for o in outcomes:
        pinned = int(o.model.partition("@")[2]) if "@" in o.model else None
        if o.status == 200:
            served = int(o.served.partition("@")[2])
            if pinned is not None and served != pinned:
                failures.append(f"{o.model} was served by {o.served}")
            elif o.text != expected[weights[served], "short"]:
                failures.append(f"{o.model} ({o.served}) answered {o.text!r}: not that version's output")
            elif served in deleted_done and o.started > deleted_done[served]:
                failures.append(f"{o.model} was served by {o.served} after its deletion had finished")
        elif o.status == 404:
            # Legitimate only if what it asked for was deleted before the answer came back.
            gone = deleted_sent.get(pinned) if pinned is not None else (
                max(deleted_sent.values()) if len(deleted_sent) == len(weights) else None)
            if gone is None or gone > o.ended:
                failures.append(f"{o.model}: 404 though it existed for the whole request")
        else:
            failures.append(f"{o.model} (stream={o.stream}): {o.status}")
    served = sum(o.status == 200 for o in outcomes)
    print(f"\nchurn: {len(outcomes)} requests, {served} served, "
          f"{sum(o.status == 404 for o in outcomes)} legitimate 404s, {len(failures)} failures")
    assert not failures, "\n".join(failures[:20])
    assert served >= len(steps)
    assert {o.served for o in outcomes if o.status == 200} >= {f"{name}@{v}" for v in sorted(weights)[:3]}
    wait_for(lambda: not any(m.startswith(f"{name}@") for m in quiver_server.engine_models()),
             "deleted versions stayed loaded in the engine")
