"""Shared fixtures: the real default model, real PEFT adapters, and one real quiver server per session.

Tests that need a real vLLM engine (they use the session server, or start a `QuiverServer` of their own) are
marked `engine` here, centrally: `pytest -m "not engine"` is the fast group (gateway logic on the fake
engine, admission, stores, training data...), `make test` runs everything."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from quiver.common.base_model import prepare_default_model  # noqa: E402
from quiver.settings import Settings  # noqa: E402
# One launcher for tests, load tests and benchmarks; re-exported for the test modules that import it from here.
from quiver.testing import ADMIN_KEY, API_KEY, QuiverServer, free_port  # noqa: E402,F401

# Tenant keys (inference only, scoped to adapters by name pattern), set on the session server.
TENANT_KEYS = {"test-tenant-acme-key": ["acme-*"], "test-tenant-globex-key": ["globex-bot", "shared-?"]}
PIRATE_ANSWER = "Arr, matey! That be a fine question for a pirate."


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


@pytest.fixture(scope="session")
def fake_adapter(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small real PEFT adapter (admission checks read it); the fake engine never reads its weights."""
    from lora_factory import random_adapter

    return random_adapter(model_dir, tmp_path_factory.mktemp("fake-adapter") / "adapter", seed=3)


# Fixtures that start a real engine; a module that has a `QuiverServer` (imported or its own) starts one too.
ENGINE_FIXTURES = {"quiver_server"}
# Tests that run real training steps (minutes on a 2-core CPU): `make test` runs them, the fast group does not.
TRAINING_MODULES = {"test_training_trainer", "test_training_e2e"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = getattr(item, "module", None)
        if ENGINE_FIXTURES & set(getattr(item, "fixturenames", ())) or hasattr(module, "QuiverServer"):
            item.add_marker(pytest.mark.engine)
        if getattr(module, "__name__", "").rpartition(".")[2] in TRAINING_MODULES:
            item.add_marker(pytest.mark.training)


@pytest.fixture
def make_gateway(model_dir: Path, tmp_path: Path):
    """In-process gateways on a fake engine (or the one given), sharing this test's store; `state` names a
    replica's own state folder; settings overrides as keywords. A fake engine left failing or gated is freed
    before its gateway stops."""
    from quiver.fake_engine import FakeEngine
    from quiver.testing import InProcessGateway

    started: list[InProcessGateway] = []

    def make(engine: "FakeEngine | None" = None, state: str = "state", **overrides) -> InProcessGateway:
        settings = Settings(
            model_cache_dir=model_dir.parent, store_dir=tmp_path / "store", state_dir=tmp_path / state,
            finetuning_dir=tmp_path / "ft", admin_keys=[ADMIN_KEY], api_keys=[API_KEY],
            **{"store_poll_s": 0, **overrides},
        )
        gateway = InProcessGateway(settings, engine or FakeEngine("SmolLM2-135M-Instruct")).start()
        started.append(gateway)
        return gateway

    yield make
    for gateway in started:
        gateway.engine.threadsafe(gateway.engine.fail, None)
        if gateway.engine.gate is not None:
            gateway.engine.release()
        gateway.stop()
