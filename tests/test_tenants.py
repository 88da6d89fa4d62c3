"""Keys scoped to adapters (tenants), through the real server and the official openai client.

The session server has two tenant keys (conftest.TENANT_KEYS): acme's sees `acme-*`, globex's sees
`globex-bot` and `shared-?`. Both see the base model. Neither may learn that the other's adapters exist.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from pydantic import ValidationError

from conftest import PIRATE_ANSWER, TENANT_KEYS, QuiverServer
from quiver.auth import ModelScope
from quiver.settings import Settings

ACME, GLOBEX = list(TENANT_KEYS)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tenants(quiver_server: QuiverServer, lora_adapters) -> QuiverServer:
    for name, folder in {"acme-support": lora_adapters.pirate, "globex-bot": lora_adapters.random_b,
                         "shared-1": lora_adapters.random_a}.items():
        response = quiver_server.register(name, folder)
        assert response.status_code == 201, response.text
    return quiver_server


def model_ids(server: QuiverServer, key: str) -> set[str]:
    return {model.id for model in server.openai(key=key).models.list()}


def test_each_tenant_lists_only_the_base_and_its_own_adapters(tenants: QuiverServer) -> None:
    base = tenants.model_name
    acme = model_ids(tenants, ACME)
    assert {base, "acme-support", "acme-support@1"} <= acme
    assert all(i == base or i.startswith("acme-") for i in acme), acme
    globex = model_ids(tenants, GLOBEX)
    assert {base, "globex-bot", "globex-bot@1", "shared-1", "shared-1@1"} <= globex
    assert all(i == base or i.split("@")[0] in ("globex-bot", "shared-1") for i in globex), globex
    # An unscoped inference key still sees everything.
    assert acme | globex <= model_ids(tenants, tenants.api_key)


def test_a_tenant_calls_its_adapter_and_the_base(tenants: QuiverServer) -> None:
    client = tenants.openai(key=ACME)
    reply = client.chat.completions.create(model="acme-support", messages=QUESTION, temperature=0, max_tokens=24)
    assert reply.choices[0].message.content == PIRATE_ANSWER
    streamed = client.chat.completions.create(model="acme-support@1", messages=QUESTION, temperature=0,
                                              max_tokens=24, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == PIRATE_ANSWER
    base = client.completions.create(model=tenants.model_name, prompt="The capital of France is", max_tokens=4)
    assert base.choices[0].text
    assert client.models.retrieve("acme-support").id == "acme-support"


def _refusal(call) -> tuple[int, dict]:
    with pytest.raises(openai.NotFoundError) as refused:
        call()
    return refused.value.status_code, refused.value.body


@pytest.mark.parametrize("foreign", ["globex-bot", "globex-bot@1", "shared-1"])
def test_another_tenants_adapter_is_404_exactly_like_a_missing_one(tenants: QuiverServer, foreign: str) -> None:
    client = tenants.openai(key=ACME)
    # A name that exists nowhere, of the same shape: the two refusals must be indistinguishable.
    missing = foreign.replace("globex-bot", "nobody-bot").replace("shared-1", "nobody-1")
    calls = {
        "chat": lambda model: client.chat.completions.create(model=model, messages=QUESTION, max_tokens=4),
        "stream": lambda model: client.chat.completions.create(model=model, messages=QUESTION, max_tokens=4,
                                                               stream=True),
        "completion": lambda model: client.completions.create(model=model, prompt="hi", max_tokens=4),
        "retrieve": lambda model: client.models.retrieve(model),
    }
    for kind, call in calls.items():
        status, body = _refusal(lambda: call(foreign))
        missing_status, missing_body = _refusal(lambda: call(missing))
        assert status == missing_status == 404, kind
        assert body["code"] == "model_not_found", (kind, body)
        assert json.loads(json.dumps(body).replace(foreign, missing)) == missing_body, kind
    # The adapter is there all the same, for the tenant that owns it.
    owner = tenants.openai(key=GLOBEX)
    assert owner.chat.completions.create(model=foreign, messages=QUESTION, max_tokens=4).choices


def test_tenant_keys_are_not_admin_keys(tenants: QuiverServer, lora_adapters) -> None:
    headers = {"Authorization": f"Bearer {ACME}"}
    with httpx.Client(base_url=tenants.base_url, headers=headers, timeout=60) as client:
        files = [("files", (p.name, p.read_bytes())) for p in sorted(lora_adapters.random_a.iterdir()) if p.is_file()]
        refusals = [
            client.post("/v1/adapters", data={"name": "acme-new"}, files=files),
            client.get("/v1/adapters"),
            client.get("/v1/adapters/acme-support"),
            client.get("/v1/adapters/globex-bot"),  # 403 whoever owns it: no hint either way
            client.delete("/v1/adapters/acme-support"),
            client.post("/v1/adapters/acme-support/promote", json={"version": 1}),
            client.get("/v1/files"),
            client.get("/v1/fine_tuning/jobs"),
        ]
    for response in refusals:
        assert response.status_code == 403, (response.request.url, response.text)
        assert response.json()["error"]["code"] == "admin_key_required"
    assert "acme-new" not in model_ids(tenants, tenants.api_key)
    with pytest.raises(openai.AuthenticationError):
        tenants.openai(key=ACME + "x").models.list()


def test_keys_never_reach_the_logs(tenants: QuiverServer) -> None:
    tenants.openai(key=ACME).models.list()
    logs = tenants.log_path.read_text(errors="replace")
    engine_log = tenants.state_dir / "engine.log"
    if engine_log.exists():
        logs += engine_log.read_text(errors="replace")
    for key in (*TENANT_KEYS, tenants.api_key, tenants.admin_key):
        assert key not in logs


# --- settings and scopes on their own ---------------------------------------------------------------


def test_tenant_keys_from_json_env_or_yaml_file(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("QUIVER_TENANT_KEYS", '{"k-one": ["a-*"], "k-two": "b-bot"}')
    assert Settings().tenant_keys == {"k-one": ["a-*"], "k-two": ["b-bot"]}
    monkeypatch.delenv("QUIVER_TENANT_KEYS")
    config = tmp_path / "quiver.yaml"
    config.write_text("tenant_keys:\n  k-one: [a-*, 'c-[0-9]']\n")
    monkeypatch.setenv("QUIVER_CONFIG", str(config))
    settings = Settings()
    assert settings.tenant_keys == {"k-one": ["a-*", "c-[0-9]"]} and settings.auth_enabled
    assert "k-one" not in repr(settings)


@pytest.mark.parametrize(
    "value",
    ['{"sk-secret-1": ["Upper"]}', '{"sk-secret-1": []}', '{sk-secret-1: [unclosed', '["sk-secret-1"]',
     '{"sk secret-1": ["a"]}'],
)
def test_bad_tenant_keys_are_refused_without_printing_the_key(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("QUIVER_TENANT_KEYS", value)
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert "tenant_keys" in str(refused.value)
    assert "secret" not in str(refused.value)


@pytest.mark.parametrize("value", ["key-1,key-2", " key-1 , key-2 ", '["key-1", "key-2"]'])
def test_keys_are_comma_separated_or_a_json_list(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("QUIVER_ADMIN_KEYS", value)
    assert Settings().admin_keys == ["key-1", "key-2"]


@pytest.mark.parametrize("value", ['["sk-secret-1", 2]', '["sk-secret-1"', '[""]'])
def test_a_malformed_key_list_is_refused_without_printing_it(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("QUIVER_API_KEYS", value)
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert "api_keys" in str(refused.value) and "secret" not in str(refused.value)


def test_a_key_with_two_roles_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUIVER_TENANT_KEYS", '{"shared-key": ["a-*"]}')
    monkeypatch.setenv("QUIVER_API_KEYS", "shared-key")
    with pytest.raises(ValidationError, match="one role"):
        Settings()


def test_scope_patterns() -> None:
    scope = ModelScope(("acme-*", "bot-?", "team-[ab]"))
    assert scope.allows(None)  # the base model
    assert all(scope.allows(n) for n in ("acme-x", "bot-1", "team-a"))
    assert not any(scope.allows(n) for n in ("acme", "bot-12", "team-c", "xacme-1"))
    assert ModelScope().allows("anything")
