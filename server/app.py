"""The app factory: `create_app(settings, engine=None)`; its lifespan prepares the model and owns the engine
(a supervised vLLM process unless another `quiver.engine_client.Engine` is given, e.g. the fake engine)."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi_offline import FastAPIOffline
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from quiver import __version__
from quiver.adapters.router import router as adapters_router
from quiver.adapters.service import AdapterRegistry
from quiver.adapters.store_factory import open_store
from quiver.adapters.validation import BaseModelSpec
from quiver.auth import Auth, AuthGate, metrics_auth
from quiver.common.base_model import prepare_default_model
from quiver.engine import EngineSupervisor
from quiver.engine_client import Engine, EngineError
from quiver.console.router import router as console_router
from quiver.errors import document_errors, error_response, error_responses, install_error_handlers
from quiver.finetuning.router import router as finetuning_router
from quiver.finetuning.launcher import LocalLauncher
from quiver.finetuning.records import open_records
from quiver.finetuning.service import FileService, JobService
from quiver.inference.limiter import KeyLimiter, RequestLimiter
from quiver.inference.router import router as inference_router
from quiver.suites.router import router as suites_router
from quiver.suites.live import LiveScorer
from quiver.suites.service import SuiteService
from quiver.inference.service import InferenceService
from quiver.limits import BodySizeLimit
from quiver.metrics import Metrics
from quiver.observability import RequestIdMiddleware, install_tracing, tracing_endpoint
from quiver.settings import Settings
from quiver.usage.router import router as usage_router
from quiver.usage.service import UsageLedger

log = logging.getLogger(__name__)


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    injected = engine

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = app.state
        model_dir = settings.model_dir
        if settings.uses_default_model:
            await asyncio.to_thread(prepare_default_model, model_dir)
        base = await asyncio.to_thread(BaseModelSpec.from_folder, model_dir, settings.lora_target_modules)
        engine: Engine = injected if injected is not None else EngineSupervisor(settings, model_dir)
        registry = AdapterRegistry(
            store=open_store(settings),
            engine=engine,
            base=base,
            base_model_name=settings.base_model_name,
            max_rank=settings.max_lora_rank,
            max_upload_bytes=settings.max_upload_bytes,
            metrics=state.metrics,
            engine_copies_dir=settings.state_dir / "engine-adapters",
            max_pins=settings.pinned_slots,
        )
        registry.load_store()
        engine.on_restart(registry.forget_engine_state)
        state.engine, state.registry = engine, registry
        state.suites = registry.gate = SuiteService(registry.store, engine, registry)
        state.live_scorer = registry.sampler = LiveScorer(registry, state.suites, settings.canary_sample_queue,
                                                          settings.canary_sample_concurrency)
        limiter = RequestLimiter(settings.max_running_requests, settings.max_waiting_requests, state.metrics)
        state.usage = UsageLedger(settings.state_dir / "usage.sqlite3", settings.usage_retention_days * 86_400)
        state.inference = InferenceService(
            engine, registry, state.metrics, limiter,
            max_completion_tokens=settings.max_completion_tokens or settings.max_model_len,
            max_n=settings.max_n, usage=state.usage,
        )
        records = open_records(settings)  # beside the adapter store: every replica sees the same files and jobs
        state.files = FileService(records.child("files"), settings.max_upload_bytes)
        state.jobs = JobService(records.child("jobs"), state.files, registry, model_dir,
                                poll_s=settings.finetuning_poll_s, lease_s=settings.finetuning_lease_s,
                                run_jobs=settings.finetuning_runner == "local",
                                launcher=LocalLauncher(settings.finetuning_processes))
        background: list[asyncio.Task] = []
        try:
            await engine.start()
            await registry.sync_pins()  # the store's pins, in this replica's engine
            state.jobs.start()
            if settings.store_poll_s:
                background.append(asyncio.create_task(registry.watch_store(settings.store_poll_s)))
            background.append(asyncio.create_task(state.usage.run()))
            state.live_scorer.start()
            yield
        finally:
            for task in background:
                task.cancel()
            await state.live_scorer.stop()
            await state.jobs.stop()
            await engine.stop()
            await asyncio.to_thread(state.usage.close)

    # FastAPIOffline: /docs and /redoc load their scripts and styles from quiver itself (files shipped in the
    # fastapi-offline package), not from a CDN, so they work on a cluster without internet access.
    app = FastAPIOffline(title="quiver", version=__version__, lifespan=lifespan,
                         description="One base model, a quiver of LoRA adapters, behind an OpenAI-compatible API.")
    app.state.settings = settings
    app.state.auth = Auth(settings)
    app.state.metrics = Metrics()
    app.state.started_at = int(time.time())
    install_error_handlers(app)
    document_errors(app)
    app.add_middleware(
        BodySizeLimit,
        default_limit=settings.max_request_bytes,
        # room for multipart framing
        limits_by_path={path: settings.max_upload_bytes + 1024 * 1024 for path in ("/v1/adapters", "/v1/files", "/v1/files/check")},
    )
    # Outermost: a request without the right key is refused before any body is read or counted.
    app.add_middleware(AuthGate, auth=app.state.auth,
                       key_limits=KeyLimiter(settings.key_requests_per_minute, settings.key_max_concurrent,
                                             app.state.metrics))
    if tracing_endpoint(settings.otlp_endpoint):
        install_tracing(app, settings.otlp_endpoint)
    # Added last, so outermost: every response, refusals by the middlewares above included, carries its id.
    app.add_middleware(RequestIdMiddleware)
    app.include_router(inference_router)
    app.include_router(adapters_router)
    app.include_router(suites_router)
    app.include_router(finetuning_router)
    app.include_router(usage_router)
    app.include_router(console_router)  # the web console at /console (and `/` redirects there)

    @app.get("/health", tags=["operations"])
    async def health() -> dict[str, str]:
        """Liveness: the gateway process answers."""
        return {"status": "ok"}

    @app.get("/ready", tags=["operations"], responses={200: {"content": {"application/json": {"schema": {
        "type": "object", "properties": {"status": {"const": "ready"}}, "required": ["status"]}}}},
        **error_responses(503)})
    async def ready(request: Request) -> Response:
        """Readiness: the engine is up and the registry is loaded."""
        state = request.app.state
        engine = getattr(state, "engine", None)
        if engine is None or not engine.ready:
            return error_response(503, "the engine is not ready", "engine_unavailable")
        if state.inference.draining:
            return error_response(503, "the server is shutting down", "server_draining")
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", tags=["operations"], response_class=PlainTextResponse,
             dependencies=[Depends(metrics_auth)] if settings.metrics_require_key else [],
             responses=error_responses(401, 403) if settings.metrics_require_key else None)
    async def metrics(request: Request) -> Response:
        """quiver's per-adapter metrics, then the engine's own `vllm:*` metrics."""
        state = request.app.state
        engine = getattr(state, "engine", None)
        state.metrics.engine_up.set(1 if engine is not None and engine.ready else 0)
        text = state.metrics.render()
        if engine is not None and engine.ready:
            try:
                text += (await engine.metrics_text()).encode()
            except EngineError:
                log.warning("the engine's metrics could not be read")
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


class _DrainingServer(uvicorn.Server):
    """On the first SIGTERM/SIGINT: readiness goes false, new requests get 503, in-flight ones may finish
    (up to the drain timeout); then the usual shutdown stops the engine. A second signal stops at once."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout_s: float) -> None:
        super().__init__(config)
        self._app = app
        self._drain_timeout_s = drain_timeout_s
        self._drain_requested = False
        self._drain_task: asyncio.Task | None = None

    def handle_exit(self, sig, frame) -> None:  # runs in the signal handler: only set flags here
        if not self._drain_requested and hasattr(self._app.state, "inference"):
            self._drain_requested = True
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._drain_requested and self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain_then_exit())
        return await super().on_tick(counter)

    async def _drain_then_exit(self) -> None:
        inference = self._app.state.inference
        log.info("draining: %d requests in flight, up to %gs", inference.in_flight, self._drain_timeout_s)
        await inference.drain(self._drain_timeout_s)
        self.should_exit = True


def uvicorn_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    # log_config=None: uvicorn's loggers propagate to the root handler (configure_logging), so its lines
    # get quiver's format and request ids.
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info", log_config=None,
                          timeout_graceful_shutdown=5)


def serve(settings: Settings) -> None:
    app = create_app(settings)
    _DrainingServer(uvicorn_config(app, settings), app, settings.drain_timeout_s).run()
