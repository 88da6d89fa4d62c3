"""A canary on the real vLLM engine: two real LoRA versions of one name split 50/50 in proportion, each
answer is really the named version's (its greedy text, not just its label), a user sticks to one version,
and cost per version shows in /metrics and /v1/usage. (Rollback logic: test_canary.py, on the fake engine.)"""

from __future__ import annotations

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
