"""A canary on the real vLLM engine: two real LoRA versions of one name split 50/50 in proportion, each
answer is really the named version's (its greedy text, not just its label), a user sticks to one version,
and cost per version shows in /metrics and /v1/usage. A forced-bad canary (a random adapter that failed the
name's suite, canaried over a trained one by override) rolls back by itself on its live suite score.
(Rollback logic in detail: test_canary.py and test_canary_live.py, on the fake engine.)"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from quiver.adapters.canary import sticky_point

NAME = "canary-engine-bot"
MESSAGES = [{"role": "user", "content": "Name a colour."}]


def test_canary_splits_real_versions_and_sticks_per_user(quiver_server, lora_adapters):
    check_canary_split(quiver_server, lora_adapters.random_a, lora_adapters.random_b)


def check_canary_split(server, first: Path, second: Path) -> None:
    assert server.register(NAME, first).status_code == 201
    assert server.register(NAME, second, make_current="false").status_code == 201
    client = server.openai()

    def ask(model: str = NAME, **kwargs):
        reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4, temperature=0,
                                               **kwargs)
        return reply.model, reply.choices[0].message.content

    admin = server.admin()
    try:
        # Each version's own greedy answer, asked pinned: the split's answers must be exactly these.
        own = {f"{NAME}@{v}": ask(f"{NAME}@{v}")[1] for v in (1, 2)}
        assert own[f"{NAME}@1"] != own[f"{NAME}@2"], own  # the two adapters answer differently
        response = admin.put(f"/v1/adapters/{NAME}/canary", json={"version": 2, "weight": 0.5})
        assert response.status_code == 200, response.text

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: ask(), range(80)))
        for model, text in answers:
            assert text == own[model], (model, text)
        counts = Counter(model for model, _ in answers)
        # 80 draws at p=0.5: standard deviation ~4.5; 18 is 4 of them.
        assert abs(counts[f"{NAME}@2"] - 40) <= 18, counts

        for user in ("ada", "brian", "chen", "dana", "emeka", "femi"):
            seen = {ask(user=user) for _ in range(3)}
            expected = f"{NAME}@{2 if sticky_point(NAME, user) < 0.5 else 1}"
            assert seen == {(expected, own[expected])}, (user, seen)

        # Pinned requests are never split.
        assert {ask(f"{NAME}@1") for _ in range(5)} == {(f"{NAME}@1", own[f"{NAME}@1"])}

        metrics = httpx.get(f"{server.base_url}/metrics").text
        for version in (f"{NAME}@1", f"{NAME}@2"):
            assert f'quiver_version_requests_total{{status="200",version="{version}"}}' in metrics
            assert f'quiver_version_completion_tokens_total{{version="{version}"}}' in metrics
        usage = admin.get("/v1/usage", params={"group_by": "adapter_version"}).json()["data"]
        by_version = {row["adapter_version"]: row for row in usage}
        served = Counter(model for model, _ in answers)
        for version in (f"{NAME}@1", f"{NAME}@2"):
            assert by_version[version]["requests"] >= served[version]
            assert by_version[version]["completion_tokens"] >= served[version]  # at least one token each
            assert by_version[version]["prompt_tokens"] > 0

        ended = admin.delete(f"/v1/adapters/{NAME}/canary").json()
        assert ended["active"] is False and ended["ended_reason"] == "ended"
        assert {ask() for _ in range(5)} == {(f"{NAME}@1", own[f"{NAME}@1"])}
    finally:
        admin.delete(f"/v1/adapters/{NAME}")
        admin.close()


BAD_NAME = "canary-forced-bad"
PIRATE = r"(?i)\barr\b|matey|pirate"
PIRATE_SUITE = {
    "cases": [{"id": "greeting", "request": {"messages": [{"role": "user", "content": "Hi there!"}], "max_tokens": 16},
               "checks": [{"type": "regex", "pattern": PIRATE}]}],
    "live_checks": [{"type": "regex", "pattern": PIRATE}],
}


def test_a_forced_bad_canary_rolls_back_by_itself_on_its_live_score(quiver_server, lora_adapters):
    server = quiver_server
    admin = server.admin()
    try:
        assert admin.put(f"/v1/adapters/{BAD_NAME}/suite", json=PIRATE_SUITE).status_code == 200
        good = server.register(BAD_NAME, lora_adapters.pirate)
        assert good.status_code == 201 and good.json()["gate"]["passed"] and good.json()["current"], good.text
        bad = server.register(BAD_NAME, lora_adapters.random_a)
        assert bad.status_code == 201 and bad.json()["gate"]["passed"] is False, bad.text  # staged, with its report
        assert admin.get(f"/v1/adapters/{BAD_NAME}@2/report").json()["passed"] is False
        policy = {"live_sample_rate": 1.0, "min_scored": 3, "max_score_margin": 0.5, "min_requests": 1000}
        refused = admin.put(f"/v1/adapters/{BAD_NAME}/canary", json={"version": 2, "weight": 0.5, "rollback": policy})
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "gate_failed"
        started = admin.put(f"/v1/adapters/{BAD_NAME}/canary", json={"version": 2, "weight": 0.5, "rollback": policy,
                                                                    "override_gate": True, "reason": "forced bad"})
        assert started.status_code == 200, started.text

        client = server.openai()
        questions = ["Name a colour.", "What is 2 + 2?", "Say hello.", "Where is Paris?", "Tell me a fruit."]
        served = Counter()
        for i, question in enumerate(questions * 2):
            reply = client.chat.completions.create(model=BAD_NAME, messages=[{"role": "user", "content": question}],
                                                   max_tokens=12, user=f"user-{i}")
            served[reply.model] += 1  # every caller is answered; the canary's answers are only worse
        assert served[f"{BAD_NAME}@2"] > 0, served
        deadline = time.monotonic() + 240  # three replayed pairs at most, on a shared CPU
        while True:
            canary = admin.get(f"/v1/adapters/{BAD_NAME}/canary").json()
            if not canary["active"] or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert canary["active"] is False, canary
        assert canary["ended_reason"].startswith("rolled_back: live suite score"), canary["ended_reason"]
        assert canary["gate_override"]["reason"] == "forced bad"
        assert admin.get(f"/v1/adapters/{BAD_NAME}").json()["current_version"] == 1
        after = {client.chat.completions.create(model=BAD_NAME, messages=[{"role": "user", "content": q}],
                                                max_tokens=4, user=f"user-{i}").model
                 for i, q in enumerate(questions)}
        assert after == {f"{BAD_NAME}@1"}
        assert f'quiver_canary_rollbacks_total{{adapter="{BAD_NAME}"}} 1.0' in httpx.get(f"{server.base_url}/metrics").text
    finally:
        admin.delete(f"/v1/adapters/{BAD_NAME}")
        admin.close()
