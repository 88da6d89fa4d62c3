"""Shared fixtures: the real default model, real PEFT adapters, and one real quiver server per session."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from quiver.base_model import DEFAULT_MODEL_NAME, prepare_default_model  # noqa: E402
from quiver.settings import Settings  # noqa: E402

ADMIN_KEY = "test-admin-key"
API_KEY = "test-inference-key"
# Tenant keys (inference only, scoped to adapters by name pattern), set on the session server.
TENANT_KEYS = {"test-tenant-acme-key": ["acme-*"], "test-tenant-globex-key": ["globex-bot", "shared-?"]}
READY_TIMEOUT_S = 900
PIRATE_ANSWER = "Arr, matey! That be a fine question for a pirate."


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class QuiverServer:
    """A real `quiver serve` process (gateway + vLLM engine) with its own store."""

    model_dir: Path
    store_dir: Path
    state_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    admin_key = ADMIN_KEY
    api_key = API_KEY
    model_name = DEFAULT_MODEL_NAME

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "gateway.log"

    def start(self) -> "QuiverServer":
        env = dict(os.environ)
        env.update(
            QUIVER_PORT=str(self.port),
            QUIVER_MODEL_CACHE_DIR=str(self.model_dir.parent),
            QUIVER_STORE_DIR=str(self.store_dir),
            QUIVER_STATE_DIR=str(self.state_dir),
            QUIVER_FINETUNING_DIR=str(self.store_dir.parent / "finetuning"),
            QUIVER_ADMIN_KEYS=ADMIN_KEY,
            QUIVER_API_KEYS=API_KEY,
            QUIVER_KV_CACHE_GIB="1",
        )
        env.update(self.extra_env)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "quiver.cli", "serve"], env=env,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready()
        return self

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"quiver serve exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"quiver serve was not ready in {timeout_s}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def log_tail(self, chars: int = 4000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        engine_log = self.state_dir / "engine.log"
        if engine_log.exists():
            text += "\n--- engine ---\n" + engine_log.read_text(errors="replace")
        return text[-chars:]

    def engine_models(self) -> set[str]:
        """What the engine itself has loaded (base and `name@version`s), asked on its private port: the
        gateway's own view could hide a leak."""
        import psutil

        assert self.process is not None
        engine = next(p for p in psutil.Process(self.process.pid).children() if "vllm" in " ".join(p.cmdline()))
        args = engine.cmdline()
        port = args[args.index("--port") + 1]
        return {model["id"] for model in httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).json()["data"]}

    def openai(self, key: str | None = API_KEY, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.base_url}/v1", api_key=key or "none", max_retries=0, **kwargs)

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120)

    def register(self, name: str, folder: Path, **form: str) -> httpx.Response:
        files = [("files", (path.name, path.read_bytes())) for path in sorted(folder.iterdir()) if path.is_file()]
        with self.admin() as client:
            return client.post("/v1/adapters", data={"name": name, **form}, files=files)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    override = os.environ.get("QUIVER_TEST_MODEL_DIR")
    return prepare_default_model(Path(override) if override else Settings().model_dir)


@dataclass
class TestAdapters:
    """PEFT adapters for the base model: two random (non-zero B) and one briefly trained 'pirate'."""

    random_a: Path
    random_b: Path
    pirate: Path


@pytest.fixture(scope="session")
def lora_adapters(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TestAdapters:
    from lora_factory import random_adapter, trained_adapter

    root = tmp_path_factory.mktemp("loras")
    return TestAdapters(
        random_a=random_adapter(model_dir, root / "random-a", seed=1, scale=8.0),
        random_b=random_adapter(model_dir, root / "random-b", seed=2, scale=8.0, target_modules=["q_proj", "v_proj", "down_proj"]),
        pirate=trained_adapter(model_dir, root / "pirate", PIRATE_ANSWER),
    )


@pytest.fixture(scope="session")
def quiver_server(model_dir: Path, lora_adapters: TestAdapters, tmp_path_factory: pytest.TempPathFactory):
    # Adapters are built first, while no engine competes with training for the cores.
    root = tmp_path_factory.mktemp("server")
    server = QuiverServer(model_dir=model_dir, store_dir=root / "store", state_dir=root / "state",
                          extra_env={"QUIVER_TENANT_KEYS": json.dumps(TENANT_KEYS)})
    try:
        yield server.start()
    finally:
        server.stop()
