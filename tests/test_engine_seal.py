"""Sealed engine: nothing but the gateway can talk to the engine, and the engine's environment holds none of
the gateway's secrets. Tried on the real engine the way another process on the machine would."""

from __future__ import annotations

from pathlib import Path

import httpx
import psutil
import pytest

from conftest import TENANT_KEYS
from quiver.settings import Settings

ADMIN_AND_API_KEYS = ("test-admin-key", "test-inference-key")


def engine_processes(server) -> list[psutil.Process]:
    """The engine's API server and everything it started (engine core, workers)."""
    api_server = server.engine_process()
    return [api_server, *api_server.children(recursive=True)]


def test_the_engine_port_refuses_callers_without_the_gateways_key(quiver_server, fake_adapter: Path) -> None:
    url = quiver_server.engine_url
    outsider = httpx.Client(base_url=url, timeout=30)
    wrong_key = httpx.Client(base_url=url, timeout=30, headers={"Authorization": "Bearer guessed"})
    for client in (outsider, wrong_key):
        load = client.post("/v1/load_lora_adapter", json={"lora_name": "intruder", "lora_path": str(fake_adapter)})
        assert load.status_code == 401
        chat = client.post("/v1/chat/completions", json={"model": quiver_server.model_name,
                                                         "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 401
        # routes outside vLLM's own guarded prefixes are sealed too
        for method, path, body in (("POST", "/invocations", {"model": quiver_server.model_name, "prompt": "hi"}),
                                   ("POST", "/tokenize", {"model": quiver_server.model_name, "prompt": "hi"}),
                                   ("GET", "/v1/models", None), ("GET", "/metrics", None), ("GET", "/health", None)):
            assert client.request(method, path, json=body).status_code == 401, path
    # the refusals are the seal's, not a wrong port: with the key the same engine answers, and nothing was loaded
    assert "intruder" not in quiver_server.engine_models()
    assert quiver_server.openai().models.list().data  # and the gateway still serves


def test_the_engine_key_is_not_on_any_command_line(quiver_server) -> None:
    key = quiver_server.engine_key
    assert len(key) >= 32
    for process in engine_processes(quiver_server):
        assert key not in " ".join(process.cmdline())


def test_the_engine_environment_holds_no_gateway_secrets(quiver_server) -> None:
    secrets = [*ADMIN_AND_API_KEYS, *TENANT_KEYS]
    for process in engine_processes(quiver_server):
        environ = Path(f"/proc/{process.pid}/environ").read_bytes().decode(errors="replace")
        names = {entry.partition("=")[0] for entry in environ.split("\0") if entry}
        assert not {name for name in names if name.startswith("QUIVER_")} - {"QUIVER_ENGINE_NICE",
                                                                            "QUIVER_CPU_LORA_PLUGIN",
                                                                            "QUIVER_CPU_LORA_KERNEL",
                                                                            "QUIVER_KERNEL_CACHE",
                                                                            "QUIVER_PINNED_SLOTS"}
        assert not {name for name in names if name.startswith("AWS_")}
        for secret in secrets:
            assert secret not in environ


@pytest.mark.parametrize("name", ["QUIVER_ADMIN_KEYS", "QUIVER_API_KEYS", "QUIVER_TENANT_KEYS", "AWS_ACCESS_KEY_ID",
                                  "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN", "OPENAI_API_KEY",
                                  "VLLM_API_KEY", "QUIVER_STORE_URL", "SOME_UNRELATED_VARIABLE"])
def test_the_engine_environment_is_an_allow_list(name: str, tmp_path: Path) -> None:
    from quiver.engine import engine_environment

    parent = {"PATH": "/usr/bin", "HOME": "/root", name: "secret-value-123", "VLLM_LOGGING_LEVEL": "INFO"}
    env = engine_environment(Settings(state_dir=tmp_path), api_key="per-start-key", parent=parent)
    assert "secret-value-123" not in env.values()
    assert env["VLLM_API_KEY"] == "per-start-key"  # only the key made for this start
    assert env["PATH"] == "/usr/bin" and env["VLLM_LOGGING_LEVEL"] == "INFO"



@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_the_client_types_what_vllm_answers(quiver_server, fake_adapter: Path, tmp_path: Path) -> None:
    from quiver.engine_client import AdapterAlreadyLoaded, AdapterNotFound, EngineRejected, HttpEngineClient

    client = HttpEngineClient(quiver_server.engine_url, quiver_server.engine_key)
    outsider = HttpEngineClient(quiver_server.engine_url, "not-the-key")
    name = "typed-probe@1"  # loaded behind the gateway's back on purpose, and unloaded again
    try:
        await client.load_adapter(name, fake_adapter)
        assert name in await client.loaded_models()
        with pytest.raises(AdapterAlreadyLoaded):
            await client.load_adapter(name, fake_adapter)
        await client.unload_adapter(name)
        with pytest.raises(AdapterNotFound):
            await client.unload_adapter(name)
        with pytest.raises(AdapterNotFound):
            await client.load_adapter("typed-missing@1", tmp_path / "no-such-adapter")
        with pytest.raises(EngineRejected) as refused:
            await outsider.load_adapter("typed-intruder@1", fake_adapter)
        assert refused.value.status == 401
        assert "typed-intruder@1" not in await client.loaded_models()
        await client.health()
        assert "vllm:" in await client.metrics_text()
    finally:
        await client.aclose()
        await outsider.aclose()


def test_the_engine_plugins_switches_reach_the_engine(tmp_path: Path) -> None:
    """The plugin reads its switches, its kernel cache and the compiler inside the engine: they must pass."""
    from quiver.engine import engine_environment

    parent = {"PATH": "/usr/bin", "QUIVER_CPU_LORA_PLUGIN": "1", "QUIVER_CPU_LORA_KERNEL": "0",
              "QUIVER_KERNEL_CACHE": str(tmp_path / "kernels"), "CC": "gcc"}
    env = engine_environment(Settings(state_dir=tmp_path), api_key="k" * 32, parent=parent)
    assert {name: env.get(name) for name in parent} == parent
