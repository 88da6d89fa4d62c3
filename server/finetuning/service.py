"""Training files and fine-tuning jobs, persisted on disk; jobs run one at a time in a worker process.

    <finetuning_dir>/files/<file-id>.jsonl + .json     uploaded training data and its record
    <finetuning_dir>/jobs/<job-id>/job.json            the job record (the gateway writes it)
    <finetuning_dir>/jobs/<job-id>/{spec.json, events.jsonl, result.json, train.log, run/}
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import re
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import BinaryIO, TypeVar

from pydantic import BaseModel

from quiver.adapters.service import AdapterRegistry
from quiver.errors import Conflict, InvalidRequest, NotFound, NotSupported, PayloadTooLarge
from quiver.finetuning.protocol import (
    FINISHED,
    CreateJobRequest,
    FileObject,
    FineTuningJob,
    JobError,
    JobEvent,
)
from quiver.common.files import write_json_atomic
from quiver.common.jobs import RESULT, SPEC, TRAIN_LOG, EventLog, Hyperparameters, JobResult, JobSpec, write_record

log = logging.getLogger(__name__)

FINE_TUNE_PURPOSE = "fine-tune"
_MAX_REPORTED_ERRORS = 5
_COPY_CHUNK = 1024 * 1024
# What `_new_id` makes; anything else is no id of ours (and never reaches a path).
_FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")
_JOB_ID = re.compile(r"^ftjob-[0-9a-f]{24}$")
Record = TypeVar("Record", bound=BaseModel)


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def load_record(path: Path, model: type[Record]) -> Record | None:
    """The record at `path`, or None when it is missing; an unreadable one is moved aside (and logged) so that
    it cannot stop the server or hide the records beside it."""
    try:
        return model.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except (ValueError, RecursionError) as exc:  # truncated, not JSON, too deep, or not this record's shape
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, aside)
            log.error("unreadable record %s moved aside to %s: %s", path, aside.name, str(exc).splitlines()[0])
        return None


def file_not_found(file_id: str, param: str = "file_id") -> NotFound:
    return NotFound(f"no file with id `{file_id}`", code="file_not_found", param=param)


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
        if purpose != FINE_TUNE_PURPOSE:
            raise InvalidRequest(f"only purpose `{FINE_TUNE_PURPOSE}` is supported", code="invalid_purpose",
                                 param="purpose")
        file_id = _new_id("file")
        tmp = self.root / f".{file_id}.tmp"
        try:
            size = self._copy_limited(source, tmp)
            report = self._check(tmp)
            record = FileObject(id=file_id, bytes=size, created_at=int(time.time()),
                                filename=Path(filename).name[:255] or "training.jsonl", purpose=purpose,
                                status_details=f"{len(report.examples)} examples, {len(report.warnings)} warnings")
            os.replace(tmp, self.data_path(file_id))
            write_json_atomic(self.root / f"{file_id}.json", record.model_dump())  # the record commits the upload
        except BaseException:
            # Whatever failed (a refusal, a full disk, a cancelled request): nothing of this upload stays behind.
            tmp.unlink(missing_ok=True)
            self.data_path(file_id).unlink(missing_ok=True)
            raise
        return record

    def _copy_limited(self, source: BinaryIO, target: Path) -> int:
        size = 0
        with open(target, "wb") as out:
            while chunk := source.read(_COPY_CHUNK):
                size += len(chunk)
                if size > self.max_bytes:
                    raise PayloadTooLarge(f"the file is larger than the limit of {self.max_bytes} bytes",
                                          code="file_too_large", param="file")
                out.write(chunk)
        return size

    @staticmethod
    def _check(path: Path):
        # The same parser and line-numbered checks as `quiver data check` (token checks need the tokenizer;
        # the worker runs them before training).
        from quiver.training.data import check_dataset

        report = check_dataset(path)
        if not report.ok:
            shown = "; ".join(str(issue) for issue in report.errors[:_MAX_REPORTED_ERRORS])
            more = len(report.errors) - _MAX_REPORTED_ERRORS
            raise InvalidRequest(f"the training file is invalid: {shown}" + (f" (and {more} more)" if more > 0 else ""),
                                 code="invalid_training_file", param="file")
        return report

    def get(self, file_id: str, param: str = "file_id") -> FileObject:
        record = load_record(self.root / f"{file_id}.json", FileObject) if _FILE_ID.match(file_id) else None
        if record is None:
            raise file_not_found(file_id, param)
        return record

    def list(self, after: str | None = None, limit: int = 10000) -> tuple[list[FileObject], bool]:
        records = [r for p in self.root.glob("file-*.json") if (r := load_record(p, FileObject)) is not None]
        return _page(sorted(records, key=lambda r: (r.created_at, r.id), reverse=True), after, limit)

    def delete(self, file_id: str) -> None:
        self.get(file_id)
        (self.root / f"{file_id}.json").unlink(missing_ok=True)
        self.data_path(file_id).unlink(missing_ok=True)


class JobService:
    """Jobs run one at a time. Each ends in exactly one terminal state: `_finish` never overwrites one, and
    registering the adapter is the commit point, taken under the same lock as cancelling: a job cancelled
    before it registers nothing, and a cancel that arrives while it registers waits and finds it succeeded."""

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
        self._commit = asyncio.Lock()
        root.mkdir(parents=True, exist_ok=True)

    # --- persistence -------------------------------------------------------------------------------

    def _job_dir(self, job_id: str) -> Path:
        return self.root / job_id

    def _save(self, job: FineTuningJob) -> None:
        write_json_atomic(self._job_dir(job.id) / "job.json", job.model_dump(mode="json"))

    def get(self, job_id: str) -> FineTuningJob:
        job = load_record(self._job_dir(job_id) / "job.json", FineTuningJob) if _JOB_ID.match(job_id) else None
        if job is None:
            raise NotFound(f"no fine-tuning job with id `{job_id}`", code="job_not_found", param="fine_tuning_job_id")
        return job

    def list(self, after: str | None = None, limit: int = 20) -> tuple[list[FineTuningJob], bool]:
        jobs = [job for p in self.root.glob("ftjob-*/job.json") if (job := load_record(p, FineTuningJob)) is not None]
        return _page(sorted(jobs, key=lambda job: (job.created_at, job.id), reverse=True), after, limit)

    def events(self, job_id: str, limit: int = 20) -> tuple[list[JobEvent], bool]:
        self.get(job_id)
        raw = EventLog(self._job_dir(job_id)).read()
        events = [JobEvent(id=f"ftevent-{job_id[6:]}-{n}", **event.model_dump()) for n, event in enumerate(raw)][::-1]
        return events[:limit], len(events) > limit

    def _update(self, job: FineTuningJob, message: str | None = None, level: str = "info", **changes) -> FineTuningJob:
        job = job.model_copy(update=changes)
        if job.status in FINISHED and job.finished_at is None:
            job.finished_at = int(time.time())
        self._save(job)
        if message:
            EventLog(self._job_dir(job.id)).emit(message, level=level)
        return job

    def _finish(self, job_id: str, status: str, message: str | None = None, level: str = "info",
                **changes) -> FineTuningJob:
        """Move the job to a terminal state unless it already reached one (which then stands)."""
        job = self.get(job_id)
        if job.status in FINISHED:
            log.info("job %s is already %s; not marking it %s", job_id, job.status, status)
            return job
        return self._update(job, message, level=level, status=status, **changes)

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Resume after a restart: a job that was running is failed with the reason; queued ones run."""
        jobs, _ = self.list(limit=10**9)
        for job in sorted(jobs, key=lambda job: job.created_at):
            if job.status == "running":
                self._finish(job.id, "failed", "The server restarted while this job was running", level="error",
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

    def _training_file(self, file_id: str, param: str) -> FileObject:
        record = self.files.get(file_id, param=param)  # 404 when it does not exist
        if record.purpose != FINE_TUNE_PURPOSE:
            raise InvalidRequest(f"file `{file_id}` has purpose `{record.purpose}`, not `{FINE_TUNE_PURPOSE}`",
                                 code="invalid_file_purpose", param=param)
        return record

    async def create(self, request: CreateJobRequest) -> FineTuningJob:
        # The serving image leaves the `training` extra out; say so now rather than fail in the worker later.
        if importlib.util.find_spec("trl") is None or importlib.util.find_spec("datasets") is None:
            raise NotSupported("fine-tuning is not installed on this server (the `training` extra: "
                               "pip install 'quiver[training]', or use the training image)",
                               code="training_unavailable")
        if request.model != self.registry.base_model_name:
            raise InvalidRequest(f"fine-tuning starts from the served base model `{self.registry.base_model_name}`, "
                                 f"not `{request.model}`", code="model_not_available", param="model")
        self._training_file(request.training_file, "training_file")
        if request.validation_file:
            self._training_file(request.validation_file, "validation_file")
        hyperparameters = request.hyperparameters or Hyperparameters()
        if request.method is not None:
            if request.method.type != "supervised":
                raise InvalidRequest(f"only supervised fine-tuning is supported, not `{request.method.type}`",
                                     code="unsupported_method", param="method.type")
            if request.method.supervised and request.method.supervised.hyperparameters:
                hyperparameters = request.method.supervised.hyperparameters
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
        async with self._commit:
            job = self.get(job_id)
            if job.status in FINISHED:
                raise Conflict(f"job `{job_id}` has already {job.status}", code="job_finished",
                               param="fine_tuning_job_id")
            self._cancelled.add(job_id)
            job = self._finish(job_id, "cancelled", "Job cancelled")
        if self._running_job == job_id:
            await self._kill_worker()
        return job

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
            try:
                if job_id in self._cancelled or self.get(job_id).status in FINISHED:
                    continue
                await self._run(job_id)
            except Exception as exc:  # one broken job must not stop the queue
                log.exception("fine-tuning job %s failed", job_id)
                with contextlib.suppress(NotFound):  # its record may be gone
                    self._finish(job_id, "failed", f"Job failed: {exc}", level="error",
                                 error=JobError(code="internal_error", message=str(exc)))

    def _adapter_name(self, job: FineTuningJob) -> str:
        return f"{job.suffix or 'ft'}-{job.id.removeprefix('ftjob-')[:8]}"

    def _worker_command(self, job_dir: Path) -> list[str]:
        return [
            sys.executable, "-m", "quiver.engine_guard", str(os.getpid()),  # the worker dies with the gateway
            sys.executable, "-m", "quiver.training.worker", str(job_dir),
        ]

    @staticmethod
    def _worker_env() -> dict[str, str]:
        # The spec carries everything the worker needs; the gateway's own settings (its keys among them) stay here.
        env = {key: value for key, value in os.environ.items() if not key.startswith("QUIVER_")}
        return {**env, "HF_HUB_OFFLINE": "1"}

    async def _run(self, job_id: str) -> None:
        job = self.get(job_id)
        job_dir = self._job_dir(job_id)
        name = self._adapter_name(job)
        write_record(job_dir / SPEC, JobSpec(
            name=name,
            training_file=self.files.data_path(job.training_file).resolve(),
            validation_file=self.files.data_path(job.validation_file).resolve() if job.validation_file else None,
            base_model_dir=self.base_model_dir.resolve(),
            base_model_name=self.registry.base_model_name,
            hyperparameters=job.hyperparameters,
            seed=job.seed,
        ))
        async with self._commit:
            if job_id in self._cancelled or self.get(job_id).status in FINISHED:
                return
            self._update(self.get(job_id), status="running")
            self._running_job = job_id
            self._worker = None
        try:
            with open(job_dir / TRAIN_LOG, "ab") as train_log:
                self._worker = await asyncio.create_subprocess_exec(
                    *self._worker_command(job_dir),
                    stdin=asyncio.subprocess.DEVNULL, stdout=train_log, stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True, env=self._worker_env(),
                )
            if job_id in self._cancelled:  # cancelled while the process was starting
                await self._kill_worker()
            await self._worker.wait()
        finally:
            self._running_job = None
        if job_id in self._cancelled:
            return
        result = load_record(job_dir / RESULT, JobResult)
        if result is None or result.status != "succeeded" or result.run_dir is None:
            error = result.error if result and result.error else None
            self._finish(job_id, "failed", level="error", error=JobError(
                code=error.code if error else "worker_crashed",
                message=error.message if error else f"the training process exited with {self._worker.returncode}"))
            return
        await self._register(job_id, name, result)

    async def _register(self, job_id: str, name: str, result: JobResult) -> None:
        async with self._commit:  # the commit point: a cancel either came before (nothing registers) or waits
            if job_id in self._cancelled or self.get(job_id).status in FINISHED:
                return
            run_dir = result.run_dir
            files = [(path.name, open(path, "rb")) for path in (run_dir / "adapter_config.json",
                                                                run_dir / "adapter_model.safetensors")]
            try:
                version = await self.registry.register(name, files)
            finally:
                for _, handle in files:
                    handle.close()
            gate = version.gate
            if gate is not None and not gate.passed:  # the name's suite kept it from becoming current
                self._finish(job_id, "succeeded", f"gated: {gate.passed_cases}/{gate.total_cases} passed, staged as "
                             f"{version.id} (report: {gate.report}.md)", level="warn", fine_tuned_model=version.id,
                             trained_tokens=result.trained_tokens, result_files=[])
                return
            passed = f"; suite passed {gate.passed_cases}/{gate.total_cases}" if gate is not None else ""
            self._finish(job_id, "succeeded", f"New fine-tuned model created: {name} ({version.id}){passed}",
                         fine_tuned_model=name, trained_tokens=result.trained_tokens, result_files=[])
