"""Pinned adapters on the fake engine: the API, its refusals, persistence shared by replicas and engine restarts,
and that a deleted or moved pin frees its engine slot (vLLM's unload alone would not). The real engine:
test_pins_engine.py."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from quiver.fake_engine import FakeEngine
from quiver.settings import Settings
from quiver.testing import API_KEY, InProcessGateway

BASE = "SmolLM2-135M-Instruct"
PINNING = {"max_loras": 4, "pinned_slots": 1}  # one of four slots kept for pins




def pin(gateway: InProcessGateway, name: str, **body):
    with gateway.admin() as admin:
        return admin.post(f"/v1/adapters/{name}/pin", json=body or None)


def unpin(gateway: InProcessGateway, name: str):
    with gateway.admin() as admin:
        return admin.post(f"/v1/adapters/{name}/unpin")


def error(response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    return body["error"]


def test_pin_current_version_shown_and_held_by_engine(make_gateway, fake_adapter: Path):
    engine = FakeEngine(BASE)
    gateway = make_gateway(engine, **PINNING)
    assert gateway.register("bot", fake_adapter).status_code == 201
    assert gateway.register("bot", fake_adapter).status_code == 201  # bot@2 current
    with gateway.admin() as admin:
        assert admin.get("/v1/adapters/bot").json()["pin"] is None

    response = pin(gateway, "bot")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["pin"]["version"] == 2 and body["pin"]["by"].startswith("key sha256:")
    assert abs(body["pin"]["at"] - time.time()) < 60
    assert engine.pinned == {"bot@2"}
    with gateway.admin() as admin:
        assert admin.get("/v1/adapters/bot").json()["pin"]["version"] == 2
        assert [a["pin"] for a in admin.get("/v1/adapters").json()["data"]][0]["version"] == 2

    # Pinning another version moves the pin: the old one's slot is let go.
    assert pin(gateway, "bot", version=1).json()["pin"]["version"] == 1
    assert engine.pinned == {"bot@1"}

    response = unpin(gateway, "bot")
    assert response.status_code == 200 and response.json()["pin"] is None
    assert engine.pinned == set()
    assert "bot@1" in engine.loaded  # still registered and servable
    reply = gateway.openai().chat.completions.create(model="bot@1", messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=2)
    assert reply.model == "bot@1"


def test_pin_refusals_are_openai_errors(make_gateway, fake_adapter: Path):
    gateway = make_gateway(**PINNING)
    for name in ("a", "b"):
        assert gateway.register(name, fake_adapter).status_code == 201

    response = pin(gateway, "nope")
    assert response.status_code == 404 and error(response)["code"] == "adapter_not_found"
    response = pin(gateway, "a", version=7)
    assert response.status_code == 404 and error(response)["code"] == "version_not_found"
    response = pin(gateway, "a", version="1")  # strict: a string is not a version
    assert response.status_code == 400, response.text
    response = pin(gateway, "a", version=1, extra=True)
    assert response.status_code == 400, response.text
    response = unpin(gateway, "a")
    assert response.status_code == 404 and error(response)["code"] == "pin_not_found"
    response = pin(gateway, "Bad Name!")
    assert response.status_code == 400, response.text

    # One slot kept for pins: a second name is refused, naming the pinned one; the same name may re-pin.
    assert pin(gateway, "a").status_code == 200
    assert pin(gateway, "a").status_code == 200
    response = pin(gateway, "b")
    assert response.status_code == 409
    assert error(response)["code"] == "too_many_pins" and "a" in error(response)["message"]
    assert unpin(gateway, "a").status_code == 200
    assert pin(gateway, "b").status_code == 200


def test_pinning_off_and_the_bound_is_checked_at_start(make_gateway, fake_adapter: Path, model_dir: Path,
                                                        tmp_path: Path):
    gateway = make_gateway(**{**PINNING, "pinned_slots": 0})
    assert gateway.register("a", fake_adapter).status_code == 201
    response = pin(gateway, "a")
    assert response.status_code == 409 and error(response)["code"] == "pinning_disabled"
    assert "QUIVER_PINNED_SLOTS" in error(response)["message"]
    with pytest.raises(ValueError, match="pinned_slots must be below max_loras"):
        Settings(model_cache_dir=model_dir.parent, state_dir=tmp_path / "s", max_loras=4, pinned_slots=4)


def test_pin_needs_admin(make_gateway, fake_adapter: Path):
    gateway = make_gateway(**PINNING)
    assert gateway.register("a", fake_adapter).status_code == 201
    with httpx.Client(base_url=gateway.base_url, headers={"Authorization": f"Bearer {API_KEY}"}) as caller:
        response = caller.post("/v1/adapters/a/pin")
    assert response.status_code in (401, 403) and "error" in response.json()


def test_pin_survives_engine_restart_and_reaches_other_replicas(make_gateway, fake_adapter: Path):
    engine = FakeEngine(BASE)
    first = make_gateway(engine, store_poll_s=0.2, **PINNING)
    other_engine = FakeEngine(BASE)
    second = make_gateway(other_engine, state="state-2", store_poll_s=0.2, **PINNING)
    assert first.register("bot", fake_adapter).status_code == 201
    assert pin(first, "bot").status_code == 200

    engine.threadsafe(engine.restart)  # a new engine process knows no adapters: the pin is loaded and applied
    assert engine.pinned == {"bot@1"}

    deadline = time.monotonic() + 10
    while other_engine.pinned != {"bot@1"} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert other_engine.pinned == {"bot@1"}
    with second.admin() as admin:
        assert admin.get("/v1/adapters/bot").json()["pin"]["version"] == 1

    # An unpin on one replica reaches the other's engine too.
    assert unpin(first, "bot").status_code == 200
    deadline = time.monotonic() + 10
    while other_engine.pinned and time.monotonic() < deadline:
        time.sleep(0.1)
    assert other_engine.pinned == set()

    # A restarted gateway reads the pin back from the store.
    assert pin(second, "bot").status_code == 200
    third_engine = FakeEngine(BASE)
    make_gateway(third_engine, state="state-3", **PINNING)
    assert third_engine.pinned == {"bot@1"}


def test_deleting_a_pinned_version_frees_its_slot(make_gateway, fake_adapter: Path):
    engine = FakeEngine(BASE)
    gateway = make_gateway(engine, **PINNING)
    for name in ("a", "b"):
        assert gateway.register(name, fake_adapter).status_code == 201
    assert pin(gateway, "a").status_code == 200
    with gateway.admin() as admin:
        assert admin.delete("/v1/adapters/a@1").status_code == 200
        assert admin.get("/v1/adapters/a").status_code == 404  # its only version
    # Unpinned before the unload: vLLM's unload alone leaves the worker's pin (and its slot) behind.
    assert engine.pinned == set()
    assert engine.pin_calls[-1] == ("a@1", False)
    assert "a@1" not in engine.loaded
    # The pin's slot is free for another name.
    assert pin(gateway, "b").status_code == 200
