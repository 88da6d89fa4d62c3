"""The console's pages and the two public API routes the console needs that the API lacked.

The pages are static files (no server-side state, no private endpoints): the browser calls the same routes, with
the same key and the same error envelopes, as any other client, so the console never has rights its key lacks.

- `POST /v1/files/check` (admin, like `/v1/files`): `quiver data check` on an uploaded JSONL file, nothing stored:
  every finding with its line, token counts with the base model's tokenizer, and the split a job will use.
- `GET /v1/fine_tuning/jobs/{id}/manifest` (admin, like its siblings): the finished run's manifest (data hashes,
  split, hyperparameters, losses, curve warnings), what an adapter trained by a job carries.
- `GET /v1/metrics/summary` (any generation key, scoped like `/v1/models`): engine state, queue, rejections, and per
  adapter a series over the last hour (requests, tokens/s, latency p50/p99, error rate) from quiver's own metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
from collections import deque
from contextlib import asynccontextmanager
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, File, Request, UploadFile
from fastapi.responses import FileResponse, RedirectResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from quiver.adapters.service import AdapterRegistry
from quiver.auth import ModelScope, admin_auth, inference_auth
from quiver.engine_client import Engine
# A router is the HTTP layer: it may answer with an APIError directly (services raise domain errors).
from quiver.errors import APIError, error_responses
from quiver.finetuning.service import JobService
from quiver.metrics import Metrics
from quiver.settings import Settings

STATIC = Path(__file__).parent / "static"
SAMPLE_EVERY_S = 30.0
WINDOW_S = 3600.0
_PAGES = {"index.html": "text/html", "app.js": "text/javascript", "app.css": "text/css"}


class MetricsSampler:
    """Snapshots of quiver's cumulative per-adapter counters, every `SAMPLE_EVERY_S`, for the last hour.

    Prometheus keeps no history by itself; a few hundred numbers in memory give the console its small charts
    without asking operators to run a Prometheus server first."""

    def __init__(self) -> None:
        self.snapshots: deque[tuple[float, dict[str, dict[str, Any]]]] = deque(maxlen=int(WINDOW_S / SAMPLE_EVERY_S) + 1)

    @staticmethod
    def read(registry) -> dict[str, dict[str, Any]]:
        per: dict[str, dict[str, Any]] = {}

        def entry(adapter: str) -> dict[str, Any]:
            return per.setdefault(adapter, {"requests": 0.0, "errors": 0.0, "completion_tokens": 0.0, "buckets": {}})

        for family in registry.collect():
            for sample in family.samples:
                adapter = sample.labels.get("adapter")
                if not adapter:
                    continue
                if sample.name == "quiver_requests_total":
                    entry(adapter)["requests"] += sample.value
                    if not sample.labels.get("status", "").startswith("2"):
                        entry(adapter)["errors"] += sample.value
                elif sample.name == "quiver_completion_tokens_total":
                    entry(adapter)["completion_tokens"] += sample.value
                elif sample.name == "quiver_request_duration_seconds_bucket":
                    entry(adapter)["buckets"][float(sample.labels["le"])] = sample.value
        return per

    def sample(self, registry) -> None:
        self.snapshots.append((time.time(), self.read(registry)))

    def series(self, registry, scope: ModelScope, base_model: str) -> dict[str, list[dict[str, Any]]]:
        """Per adapter, one point per interval between snapshots; the last interval ends now."""
        points = [*self.snapshots, (time.time(), self.read(registry))]
        series: dict[str, list[dict[str, Any]]] = {}
        for (t0, before), (t1, after) in zip(points, points[1:]):
            for adapter, now in after.items():
                if not scope.allows(None if adapter == base_model else adapter):
                    continue
                was = before.get(adapter, {"requests": 0.0, "errors": 0.0, "completion_tokens": 0.0, "buckets": {}})
                requests = now["requests"] - was["requests"]
                buckets = {le: n - was["buckets"].get(le, 0.0) for le, n in now["buckets"].items()}
                series.setdefault(adapter, []).append({
                    "t": int(t1), "requests": int(requests),
                    "tokens_per_s": round((now["completion_tokens"] - was["completion_tokens"]) / max(t1 - t0, 1.0), 2),
                    "error_rate": round((now["errors"] - was["errors"]) / requests, 4) if requests else None,
                    "p50_s": _quantile(buckets, 0.5), "p99_s": _quantile(buckets, 0.99),
                })
        return series


def _quantile(buckets: dict[float, float], q: float) -> float | None:
    """The upper bound of the histogram bucket holding quantile `q` (Prometheus buckets are cumulative)."""
    total = buckets.get(float("inf"), 0.0)
    if total <= 0:
        return None
    for le in sorted(buckets):
        if buckets[le] >= q * total:
            return le if le != float("inf") else max((b for b in buckets if b != float("inf")), default=None)
    return None


_sampler = MetricsSampler()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async def sample_forever() -> None:
        while True:
            _sampler.sample(app.state.metrics.registry)
            await asyncio.sleep(SAMPLE_EVERY_S)

    task = asyncio.create_task(sample_forever(), name="console-metrics-sampler")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


router = APIRouter(lifespan=lifespan)


# --- pages: public like /health; they hold no data, every call they make carries the user's key ---------------

@router.get("/", include_in_schema=False)
async def root() -> RedirectResponse:
    return RedirectResponse("/console/", status_code=307)


@router.get("/console", include_in_schema=False)
async def console_no_slash() -> RedirectResponse:
    return RedirectResponse("/console/", status_code=307)


@router.get("/console/{page:path}", include_in_schema=False)
async def console_page(page: str) -> FileResponse:
    # Only the known files: the path never reaches the filesystem, so no traversal is possible.
    name = page if page in _PAGES else "index.html"
    if page and page not in _PAGES and "." in page.rsplit("/", 1)[-1]:
        raise APIError(404, f"no console file `{page}`", code="not_found")
    return FileResponse(STATIC / name, media_type=_PAGES[name],
                        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                                 "Content-Security-Policy": "default-src 'self'; style-src 'self'; img-src 'self' data:; "
                                                            "connect-src 'self'; frame-ancestors 'none'"})


# --- API -----------------------------------------------------------------------------------------------------

async def _settings(request: Request) -> Settings:
    return request.app.state.settings


async def _jobs(request: Request) -> JobService:
    return request.app.state.jobs


async def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def _engine(request: Request) -> Engine | None:
    return getattr(request.app.state, "engine", None)  # absent until the lifespan has built it


async def _registry(request: Request) -> AdapterRegistry | None:
    return getattr(request.app.state, "registry", None)


AppSettings = Annotated[Settings, Depends(_settings)]
Jobs = Annotated[JobService, Depends(_jobs)]
AppMetrics = Annotated[Metrics, Depends(_metrics)]
MaybeEngine = Annotated[Engine | None, Depends(_engine)]
MaybeRegistry = Annotated[AdapterRegistry | None, Depends(_registry)]

class Finding(BaseModel):
    severity: str
    code: str
    message: str
    line: int | None


class DataCheck(BaseModel):
    object: str = "data_check"
    ok: bool
    lines: int
    examples: int
    findings: list[Finding]
    tokens: dict[str, Any] | None
    auto_epochs: int | None
    max_seq_len: int
    split: dict[str, int] | None = None
    split_seed: int


@lru_cache(maxsize=2)
def _tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _check(path: Path, model_dir: Path) -> DataCheck:
    from quiver.training.config import TrainConfig
    from quiver.training.data import check_training_file, split_examples

    config = TrainConfig()  # what a job with default hyperparameters will use
    report = check_training_file(path, _tokenizer(str(model_dir)), config.max_seq_len, format="auto")
    split = None
    if report.ok and report.examples:
        try:
            parts = split_examples(report.examples, config.seed, config.validation_fraction, config.test_fraction)
            split = {"train": len(parts.train), "validation": len(parts.validation), "test": len(parts.test)}
        except ValueError:
            split = None  # too few examples: the finding says so
    return DataCheck(
        ok=report.ok, lines=report.lines, examples=len(report.examples),
        findings=[Finding(severity=i.severity, code=i.code, message=i.message, line=i.line)
                  for i in sorted(report.issues, key=lambda i: (i.line or 0, i.severity))],
        tokens=report.tokens.__dict__ if report.tokens else None, auto_epochs=report.auto_epochs,
        max_seq_len=config.max_seq_len, split=split, split_seed=config.seed,
    )


@router.post("/v1/files/check", tags=["fine-tuning"], dependencies=[Depends(admin_auth)],
             responses=error_responses(400, 401, 403, 413))
async def check_file(settings: AppSettings,
                     file: Annotated[UploadFile, File(description="JSONL training data")]) -> DataCheck:
    """`quiver data check` on a JSONL file without storing it: findings by line, tokens, the split a job uses."""
    max_bytes = settings.max_upload_bytes
    with tempfile.TemporaryDirectory(prefix="quiver-check-") as tmp:
        path = Path(tmp) / "data.jsonl"
        size = 0
        with open(path, "wb") as out:
            while chunk := await file.read(1024 * 1024):
                size += len(chunk)
                if size > max_bytes:
                    raise APIError(413, f"the file is larger than this server's limit of {max_bytes} bytes",
                                   code="file_too_large", param="file")
                out.write(chunk)
        return await run_in_threadpool(_check, path, settings.model_dir)


@router.get("/v1/fine_tuning/jobs/{job_id}/manifest", tags=["fine-tuning"], dependencies=[Depends(admin_auth)],
            responses=error_responses(401, 403, 404))
async def job_manifest(job_id: str, jobs: Jobs) -> dict[str, Any]:
    """The training run's manifest.json: data hashes and split, hyperparameters, losses and the curve's warnings."""
    raw = jobs.manifest(job_id)  # 404 for an unknown id; from the shared records, whichever replica trained it
    if raw is None:
        raise APIError(404, f"job `{job_id}` has no training manifest (yet)", code="manifest_not_found",
                       param="fine_tuning_job_id")
    return json.loads(raw)


Scope = Annotated[ModelScope, Depends(inference_auth)]


@router.get("/v1/metrics/summary", tags=["operations"], responses=error_responses(401))
async def metrics_summary(scope: Scope, engine: MaybeEngine, registry: MaybeRegistry,
                          metrics: AppMetrics) -> dict[str, Any]:
    """Engine state, queue, rejections, adapters, and per adapter (only those this key may see) a series over the
    last hour: requests, completion tokens/s, latency p50/p99 (histogram bucket bounds) and error rate (answers other than 2xx)."""
    samples = [sample for family in metrics.registry.collect() for sample in family.samples]
    rejected = {s.labels["reason"]: int(s.value) for s in samples if s.name == "quiver_rejected_requests_total"}
    base = registry.base_model_name if registry else ""
    visible = registry.list(scope) if registry else []
    return {
        "object": "metrics.summary",
        "engine": {"up": bool(engine and engine.ready), "restarts": getattr(engine, "restarts", 0)},
        "queue_depth": int(next((s.value for s in samples if s.name == "quiver_queue_depth"), 0)),
        "rejected_requests": rejected,
        "adapters_registered": len(visible),
        "adapter_versions_registered": sum(len(adapter.versions) for adapter in visible),
        # the registry's own record of what the running engine holds (reset when the engine restarts)
        "adapter_versions_loaded": len([n for n in getattr(registry, "_loaded", ())
                                        if scope.allows(n.partition("@")[0])]),
        "sample_every_s": SAMPLE_EVERY_S,
        "adapters": _sampler.series(metrics.registry, scope, base),
    }
