"""The usage ledger and `GET /v1/usage`: tokens and requests per API key and adapter version over a window,
in per-minute buckets in sqlite; the ledger alone, then through the gateway on the fake engine."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import httpx
import openai
import pytest

from quiver.fake_engine import FakeEngine
from quiver.settings import Settings
from quiver.testing import ADMIN_KEY, API_KEY, InProcessGateway
from quiver.usage.service import UsageLedger

BASE = "SmolLM2-135M-Instruct"
MESSAGES = [{"role": "user", "content": "Hi"}]
TENANT_KEY = "test-usage-tenant-key"


def fingerprint(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_ledger_sums_per_key_and_version_over_a_window(tmp_path: Path):
    clock = Clock(1_000_050.0)  # in the minute that begins at 1_000_020
    ledger = UsageLedger(tmp_path / "usage.sqlite3", retention_s=3600, clock=clock)
    ledger.add("key-a", "bot", "bot@1", requests=1, prompt_tokens=10, completion_tokens=2)
    ledger.add("key-a", "bot", "bot@1", requests=1, errors=1)
    ledger.add("key-b", "bot", "bot@2", requests=1, prompt_tokens=7, completion_tokens=3)
    clock.now += 120  # two minutes later
    ledger.add("key-a", "bot", "bot@2", requests=1, prompt_tokens=1, completion_tokens=1)
    ledger.flush()
    ledger.add("key-a", "bot", "bot@2", requests=1, prompt_tokens=1, completion_tokens=1)  # not flushed yet

    def rows(start, end, groups, key=None):
        return [r.model_dump(exclude_none=True) for r in ledger.query(start, end, groups, key)]

    everything = rows(0, 2_000_000, ["key", "adapter_version"])
    assert everything == [
        {"key": "key-a", "adapter_version": "bot@1", "requests": 2, "errors": 1, "prompt_tokens": 10,
         "completion_tokens": 2, "total_tokens": 12},
        {"key": "key-a", "adapter_version": "bot@2", "requests": 2, "errors": 0, "prompt_tokens": 2,
         "completion_tokens": 2, "total_tokens": 4},
        {"key": "key-b", "adapter_version": "bot@2", "requests": 1, "errors": 0, "prompt_tokens": 7,
         "completion_tokens": 3, "total_tokens": 10},
    ]
    assert rows(0, 2_000_000, ["adapter"]) == [{"adapter": "bot", "requests": 5, "errors": 1, "prompt_tokens": 19,
                                               "completion_tokens": 7, "total_tokens": 26}]
    # A window is whole minutes: the first minute's bucket counts from any second inside it.
    first_minute = rows(1_000_030, 1_000_040, ["adapter_version"])
    assert [(r["adapter_version"], r["requests"]) for r in first_minute] == [("bot@1", 2), ("bot@2", 1)]
    assert rows(1_000_080, 2_000_000, []) == [{"requests": 2, "errors": 0, "prompt_tokens": 2,
                                                  "completion_tokens": 2, "total_tokens": 4}]
    assert rows(0, 10, []) == []
    assert [r["adapter_version"] for r in rows(0, 2_000_000, ["adapter_version"], key="key-b")] == ["bot@2"]
    # Past the retention, buckets are deleted at the next write.
    clock.now += 3540  # the first minute is now past the hour, the later one is not
    ledger.flush()
    assert rows(0, 2_000_000, ["key"]) == [{"key": "key-a", "requests": 2, "errors": 0, "prompt_tokens": 2,
                                           "completion_tokens": 2, "total_tokens": 4}]
    ledger.close()
    # One row per (minute, key, version): compact whatever the number of requests.
    with sqlite3.connect(tmp_path / "usage.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM usage").fetchone() == (1,)


def test_ledger_keeps_a_batch_it_could_not_write(tmp_path: Path):
    ledger = UsageLedger(tmp_path / "usage.sqlite3", retention_s=3600)
    ledger.add("key-a", "bot", "bot@1", requests=3)
    with sqlite3.connect(tmp_path / "usage.sqlite3") as other:
        other.execute("BEGIN EXCLUSIVE")  # another writer holds the file
        ledger._db.execute("PRAGMA busy_timeout = 0")
        with pytest.raises(sqlite3.OperationalError):
            ledger.flush()
        other.rollback()
    assert [r.requests for r in ledger.query(0, 2**40, [])] == [3]  # retried, not lost
    ledger.close()


@pytest.fixture
def gateway(model_dir: Path, tmp_path: Path):
    def make() -> InProcessGateway:
        settings = Settings(
            model_cache_dir=model_dir.parent, store_dir=tmp_path / "store", state_dir=tmp_path / "state",
            finetuning_dir=tmp_path / "ft", admin_keys=[ADMIN_KEY], api_keys=[API_KEY], store_poll_s=0,
            tenant_keys={TENANT_KEY: ["acme-*"]},
        )
        return InProcessGateway(settings, FakeEngine(BASE)).start()

    started = [make()]
    yield started[0], lambda: started.append(make()) or started[-1]
    for one in started:
        one.stop()


def usage(gateway: InProcessGateway, key: str, **params) -> httpx.Response:
    return httpx.get(f"{gateway.base_url}/v1/usage", params=params, headers={"Authorization": f"Bearer {key}"})


def test_usage_route_sums_tokens_per_key_and_version(gateway, fake_adapter):
    server, restart = gateway
    assert server.register("acme-bot", fake_adapter).status_code == 201
    assert server.register("acme-bot", fake_adapter, make_current="false").status_code == 201
    api, tenant, admin = server.openai(API_KEY), server.openai(TENANT_KEY), server.openai(ADMIN_KEY)
    for _ in range(3):
        api.chat.completions.create(model="acme-bot", messages=MESSAGES, max_tokens=4)
    stream = tenant.chat.completions.create(model="acme-bot@2", messages=MESSAGES, max_tokens=2, stream=True)
    assert [chunk for chunk in stream]
    tenant.completions.create(model=BASE, prompt="Hi", max_tokens=1)
    admin.chat.completions.create(model="acme-bot@2", messages=MESSAGES, max_tokens=1)
    with pytest.raises(openai.NotFoundError):  # never resolved: no version to charge
        api.chat.completions.create(model="acme-bot@7", messages=MESSAGES, max_tokens=1)

    everything = usage(server, ADMIN_KEY)
    assert everything.status_code == 200, everything.text
    body = everything.json()
    assert body["scope"] == "all" and body["group_by"] == ["key", "adapter_version"] and body["bucket_width_s"] == 60
    rows = {(r["key"], r["adapter_version"]): (r["requests"], r["prompt_tokens"], r["completion_tokens"])
            for r in body["data"]}
    # The fake engine counts 5 prompt tokens a request and exactly max_tokens completion tokens.
    assert rows == {
        (fingerprint(API_KEY), "acme-bot@1"): (3, 15, 12),
        (fingerprint(TENANT_KEY), "acme-bot@2"): (1, 5, 2),
        (fingerprint(TENANT_KEY), BASE): (1, 5, 1),
        (fingerprint(ADMIN_KEY), "acme-bot@2"): (1, 5, 1),
    }
    by_version = usage(server, ADMIN_KEY, group_by="adapter_version").json()["data"]
    assert {r["adapter_version"]: r["total_tokens"] for r in by_version} == {"acme-bot@1": 27, "acme-bot@2": 13,
                                                                             BASE: 6}
    # A non-admin key sees its own usage only.
    own = usage(server, TENANT_KEY, group_by="key,adapter").json()
    assert own["scope"] == "own_key"
    assert [(r["key"], r["adapter"], r["requests"]) for r in own["data"]] == [
        (fingerprint(TENANT_KEY), BASE, 1), (fingerprint(TENANT_KEY), "acme-bot", 1)]
    # A window before any traffic is empty.
    assert usage(server, ADMIN_KEY, start_time=0, end_time=60).json()["data"] == []
    # Persisted: a restarted gateway (same state_dir) still has it.
    server.stop()
    again = restart()
    assert usage(again, ADMIN_KEY, group_by="adapter_version").json()["data"] == by_version


def test_usage_route_refuses_bad_queries_with_4xx(gateway):
    server, _ = gateway
    for params in ({"group_by": "model"}, {"group_by": "key,"*40}, {"start_time": 100, "end_time": 100},
                   {"start_time": "yesterday"}, {"end_time": -1}, {"start_time": 2**62}):
        response = usage(server, ADMIN_KEY, **params)
        assert response.status_code == 400, (params, response.text)
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert usage(server, "wrong-key").status_code == 401
    assert httpx.get(f"{server.base_url}/v1/usage").status_code == 401
