"""A quiver app in this process, for checks where the engine plays no role (no engine is started).

`create_app` is used as is; its lifespan (which starts vLLM) is not run. In its place the registry and the
inference service are built on a real local store and the real base model's shapes. `NoEngine` stands where
the engine would be: it reports ready, and any call that would reach the engine fails the test (or, for the
per-key concurrency check, waits until released) - these tests are about what the gateway decides alone.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from quiver.adapters.service import AdapterRegistry
from quiver.adapters.store import LocalAdapterStore
from quiver.adapters.validation import BaseModelSpec
from quiver.app import create_app
from quiver.engine_client import EngineUnavailable
from quiver.inference.limiter import RequestLimiter
from quiver.inference.service import InferenceService
from quiver.settings import Settings


class NoEngine:
    """A stand-in behind the engine seam (`quiver.engine_client.Engine`) that never generates: a generation
    waits until `release` is set, then fails the way an unreachable engine does (`EngineUnavailable`, which
    the gateway answers with its 503 envelope). Adapter loads fail the test."""

    ready = True
    restarts = 0

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.posts = 0

    async def generate(self, _endpoint, _body):
        self.posts += 1
        await self.release.wait()
        raise EngineUnavailable("no engine in this test")

    async def metrics_text(self) -> str:
        return ""  # the engine's own series: none here

    async def loaded_models(self) -> set[str]:
        return set()

    async def load_adapter(self, *_args, **_kwargs) -> None:
        raise AssertionError("this test must not reach the engine")

    async def unload_adapter(self, *_args, **_kwargs) -> None:
        raise AssertionError("this test must not reach the engine")


def inprocess_app(tmp_path: Path, model_dir: Path, engine: "NoEngine | None" = None, **settings: object):
    config = Settings(model=model_dir, store_dir=tmp_path / "store", state_dir=tmp_path / "state",
                      finetuning_dir=tmp_path / "finetuning", **settings)
    app = create_app(config)
    engine = engine or NoEngine()
    registry = AdapterRegistry(store=LocalAdapterStore(config.store_dir), engine=engine,  # type: ignore[arg-type]
                               base=BaseModelSpec.from_folder(model_dir), base_model_name=config.base_model_name,
                               max_rank=config.max_lora_rank, max_upload_bytes=config.max_upload_bytes,
                               metrics=app.state.metrics)
    registry.load_store()
    app.state.engine, app.state.registry = engine, registry
    app.state.inference = InferenceService(
        engine, registry, app.state.metrics,  # type: ignore[arg-type]
        RequestLimiter(config.max_running_requests, config.max_waiting_requests, app.state.metrics),
        max_completion_tokens=config.max_completion_tokens or config.max_model_len, max_n=config.max_n)
    return app, engine


def client(app, key: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://quiver", headers=headers,
                             timeout=120)


class LoadingEngine(NoEngine):
    """For the storage-failure checks only: accepts every adapter load and records loads and unloads, so a
    test can tell that a version whose registration failed was taken out of the engine again."""

    def __init__(self) -> None:
        super().__init__()
        self.loaded: set[str] = set()

    async def load_adapter(self, key: str, _path) -> None:
        self.loaded.add(key)

    async def unload_adapter(self, key: str) -> None:
        self.loaded.discard(key)
