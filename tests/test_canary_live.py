"""A canary's quality trigger on the fake engine (whose answers name the version: `bot@2#0 bot@2#1`): sampled
live requests are replayed on both versions with fixed sampling and scored with the suite's live checks; a canary
whose live score falls below the current version's by the margin rolls back by itself, a good one keeps running
and shows its scores. Also: the refusals (no live checks, a version that failed its gate) and the bounds. The
same on the real engine: test_canary_engine.py."""

from __future__ import annotations

import asyncio
import time

import pytest

from quiver.adapters.canary import Canary, RollbackPolicy
from quiver.suites.live import LiveScorer, live_score, replay_body
from quiver.suites.protocol import Answer, SuiteSpec
from test_canary import ask, put_canary

CASES = [{"id": "names-itself", "request": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
          "checks": [{"type": "contains", "value": "bot@"}]}]


def suite(*live_checks: dict, cases=CASES) -> dict:
    return {"cases": cases, "live_checks": list(live_checks)}


def setup(gateway, live_checks: list[dict], fake_adapter) -> None:
    with gateway.admin() as admin:
        assert admin.put("/v1/adapters/bot/suite", json=suite(*live_checks)).status_code == 200
    assert gateway.register("bot", fake_adapter).status_code == 201
    second = gateway.register("bot", fake_adapter, make_current="false")
    assert second.status_code == 201 and second.json()["gate"]["passed"], second.text


def wait_canary(gateway, until, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    with gateway.admin() as admin:
        while True:
            canary = admin.get("/v1/adapters/bot/canary").json()
            if until(canary) or time.monotonic() > deadline:
                return canary
            time.sleep(0.1)


LIVE = {"window_s": 600, "min_requests": 1000, "live_sample_rate": 1.0, "min_scored": 4, "max_score_margin": 0.2}


def test_a_canary_whose_live_score_falls_rolls_back_by_itself(make_gateway, fake_adapter):  # noqa: F811
    gateway = make_gateway()
    setup(gateway, [{"type": "regex", "pattern": "^bot@1#"}], fake_adapter)  # only version 1 answers this way
    started = put_canary(gateway, version=2, weight=0.5, rollback=LIVE)
    assert started.status_code == 200, started.text
    assert started.json()["live_suite_version"] == 1
    client = gateway.openai()
    for i in range(12):  # every caller gets its answer: the canary's are not errors, only worse
        ask(gateway, client=client, user=f"user-{i}")
    canary = wait_canary(gateway, lambda c: not c["active"])
    assert canary["active"] is False, canary
    assert canary["ended_reason"].startswith("rolled_back: live suite score 0.00 ("), canary["ended_reason"]
    assert "against 1.00 (" in canary["ended_reason"] and "for version 1" in canary["ended_reason"]
    assert {ask(gateway, client=client, user=f"user-{i}").model for i in range(6)} == {"bot@1"}
    # The replays: each sampled request on both versions, the caller's messages with fixed sampling.
    replays = [body for body in gateway.engine.requests if body.get("seed") == 0 and body.get("n") == 1
               and body.get("messages") == [{"role": "user", "content": "Hi"}]]
    assert {body["model"] for body in replays} == {"bot@1", "bot@2"}
    assert all(body["temperature"] == 0 and body["stream"] is False and body["max_tokens"] == 2 for body in replays)


def test_a_good_canary_keeps_running_and_shows_its_live_scores(make_gateway, fake_adapter):  # noqa: F811
    gateway = make_gateway()
    setup(gateway, [{"type": "regex", "pattern": "^bot@[12]#"}, {"type": "max_tokens", "value": 4}], fake_adapter)
    assert put_canary(gateway, version=2, weight=0.5, rollback=LIVE).status_code == 200
    client = gateway.openai()
    for i in range(8):
        ask(gateway, client=client, user=f"user-{i}")
    canary = wait_canary(gateway, lambda c: all(w["scored"] >= 8 for w in (c.get("window") or {"x": {"scored": 0}}).values()))
    assert canary["active"] is True
    assert {version: (w["scored"], w["score"]) for version, w in canary["window"].items()} == {
        "bot@1": (8, 1.0), "bot@2": (8, 1.0)}


def test_live_scoring_needs_live_checks_and_a_failed_gate_needs_an_override(make_gateway, fake_adapter):  # noqa: F811
    gateway = make_gateway()
    with gateway.admin() as admin:
        gated = suite(cases=[{**CASES[0], "checks": [{"type": "regex", "pattern": "^bot@1#"}]}])
        assert admin.put("/v1/adapters/bot/suite", json=gated).status_code == 200
        assert gateway.register("bot", fake_adapter).json()["gate"]["passed"] is True
        assert gateway.register("bot", fake_adapter).json()["gate"]["passed"] is False  # staged
        refused = admin.put("/v1/adapters/bot/canary", json={"version": 2, "weight": 0.5})
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "gate_failed", refused.text
        started = admin.put("/v1/adapters/bot/canary", json={"version": 2, "weight": 0.5, "override_gate": True,
                                                             "reason": "the case is wrong"})
        assert started.status_code == 200, started.text
        override = started.json()["gate_override"]
        assert override["reason"] == "the case is wrong" and override["by"].startswith("key sha256:")
        # re-weighting the same canary keeps its override, without asking again
        again = admin.put("/v1/adapters/bot/canary", json={"version": 2, "weight": 0.2})
        assert again.status_code == 200 and again.json()["gate_override"] == override
        no_live = admin.put("/v1/adapters/bot/canary", json={"version": 2, "weight": 0.2,
                                                             "rollback": {"live_sample_rate": 0.5}})
        assert no_live.status_code == 409 and no_live.json()["error"]["code"] == "no_live_checks", no_live.text
        for bad in ({"live_sample_rate": 1.5}, {"live_sample_rate": "1"}, {"min_scored": 0},
                    {"max_score_margin": -0.1}):
            answer = admin.put("/v1/adapters/bot/canary", json={"version": 2, "weight": 0.2, "rollback": bad})
            assert answer.status_code == 400, (bad, answer.text)
        # live checks are only those that judge any answer
        wrong = admin.put("/v1/adapters/bot/suite", json=suite({"type": "exact", "value": "x"}))
        assert wrong.status_code == 400 and wrong.json()["error"]["param"].startswith("live_checks.0"), wrong.text


def test_replay_body_and_score_are_fixed_and_bounded():
    body = {"model": "bot@1", "messages": [{"role": "user", "content": "x"}], "temperature": 1.5, "top_p": 0.3,
            "seed": 99, "n": 4, "stream": True, "max_tokens": 100_000, "logprobs": True, "stop": ["\n"]}
    assert replay_body(body, "bot@2") == {"model": "bot@2", "messages": body["messages"], "stop": ["\n"],
                                          "stream": False, "n": 1, "temperature": 0, "seed": 0, "max_tokens": 512}
    assert replay_body({"prompt": "x"}, "bot@2")["max_tokens"] == 128
    checks = SuiteSpec.model_validate(suite({"type": "json"}, {"type": "contains", "value": "a"})).live_checks
    assert live_score(checks, Answer(model="m", text='"a"')) == 1.0
    assert live_score(checks, Answer(model="m", text="a")) == 0.5
    assert live_score(checks, Answer(model="m", error="the engine refused")) == 0.0


def test_a_full_sample_queue_drops_the_sample_instead_of_waiting():
    async def main() -> tuple[list[bool], int]:
        scorer = LiveScorer(registry=None, suites=None, queue_size=2, concurrency=1)  # type: ignore[arg-type]
        canary = Canary(name="bot", version=2, weight=0.5, rollback=RollbackPolicy(), started_at=0)
        offered = [scorer.offer(canary, 1, "chat/completions", {}) for _ in range(5)]
        return offered, scorer.dropped

    assert asyncio.run(main()) == ([True, True, False, False, False], 3)


@pytest.mark.parametrize("policy", [{"live_sample_rate": 0.0}, {}])
def test_without_a_sample_rate_nothing_is_replayed(make_gateway, fake_adapter, policy):  # noqa: F811
    gateway = make_gateway()
    setup(gateway, [{"type": "regex", "pattern": "^bot@1#"}], fake_adapter)
    assert put_canary(gateway, version=2, weight=0.5, rollback=policy).status_code == 200
    before = len(gateway.engine.requests)
    for i in range(6):
        ask(gateway, user=f"user-{i}")
    assert len(gateway.engine.requests) == before + 6
    assert wait_canary(gateway, lambda c: True)["active"] is True
