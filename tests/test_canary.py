"""Canary traffic between two versions of one adapter name, in process on the fake engine (whose tokens name
the version that answered): the split, stickiness, pins, the API's refusals, persistence shared by replicas,
automatic rollback, promotion, and the per-version metrics. The same split on the real engine:
test_canary_engine.py."""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import httpx
import openai
import pytest

from quiver.adapters.canary import Canary, CanaryWatch, RollbackPolicy, choose_version, sticky_point
from quiver.engine_client import EngineResponse
from quiver.fake_engine import FakeEngine, _FakeResponse, fake_text
from quiver.testing import API_KEY, InProcessGateway

BASE = "SmolLM2-135M-Instruct"
MESSAGES = [{"role": "user", "content": "Hi"}]


class BrokenVersionEngine(FakeEngine):
    """The fake engine, except that the versions in `broken` fail every generation with a 500 (as vLLM does
    when its core fails a request): a canary that is bad for real, while the current version is healthy."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.broken: set[str] = set()

    async def generate(self, endpoint: str, body: dict) -> EngineResponse:
        if body.get("model") in self.broken:
            self.requests.append(body)
            error = {"error": {"message": "fake: EngineCore failed", "type": "InternalServerError", "code": 500}}
            return _FakeResponse(self, 500, None, json.dumps(error).encode())
        return await super().generate(endpoint, body)




def two_versions(gateway: InProcessGateway, adapter: Path, name: str = "bot") -> None:
    """`name@1` current, `name@2` registered beside it (not current): the canary's candidate."""
    assert gateway.register(name, adapter).status_code == 201
    assert gateway.register(name, adapter, make_current="false").status_code == 201


def answered_by(reply) -> str:
    """Which version answered: the fake engine's tokens name it, and so must the response's `model`."""
    content = reply.choices[0].message.content
    model = content.split("#")[0]
    assert content == fake_text(model, 2)
    assert reply.model == model
    return model


def ask(gateway: InProcessGateway, model: str = "bot", client=None, **kwargs):
    client = client or gateway.openai()
    return client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2, **kwargs)


def put_canary(gateway: InProcessGateway, name: str = "bot", **body) -> httpx.Response:
    with gateway.admin() as admin:
        return admin.put(f"/v1/adapters/{name}/canary", json=body)


# --- the split, unit level -------------------------------------------------------------------------------


def test_sticky_point_is_stable_and_uniform():
    assert sticky_point("bot", "alice") == sticky_point("bot", "alice")
    assert sticky_point("bot", "alice") != sticky_point("other", "alice")
    points = [sticky_point("bot", f"user-{i}") for i in range(4000)]
    assert all(0 <= p < 1 for p in points)
    below = sum(p < 0.1 for p in points) / len(points)
    assert 0.08 < below < 0.12, below  # 10% of users, within ~3 standard deviations


def test_choose_version_weights_and_monotone_stickiness():
    canary = Canary(name="bot", version=2, weight=0.3, rollback=RollbackPolicy(), started_at=0)
    rng = random.Random(7)
    draws = Counter(choose_version(canary, 1, None, rng) for _ in range(10_000))
    assert abs(draws[2] / 10_000 - 0.3) < 0.02, draws
    # Raising the weight only moves callers onto the canary, never back.
    wider = canary.model_copy(update={"weight": 0.6})
    users = [f"u{i}" for i in range(500)]
    at_30 = {u for u in users if choose_version(canary, 1, u, rng) == 2}
    at_60 = {u for u in users if choose_version(wider, 1, u, rng) == 2}
    assert at_30 < at_60


def test_watch_needs_the_minimum_sample_then_compares_with_the_margin():
    canary = Canary(name="bot", version=2, weight=0.5, started_at=0,
                    rollback=RollbackPolicy(window_s=60, min_requests=10, max_error_rate_margin=0.2))
    now = [1000.0]
    watch = CanaryWatch(canary, clock=lambda: now[0])
    for _ in range(9):
        watch.record(2, True)
        watch.record(1, False)
    assert watch.verdict(1) is None  # 9 < min_requests: too few to judge, however bad
    watch.record(2, False)
    watch.record(1, False)
    reason = watch.verdict(1)  # 90% against 0%
    assert reason is not None and reason.startswith("rolled_back: error rate 90.0% (9/10)")
    # Outside the window the old outcomes no longer count.
    now[0] += 61
    assert watch.verdict(1) is None
    # Within the margin: 2 errors in 10 (20%) against 10%, a difference of 10 points < 20.
    for i in range(10):
        watch.record(2, i < 2)
        watch.record(1, i < 1)
    assert watch.verdict(1) is None


# --- through the API ---------------------------------------------------------------------------------------


def test_canary_splits_by_weight_and_pins_are_never_split(make_gateway, fake_adapter):
    gateway = make_gateway()
    two_versions(gateway, fake_adapter)
    assert {answered_by(ask(gateway)) for _ in range(10)} == {"bot@1"}  # no canary: the current version
    response = put_canary(gateway, version=2, weight=0.5)
    assert response.status_code == 200, response.text
    assert response.json()["active"] and response.json()["weight"] == 0.5
    client = gateway.openai()
    counts = Counter(answered_by(ask(gateway, client=client)) for _ in range(300))
    # 300 draws at p=0.5: standard deviation ~8.7; 40 is more than 4 of them.
    assert counts.keys() == {"bot@1", "bot@2"} and abs(counts["bot@2"] - 150) < 40, counts
    assert {answered_by(ask(gateway, "bot@1", client=client)) for _ in range(30)} == {"bot@1"}
    assert {answered_by(ask(gateway, "bot@2", client=client)) for _ in range(30)} == {"bot@2"}
    # Streams are split the same way and say which version answered in every chunk.
    stream = client.chat.completions.create(model="bot", messages=MESSAGES, max_tokens=2, stream=True, user="s1")
    models = {chunk.model for chunk in stream}
    assert len(models) == 1 and models <= {"bot@1", "bot@2"}


def test_sticky_per_user_and_per_session_header(make_gateway, fake_adapter):
    gateway = make_gateway()
    two_versions(gateway, fake_adapter)
    assert put_canary(gateway, version=2, weight=0.5).status_code == 200
    client = gateway.openai()
    by_user = {}
    for i in range(16):
        seen = {answered_by(ask(gateway, client=client, user=f"user-{i}")) for _ in range(4)}
        assert len(seen) == 1, (i, seen)  # one user, one version
        by_user[f"user-{i}"] = seen.pop()
        expected = "bot@2" if sticky_point("bot", f"user-{i}") < 0.5 else "bot@1"
        assert by_user[f"user-{i}"] == expected
    assert set(by_user.values()) == {"bot@1", "bot@2"}
    # The header wins over `user`: the session decides, whatever user is sent.
    session = next(f"s{i}" for i in range(100) if sticky_point("bot", f"s{i}") < 0.5)
    seen = {answered_by(ask(gateway, client=client, user=f"other-{i}", extra_headers={"x-quiver-session": session}))
            for i in range(8)}
    assert seen == {"bot@2"}


def test_canary_refusals_are_clear_4xx(make_gateway, fake_adapter):
    gateway = make_gateway()
    assert gateway.register("bot", fake_adapter).status_code == 201
    assert gateway.register("staged", fake_adapter, make_current="false").status_code == 201
    assert gateway.register("staged", fake_adapter, make_current="false").status_code == 201
    cases = [
        ("bot", {"version": 1, "weight": 0.5}, 409, "canary_is_current"),
        ("bot", {"version": 9, "weight": 0.5}, 404, "version_not_found"),
        ("nope", {"version": 1, "weight": 0.5}, 404, "adapter_not_found"),
        ("staged", {"version": 2, "weight": 0.5}, 409, "no_current_version"),
        ("bot@1", {"version": 1, "weight": 0.5}, 400, "invalid_model_id"),
    ]
    for name, body, status, code in cases:
        response = put_canary(gateway, name, **body)
        assert response.status_code == status, (name, body, response.text)
        assert response.json()["error"]["code"] == code
    assert gateway.register("bot", fake_adapter, make_current="false").status_code == 201
    for body in ({"version": 2, "weight": 0}, {"version": 2, "weight": 1}, {"version": 2, "weight": 1.5},
                 {"version": 2, "weight": "0.5"}, {"version": "2", "weight": 0.5}, {"version": 2},
                 {"version": 2, "weight": 0.5, "extra": 1}, {"version": 2, "weight": 0.5, "rollback": {"window_s": 0}},
                 {"version": 2, "weight": 0.5, "rollback": {"min_requests": 10**9}},
                 {"version": 2, "weight": 0.5, "rollback": {"max_error_rate_margin": -0.1}}):
        response = put_canary(gateway, **body)
        assert response.status_code == 400, (body, response.text)
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    with gateway.admin() as admin:
        assert admin.delete("/v1/adapters/bot/canary").json()["error"]["code"] == "canary_not_found"
        assert admin.get("/v1/adapters/bot/canary").status_code == 404
        assert admin.post("/v1/adapters/bot/canary/promote").status_code == 404
    # The registry routes are admin routes: an API key may not start a canary.
    refused = httpx.put(f"{gateway.base_url}/v1/adapters/bot/canary", json={"version": 2, "weight": 0.5},
                        headers={"Authorization": f"Bearer {API_KEY}"})
    assert refused.status_code == 403


def test_canary_is_in_the_store_and_every_replica_splits_alike(make_gateway, fake_adapter, tmp_path):
    first = make_gateway(store_poll_s=0.2)
    second = make_gateway(state="state-2", store_poll_s=0.2)
    two_versions(first, fake_adapter)
    assert put_canary(first, version=2, weight=0.5).status_code == 200
    record = json.loads((tmp_path / "store" / "bot" / "canary.json").read_text())
    assert record["version"] == 2 and record["active"] and record["weight"] == 0.5

    def canary_seen_by_second() -> bool:
        with second.admin() as admin:
            return admin.get("/v1/adapters/bot").json().get("canary") is not None  # 404 until it polled the store

    _wait(canary_seen_by_second)
    users = [f"user-{i}" for i in range(12)]
    on_first = [answered_by(ask(first, user=u)) for u in users]
    on_second = [answered_by(ask(second, user=u)) for u in users]
    assert on_first == on_second and set(on_first) == {"bot@1", "bot@2"}
    # Ended on one replica: ended on the other.
    with first.admin() as admin:
        ended = admin.delete("/v1/adapters/bot/canary").json()
    assert ended["active"] is False and ended["ended_reason"] == "ended"

    def ended_on_second() -> bool:
        with second.admin() as admin:
            return admin.get("/v1/adapters/bot/canary").json()["active"] is False

    _wait(ended_on_second)
    assert {answered_by(ask(second, user=u)) for u in users} == {"bot@1"}
    # A restart reads the last record back.
    third = make_gateway(state="state-3")
    with third.admin() as admin:
        assert admin.get("/v1/adapters/bot/canary").json()["ended_reason"] == "ended"


def test_a_failing_canary_rolls_back_by_itself(make_gateway, fake_adapter):
    engine = BrokenVersionEngine(BASE)
    gateway = make_gateway(engine)
    two_versions(gateway, fake_adapter)
    engine.broken = {"bot@2"}
    rollback = {"window_s": 60, "min_requests": 8, "max_error_rate_margin": 0.2}
    assert put_canary(gateway, version=2, weight=0.5, rollback=rollback).status_code == 200
    client = gateway.openai()
    sequence = []
    for _ in range(80):
        try:
            sequence.append(answered_by(ask(gateway, client=client)))
        except openai.APIStatusError as exc:
            assert exc.status_code == 503  # the engine's 500, answered as quiver's retryable 503
            sequence.append("failed")
    outcomes = Counter(sequence)
    # The split is a random draw (no caller id), so when the window fills varies from run to run: the rollback
    # comes once both versions have 8 requests in it (the canary's all failed). Find that point in this run;
    # from there on (allowing the request or two in flight while the rollback is written) none reached @2.
    seen, full = Counter(), None
    for n, outcome in enumerate(sequence):
        seen[outcome] += 1
        if seen["failed"] >= 8 and seen["bot@1"] >= 8:
            full = n
            break
    assert full is not None, outcomes
    assert "failed" not in sequence[full + 3:], sequence
    assert outcomes["bot@2"] == 0 and outcomes["bot@1"] == 80 - outcomes["failed"]
    with gateway.admin() as admin:
        canary = admin.get("/v1/adapters/bot/canary").json()
        assert canary["active"] is False and canary["ended_reason"].startswith("rolled_back: error rate 100.0%")
        assert admin.get("/v1/adapters/bot").json()["current_version"] == 1  # the current version is untouched
    metrics = httpx.get(f"{gateway.base_url}/metrics").text
    assert 'quiver_canary_rollbacks_total{adapter="bot"} 1.0' in metrics
    assert f'quiver_version_errors_total{{version="bot@2"}} {float(outcomes["failed"])}' in metrics
    assert 'quiver_version_errors_total{version="bot@1"}' not in metrics
    # Pinned requests still reach the version (it is not deleted, only out of the split).
    with pytest.raises(openai.APIStatusError):
        ask(gateway, "bot@2", client=client)


def test_a_canary_whose_files_are_gone_rolls_back(make_gateway, fake_adapter, tmp_path):
    """The other way a version fails: it cannot be loaded. Its files vanish from the store (a damaged volume)
    and the engine restarts, so each request for it must load it again, and fails."""
    engine = FakeEngine(BASE)
    gateway = make_gateway(engine)
    two_versions(gateway, fake_adapter)
    rollback = {"window_s": 60, "min_requests": 5, "max_error_rate_margin": 0.5}
    assert put_canary(gateway, version=2, weight=0.5, rollback=rollback).status_code == 200
    shutil.rmtree(tmp_path / "store" / "bot" / "2")
    shutil.rmtree(tmp_path / "state" / "engine-adapters" / "bot@2")
    engine.threadsafe(engine.restart)
    client = gateway.openai()
    sequence = []
    for _ in range(40):
        try:
            sequence.append(answered_by(ask(gateway, client=client)))
        except openai.APIStatusError as exc:
            assert exc.status_code == 503 and exc.code == "store_unavailable"
            sequence.append("failed")
    assert set(sequence) <= {"bot@1", "failed"}, sequence
    # As above: the rollback comes once both versions have 5 requests in the window (the split is random).
    seen, full = Counter(), None
    for n, outcome in enumerate(sequence):
        seen[outcome] += 1
        if seen["failed"] >= 5 and seen["bot@1"] >= 5:
            full = n
            break
    assert full is not None and "failed" not in sequence[full + 3:], sequence
    with gateway.admin() as admin:
        assert admin.get("/v1/adapters/bot/canary").json()["ended_reason"].startswith("rolled_back")


def test_a_healthy_canary_keeps_running_and_is_promoted(make_gateway, fake_adapter):
    gateway = make_gateway()
    two_versions(gateway, fake_adapter)
    rollback = {"window_s": 60, "min_requests": 5, "max_error_rate_margin": 0.0}
    assert put_canary(gateway, version=2, weight=0.5, rollback=rollback).status_code == 200
    client = gateway.openai()
    for i in range(40):
        answered_by(ask(gateway, client=client))
    with gateway.admin() as admin:
        canary = admin.get("/v1/adapters/bot/canary").json()
        assert canary["active"] is True
        window = canary["window"]
        assert window["bot@1"]["errors"] == window["bot@2"]["errors"] == 0
        assert window["bot@1"]["requests"] + window["bot@2"]["requests"] == 40
        # Re-weighting the running canary keeps its start and its window.
        again = admin.put("/v1/adapters/bot/canary", json={"version": 2, "weight": 0.2}).json()
        assert again["started_at"] == canary["started_at"] and again["weight"] == 0.2
        promoted = admin.post("/v1/adapters/bot/canary/promote")
        assert promoted.status_code == 200 and promoted.json()["current_version"] == 2
        assert promoted.json()["canary"]["ended_reason"] == "promoted"
    assert {answered_by(ask(gateway, client=client)) for _ in range(10)} == {"bot@2"}


def test_deleting_the_canary_version_ends_the_canary(make_gateway, fake_adapter):
    gateway = make_gateway()
    two_versions(gateway, fake_adapter)
    assert put_canary(gateway, version=2, weight=0.9).status_code == 200
    with gateway.admin() as admin:
        assert admin.delete("/v1/adapters/bot@2").status_code == 200
        assert admin.get("/v1/adapters/bot/canary").json()["ended_reason"] == "version_deleted"
    assert {answered_by(ask(gateway)) for _ in range(10)} == {"bot@1"}


def test_per_version_metrics_are_bounded_to_registered_versions(make_gateway, fake_adapter):
    gateway = make_gateway()
    two_versions(gateway, fake_adapter)
    client = gateway.openai()
    for model in ("bot", "bot@2", "bot@2", BASE):
        ask(gateway, model, client=client)
    for bad in ("bot@02", "bot@9", "nope"):
        with pytest.raises(openai.APIStatusError):
            ask(gateway, bad, client=client)
    metrics = httpx.get(f"{gateway.base_url}/metrics").text
    assert 'quiver_version_requests_total{status="200",version="bot@1"} 1.0' in metrics
    assert 'quiver_version_requests_total{status="200",version="bot@2"} 2.0' in metrics
    assert f'quiver_version_requests_total{{status="200",version="{BASE}"}} 1.0' in metrics
    assert 'quiver_version_prompt_tokens_total{version="bot@2"} 10.0' in metrics  # the fake engine: 5 a request
    assert 'quiver_version_completion_tokens_total{version="bot@2"} 4.0' in metrics
    assert 'quiver_version_request_duration_seconds_count{version="bot@2"} 2.0' in metrics
    versions = {line.split('version="')[1].split('"')[0] for line in metrics.splitlines()
                if line.startswith("quiver_version_")}
    assert versions == {"bot@1", "bot@2", BASE}  # unresolved ids open no series
    with gateway.admin() as admin:
        assert admin.delete("/v1/adapters/bot@2").status_code == 200
    assert 'version="bot@2"' not in httpx.get(f"{gateway.base_url}/metrics").text


def _wait(condition, timeout_s: float = 20.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
