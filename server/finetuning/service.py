"""Training files and fine-tuning jobs, persisted on disk; jobs run one at a time in a worker process.

    <finetuning_dir>/files/<file-id>.jsonl + .json     uploaded training data and its record
    <finetuning_dir>/jobs/<job-id>/job.json            the job record (the gateway writes it)
    <finetuning_dir>/jobs/<job-id>/{spec.json, events.jsonl, result.json, train.log, run/}
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import BinaryIO

from quiver.adapters.service import AdapterRegistry
from quiver.errors import APIError
from quiver.finetuning.protocol import (
    FINISHED,
    CreateJobRequest,
    FileObject,
    FineTuningJob,
    Hyperparameters,
    JobError,
    JobEvent,
)
from quiver.training.job_files import RESULT, SPEC, TRAIN_LOG, EventLog, write_json_atomic

log = logging.getLogger(__name__)

FINE_TUNE_PURPOSE = "fine-tune"
_BASE_LEARNING_RATE = 1e-3  # the trainer's default; `learning_rate_multiplier` scales it
_MAX_REPORTED_ERRORS = 5


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def file_not_found(file_id: str, param: str = "file_id") -> APIError:
    return APIError(404, f"no file with id `{file_id}`", code="file_not_found", param=param)


def _page(items: list, after: str | None, limit: int) -> tuple[list, bool]:
    """OpenAI's cursor paging: the items after the one with id `after`, at most `limit`, and whether more follow."""
    if after:
        ids = [item.id for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    return items[:limit], len(items) > limit


class FileService:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)

    def data_path(self, file_id: str) -> Path:
        return self.root / f"{file_id}.jsonl"

    def create(self, filename: str, source: BinaryIO, purpose: str) -> FileObject:
        from quiver.training.data import check_dataset

        if purpose != FINE_TUNE_PURPOSE:
            raise APIError(400, f"only purpose `{FINE_TUNE_PURPOSE}` is supported", code="invalid_purpose",
                           param="purpose")
        file_id = _new_id("file")
        tmp = self.root / f".{file_id}.tmp"
        size = 0
        with open(tmp, "wb") as out:
            while chunk := source.read(1024 * 1024):
                size += len(chunk)
                out.write(chunk)
        report = check_dataset(tmp)
        if not report.ok:
            tmp.unlink()
            shown = "; ".join(str(issue) for issue in report.errors[:_MAX_REPORTED_ERRORS])
            more = len(report.errors) - _MAX_REPORTED_ERRORS
            raise APIError(400, f"the training file is invalid: {shown}" + (f" (and {more} more)" if more > 0 else ""),
                           code="invalid_training_file", param="file")
        record = FileObject(id=file_id, bytes=size, created_at=int(time.time()),
                            filename=Path(filename).name or "training.jsonl", purpose=purpose,
                            status_details=f"{len(report.examples)} examples, {len(report.warnings)} warnings")
        os.replace(tmp, self.data_path(file_id))
        write_json_atomic(self.root / f"{file_id}.json", record.model_dump())  # the record commits the upload
        return record

    def get(self, file_id: str, param: str = "file_id") -> FileObject:
        path = self.root / f"{file_id}.json"
        if not file_id.startswith("file-") or not path.is_file():
            raise file_not_found(file_id, param)
        return FileObject.model_validate_json(path.read_text())

    def list(self, after: str | None = None, limit: int = 10000) -> tuple[list[FileObject], bool]:
        records = [FileObject.model_validate_json(p.read_text()) for p in self.root.glob("file-*.json")]
        return _page(sorted(records, key=lambda r: (r.created_at, r.id), reverse=True), after, limit)

    def delete(self, file_id: str) -> None:
        self.get(file_id)
        (self.root / f"{file_id}.json").unlink()
        self.data_path(file_id).unlink(missing_ok=True)


class JobService:
    def __init__(self, root: Path, files: FileService, registry: AdapterRegistry, base_model_dir: Path) -> None:
        self.root = root
        self.files = files
        self.registry = registry
        self.base_model_dir = base_model_dir
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._runner: asyncio.Task | None = None
        self._worker: asyncio.subprocess.Process | None = None
        self._running_job: str | None = None
        self._cancelled: set[str] = set()
        root.mkdir(parents=True, exist_ok=True)

    # --- persistence -------------------------------------------------------------------------------

    def _job_dir(self, job_id: str) -> Path:
        return self.root / job_id

    def _save(self, job: FineTuningJob) -> None:
        write_json_atomic(self._job_dir(job.id) / "job.json", job.model_dump(mode="json"))

    def get(self, job_id: str) -> FineTuningJob:
        path = self._job_dir(job_id) / "job.json"
        if not job_id.startswith("ftjob-") or not path.is_file():
            raise APIError(404, f"no fine-tuning job with id `{job_id}`", code="job_not_found", param="fine_tuning_job_id")
        return FineTuningJob.model_validate_json(path.read_text())

    def list(self, after: str | None = None, limit: int = 20) -> tuple[list[FineTuningJob], bool]:
        jobs = sorted((FineTuningJob.model_validate_json(p.read_text()) for p in self.root.glob("ftjob-*/job.json")),
                      key=lambda job: (job.created_at, job.id), reverse=True)
        return _page(jobs, after, limit)

    def events(self, job_id: str, limit: int = 20) -> tuple[list[JobEvent], bool]:
        self.get(job_id)
        raw = EventLog(self._job_dir(job_id)).read()
        events = [JobEvent(id=f"ftevent-{job_id[6:]}-{n}", **event) for n, event in enumerate(raw)][::-1]
        return events[:limit], len(events) > limit

    def _update(self, job: FineTuningJob, message: str | None = None, level: str = "info", **changes) -> FineTuningJob:
        job = job.model_copy(update=changes)
        if job.status in FINISHED and job.finished_at is None:
            job.finished_at = int(time.time())
        self._save(job)
        if message:
            EventLog(self._job_dir(job.id)).emit(message, level=level)
        return job

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Resume after a restart: a job that was running is failed with the reason; queued ones run."""
        jobs, _ = self.list(limit=10**9)
        for job in sorted(jobs, key=lambda job: job.created_at):
            if job.status == "running":
                self._update(job, "The server restarted while this job was running", level="error", status="failed",
                             error=JobError(code="interrupted", message="the server restarted while the job was running"))
            elif job.status in ("validating_files", "queued"):
                self._queue.put_nowait(job.id)
        self._runner = asyncio.create_task(self._run_queue(), name="fine-tuning-jobs")

    async def stop(self) -> None:
        if self._runner:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        await self._kill_worker()

    async def create(self, request: CreateJobRequest) -> FineTuningJob:
        # The serving image leaves the `training` extra out; say so now rather than fail in the worker later.
        if importlib.util.find_spec("trl") is None or importlib.util.find_spec("datasets") is None:
            raise APIError(501, "fine-tuning is not installed on this server (the `training` extra: "
                                "pip install 'quiver[training]', or use the training image)",
                           code="training_unavailable")
        if request.model != self.registry.base_model_name:
            raise APIError(400, f"fine-tuning starts from the served base model `{self.registry.base_model_name}`, "
                                f"not `{request.model}`", code="model_not_available", param="model")
        self.files.get(request.training_file, param="training_file")
        if request.validation_file:
            self.files.get(request.validation_file, param="validation_file")
        hyperparameters = request.hyperparameters or Hyperparameters()
        if request.method and request.method.get("type", "supervised") != "supervised":
            raise APIError(400, "only supervised fine-tuning is supported", code="unsupported_method", param="method")
        method_hyper = ((request.method or {}).get("supervised") or {}).get("hyperparameters")
        if method_hyper:
            hyperparameters = Hyperparameters.model_validate(method_hyper)
        job_id = _new_id("ftjob")
        job = FineTuningJob(
            id=job_id, created_at=int(time.time()), model=request.model, status="validating_files",
            training_file=request.training_file, validation_file=request.validation_file,
            hyperparameters=hyperparameters, seed=request.seed if request.seed is not None else 42,
            suffix=request.suffix, metadata=request.metadata,
        )
        self._job_dir(job_id).mkdir(parents=True)
        job = self._update(job, "Validating training file")
        job = self._update(job, "Job queued", status="queued")
        self._queue.put_nowait(job_id)
        return job

    async def cancel(self, job_id: str) -> FineTuningJob:
        job = self.get(job_id)
        if job.status in FINISHED:
            raise APIError(409, f"job `{job_id}` has already {job.status}", code="job_finished", param="fine_tuning_job_id")
        self._cancelled.add(job_id)
        if self._running_job == job_id:
            await self._kill_worker()
        return self._update(job, "Job cancelled", status="cancelled")

    async def _kill_worker(self) -> None:
        worker = self._worker
        if worker is None or worker.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        await worker.wait()

    async def _run_queue(self) -> None:
        while True:
            job_id = await self._queue.get()
            if job_id in self._cancelled or self.get(job_id).status in FINISHED:
                continue
            try:
                await self._run(job_id)
            except Exception as exc:  # one broken job must not stop the queue
                log.exception("fine-tuning job %s failed", job_id)
                self._update(self.get(job_id), f"Job failed: {exc}", level="error", status="failed",
                             error=JobError(code="internal_error", message=str(exc)))

    def _train_config(self, job: FineTuningJob) -> dict:
        hyper = job.hyperparameters
        config: dict = {"seed": job.seed, "epochs": hyper.n_epochs}
        if hyper.batch_size != "auto":
            config["batch_size"] = hyper.batch_size
        if hyper.learning_rate_multiplier != "auto":
            config["learning_rate"] = _BASE_LEARNING_RATE * hyper.learning_rate_multiplier
        return config

    def _adapter_name(self, job: FineTuningJob) -> str:
        return f"{job.suffix or 'ft'}-{job.id.removeprefix('ftjob-')[:8]}"

    async def _run(self, job_id: str) -> None:
        job = self.get(job_id)
        job_dir = self._job_dir(job_id)
        name = self._adapter_name(job)
        write_json_atomic(job_dir / SPEC, {
            "name": name,
            "training_file": str(self.files.data_path(job.training_file).resolve()),
            "validation_file": str(self.files.data_path(job.validation_file).resolve()) if job.validation_file else None,
            "base_model_dir": str(self.base_model_dir.resolve()),
            "base_model_name": self.registry.base_model_name,
            "config": self._train_config(job),
        })
        job = self._update(job, status="running")
        self._running_job = job_id
        try:
            with open(job_dir / TRAIN_LOG, "ab") as train_log:
                self._worker = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "quiver.training.worker", str(job_dir),
                    stdin=asyncio.subprocess.DEVNULL, stdout=train_log, stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                )
            await self._worker.wait()
        finally:
            self._running_job = None
        if job_id in self._cancelled:
            return
        result = json.loads((job_dir / RESULT).read_text()) if (job_dir / RESULT).is_file() else None
        if not result or result.get("status") != "succeeded":
            error = (result or {}).get("error") or {"code": "worker_crashed",
                                                     "message": f"the training process exited with {self._worker.returncode}"}
            self._update(job, status="failed", error=JobError(**error))
            return
        run_dir = Path(result["run_dir"])
        files = [(path.name, open(path, "rb")) for path in (run_dir / "adapter_config.json",
                                                            run_dir / "adapter_model.safetensors")]
        try:
            version = await self.registry.register(name, files)
        finally:
            for _, handle in files:
                handle.close()
        self._update(job, f"New fine-tuned model created: {name} ({version.id})", status="succeeded",
                     fine_tuned_model=name, trained_tokens=result.get("trained_tokens"),
                     result_files=[])
