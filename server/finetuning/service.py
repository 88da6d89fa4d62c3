"""Training files and fine-tuning jobs, persisted on disk; jobs run one at a time in a worker process.

    <finetuning_dir>/files/<file-id>.jsonl + .json     uploaded training data and its record
    <finetuning_dir>/jobs/<job-id>/job.json            the job record (the gateway writes it)
    <finetuning_dir>/jobs/<job-id>/{spec.json, events.jsonl, result.json, train.log, run/, checkpoints/,
                                    init_adapter/ (continued training: a copy of the starting version)}
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import importlib.util
import io
import logging
import os
import re
import shutil
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import BinaryIO, TypeVar

from pydantic import BaseModel

from quiver.adapters.model_id import ModelRef, parse_adapter_ref
from quiver.adapters.service import AdapterRegistry
from quiver.errors import Conflict, DomainError, InvalidRequest, NotFound, NotSupported, PayloadTooLarge
from quiver.finetuning.protocol import (
    FINISHED,
    CheckpointMetrics,
    CreateJobRequest,
    DpoMethod,
    FileObject,
    FineTuningJob,
    JobCheckpoint,
    JobError,
    JobEvent,
    Method,
    SupervisedMethod,
)
from quiver.common.files import file_sha256, write_bytes_atomic, write_json_atomic
from quiver.common.jobs import (
    CHECKPOINT,
    CHECKPOINTS,
    KEPT_CHECKPOINTS,
    RESULT,
    SPEC,
    TRAIN_LOG,
    CheckpointRecord,
    DpoHyperparameters,
    EventLog,
    Hyperparameters,
    JobEventRecord,
    JobResult,
    JobSpec,
    write_record,
)

log = logging.getLogger(__name__)

FINE_TUNE_PURPOSE = "fine-tune"
RESULTS_PURPOSE = "fine-tune-results"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
INIT_ADAPTER = "init_adapter"
# The results file's columns (OpenAI's names); a step without a figure leaves its cell empty.
RESULT_COLUMNS = ("step", "train_loss", "valid_loss", "learning_rate", "train_mean_token_accuracy",
                  "valid_mean_token_accuracy")
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

    def create_result(self, filename: str, content: bytes) -> FileObject:
        """A file quiver writes itself (a job's metrics CSV): purpose `fine-tune-results`, never training data."""
        file_id = _new_id("file")
        record = FileObject(id=file_id, bytes=len(content), created_at=int(time.time()), filename=filename,
                            purpose=RESULTS_PURPOSE)
        try:
            write_bytes_atomic(self.data_path(file_id), content)
            write_json_atomic(self.root / f"{file_id}.json", record.model_dump())
        except BaseException:
            self.data_path(file_id).unlink(missing_ok=True)
            raise
        return record

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

    def events(self, job_id: str, after: str | None = None, limit: int = 20) -> tuple[list[JobEvent], bool]:
        """Newest first, as OpenAI's; `after` is an event id: the page continues with the older ones."""
        self.get(job_id)
        raw = EventLog(self._job_dir(job_id)).read()
        events = [JobEvent(id=f"ftevent-{job_id[6:]}-{n}", **event.model_dump()) for n, event in enumerate(raw)][::-1]
        return _page(events, after, limit)

    def view(self, job: FineTuningJob) -> FineTuningJob:
        """The job as callers see it: a running job's `estimated_finish` is worked out from its progress."""
        if job.status != "running":
            return job
        return job.model_copy(update={"estimated_finish": estimate_finish(EventLog(self._job_dir(job.id)).read())})

    def checkpoints(self, job_id: str, after: str | None = None, limit: int = 10) -> tuple[list[JobCheckpoint], bool]:
        """The job's registered checkpoints, the latest step first (OpenAI's order)."""
        self.get(job_id)
        found = [
            JobCheckpoint(id=f"ftckpt-{job_id[6:]}-{record.step}", created_at=record.created_at,
                          fine_tuned_model_checkpoint=record.fine_tuned_model_checkpoint,
                          fine_tuning_job_id=job_id, step_number=record.step,
                          metrics=CheckpointMetrics.model_validate(record.metrics))
            for _, record in self._checkpoint_records(job_id) if record.fine_tuned_model_checkpoint
        ]
        return _page(sorted(found, key=lambda c: c.step_number, reverse=True), after, limit)

    def _checkpoint_records(self, job_id: str) -> list[tuple[Path, CheckpointRecord]]:
        """The worker's complete checkpoints (those with their record), in step order."""
        records = [(path.parent, record) for path in (self._job_dir(job_id) / CHECKPOINTS).glob(f"step-*/{CHECKPOINT}")
                   if (record := load_record(path, CheckpointRecord)) is not None]
        return sorted(records, key=lambda item: item[1].step)

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
        model = self._starting_model(request.model)
        if request.integrations:
            raise InvalidRequest("quiver has no integrations (OpenAI's is Weights & Biases): leave `integrations` "
                                 "out; the metrics are in the job's events and its results file",
                                 code="unsupported_integration", param="integrations")
        self._training_file(request.training_file, "training_file")
        if request.validation_file:
            self._training_file(request.validation_file, "validation_file")
        method = job_method(request)
        job_id = _new_id("ftjob")
        job = FineTuningJob(
            id=job_id, created_at=int(time.time()), model=model, status="validating_files",
            training_file=request.training_file, validation_file=request.validation_file,
            hyperparameters=method_hyperparameters(method).model_dump(include=set(Hyperparameters.model_fields)),
            seed=request.seed if request.seed is not None else 42, suffix=request.suffix, metadata=request.metadata,
            integrations=request.integrations, method=method,
        )
        self._job_dir(job_id).mkdir(parents=True)
        job = self._update(job, "Validating training file")
        job = self._update(job, "Job queued", status="queued")
        self._queue.put_nowait(job_id)
        return job

    def _starting_model(self, model: str) -> str:
        """The base model, or a registered adapter to continue training from: `name` is pinned to its current
        version now (`name@N`), so the job trains from exactly what was served when it was created."""
        if model == self.registry.base_model_name:
            return model
        try:
            target = self.registry.resolve(model)
        except DomainError:
            raise InvalidRequest(
                f"fine-tuning starts from the served base model `{self.registry.base_model_name}` or a registered "
                f"adapter (`name` or `name@version`), not `{model[:100]}`",
                code="model_not_available", param="model") from None
        return target.engine_model

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

    def _source(self, job: FineTuningJob) -> ModelRef | None:
        """The adapter version a continued job starts from; None for a job from the base model."""
        return None if job.model == self.registry.base_model_name else parse_adapter_ref(job.model)

    def _adapter_name(self, job: FineTuningJob) -> str:
        # Continued training adds a version to the adapter it started from, unless a suffix asks for a new name.
        source = self._source(job)
        if source is not None and not job.suffix:
            return source.name
        return f"{job.suffix or 'ft'}-{job.id.removeprefix('ftjob-')[:8]}"

    def _copy_init_adapter(self, job: FineTuningJob, job_dir: Path) -> Path | None:
        """The starting version's adapter files, copied into the job: deleting the version meanwhile cannot
        pull them from under the trainer."""
        source = self._source(job)
        if source is None:
            return None
        try:
            folder = self.registry.store.local_path(source.name, source.version)
            target = job_dir / INIT_ADAPTER
            target.mkdir(exist_ok=True)
            for name in ADAPTER_FILES:
                shutil.copyfile(folder / name, target / name)
        except OSError:
            raise InvalidRequest(f"`{job.model}` no longer exists: it was deleted after the job was created",
                                 code="model_not_available", param="model") from None
        return target.resolve()

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
        method = job.method or Method()
        try:
            init_adapter = await asyncio.to_thread(self._copy_init_adapter, job, job_dir)
        except InvalidRequest as exc:
            self._finish(job_id, "failed", f"Job failed: {exc.message}", level="error",
                         error=JobError(code=exc.code, message=exc.message, param=exc.param))
            return
        hyperparameters = method_hyperparameters(method)
        beta = getattr(hyperparameters, "beta", "auto")
        write_record(job_dir / SPEC, JobSpec(
            name=name,
            training_file=self.files.data_path(job.training_file).resolve(),
            validation_file=self.files.data_path(job.validation_file).resolve() if job.validation_file else None,
            base_model_dir=self.base_model_dir.resolve(),
            base_model_name=self.registry.base_model_name,
            hyperparameters=Hyperparameters.model_validate(
                hyperparameters.model_dump(include=set(Hyperparameters.model_fields))),
            seed=job.seed,
            method=method.type,
            beta=None if beta == "auto" else beta,
            init_adapter=init_adapter,
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

    async def _register_folder(self, name: str, folder: Path, make_current: bool):
        files = [(file, open(folder / file, "rb")) for file in ADAPTER_FILES]
        try:
            return await self.registry.register(name, files, make_current=make_current)
        finally:
            for _, handle in files:
                handle.close()

    async def _register(self, job_id: str, name: str, result: JobResult) -> None:
        async with self._commit:  # the commit point: a cancel either came before (nothing registers) or waits
            if job_id in self._cancelled or self.get(job_id).status in FINISHED:
                return
            job_dir = self._job_dir(job_id)
            # Each epoch's checkpoint becomes a staged version (served as `name@N`, never under the bare name).
            staged: dict[str, int] = {}  # the weights' sha256 -> version
            listed: list[tuple[Path, CheckpointRecord]] = []  # recorded once the job commits
            try:
                for folder, record in self._checkpoint_records(job_id)[-KEPT_CHECKPOINTS:]:
                    version = await self._register_folder(name, folder, make_current=False)
                    staged[file_sha256(folder / ADAPTER_FILES[1])] = version.version
                    listed.append((folder, record.model_copy(update={"fine_tuned_model_checkpoint": version.id})))
                # The final adapter is usually one of them (the last epoch's, or the best one the trainer kept):
                # then that version is promoted rather than registered twice.
                final = staged.get(file_sha256(result.run_dir / ADAPTER_FILES[1]))
                if final is not None:
                    # A version that failed its name's suite stays staged: the gate decides, not the job.
                    gate = self.registry.version(name, final).gate
                    if gate is None or gate.passed:
                        await self.registry.promote(name, final)
                    version_id = f"{name}@{final}"
                else:
                    registered = await self._register_folder(name, result.run_dir, make_current=True)
                    version_id, gate = registered.id, registered.gate
            except BaseException:
                for version in staged.values():  # a job that did not commit leaves no versions behind
                    with contextlib.suppress(DomainError, OSError):
                        await self.registry.delete(name, version)
                raise
            for folder, record in listed:
                write_record(folder / CHECKPOINT, record)
            changes = {}
            if result.hyperparameters is not None:  # what `auto` became
                used = result.hyperparameters.model_dump(exclude_none=True)
                job = self.get(job_id)
                method = job.method or Method()
                changes["hyperparameters"] = Hyperparameters.model_validate(
                    {k: v for k, v in used.items() if k in Hyperparameters.model_fields})
                changes["method"] = with_hyperparameters(method, used)
            results = self._results_file(job_id, job_dir)
            if gate is not None and not gate.passed:  # the name's suite kept it from becoming current
                self._finish(job_id, "succeeded", f"gated: {gate.passed_cases}/{gate.total_cases} passed, staged as "
                             f"{version_id} (report: {gate.report}.md)", level="warn", fine_tuned_model=version_id,
                             trained_tokens=result.trained_tokens, result_files=results, **changes)
                return
            passed = f"; suite passed {gate.passed_cases}/{gate.total_cases}" if gate is not None else ""
            self._finish(job_id, "succeeded", f"New fine-tuned model created: {name} ({version_id}){passed}",
                         fine_tuned_model=name, trained_tokens=result.trained_tokens, result_files=results, **changes)

    def _results_file(self, job_id: str, job_dir: Path) -> list[str]:
        """The metrics CSV as a file of purpose `fine-tune-results`; a failure to write it costs the job
        nothing but the file (a warning event says so)."""
        try:
            content = metrics_csv(EventLog(job_dir).read())
            return [self.files.create_result(f"{job_id}-results.csv", content).id]
        except OSError as exc:
            log.warning("job %s: the results file could not be written: %s", job_id, exc)
            EventLog(job_dir).emit("The results file could not be written", level="warn")
            return []


def job_method(request: CreateJobRequest) -> Method:
    """The job's `method` as sent, defaulted to supervised; the hyperparameters may come at the top level
    (OpenAI's older place) or in the method, not in both."""
    method = request.method or Method()
    if method.type == "reinforcement":
        raise InvalidRequest("reinforcement fine-tuning is not supported: use `supervised` or `dpo`",
                             code="unsupported_method", param="method.type")
    in_method = getattr(method, method.type)
    if request.hyperparameters is not None and in_method is not None and in_method.hyperparameters is not None:
        raise InvalidRequest(f"give the hyperparameters in `method.{method.type}.hyperparameters` only",
                             code="conflicting_hyperparameters", param="hyperparameters")
    given = (in_method.hyperparameters if in_method else None) or request.hyperparameters
    if method.type == "dpo":
        hyperparameters = DpoHyperparameters.model_validate(given.model_dump() if given else {})
        return Method(type="dpo", dpo=DpoMethod(hyperparameters=hyperparameters))
    return Method(type="supervised", supervised=SupervisedMethod(hyperparameters=given or Hyperparameters()))


def method_hyperparameters(method: Method) -> Hyperparameters:
    settings = getattr(method, method.type)
    return (settings.hyperparameters if settings and settings.hyperparameters else None) or (
        DpoHyperparameters() if method.type == "dpo" else Hyperparameters())


def with_hyperparameters(method: Method, used: dict) -> Method:
    """The method with the hyperparameters the trainer used."""
    if method.type == "dpo":
        return Method(type="dpo", dpo=DpoMethod(hyperparameters=DpoHyperparameters.model_validate(used)))
    used = {k: v for k, v in used.items() if k in Hyperparameters.model_fields}
    return Method(type="supervised", supervised=SupervisedMethod(hyperparameters=Hyperparameters.model_validate(used)))


def estimate_finish(events: list[JobEventRecord]) -> int | None:
    """When the last step should end, from the measured time per step so far (None until two steps logged)."""
    steps = [(e.created_at, e.data["step"], e.data.get("total_steps")) for e in events
             if e.type == "metrics" and e.data and isinstance(e.data.get("step"), int)]
    if len(steps) < 2 or steps[-1][1] <= steps[0][1] or not isinstance(steps[-1][2], int):
        return None
    (t0, s0, _), (t1, s1, total) = steps[0], steps[-1]
    per_step = (t1 - t0) / (s1 - s0)
    return int(round(t1 + per_step * max(total - s1, 0)))


def metrics_csv(events: list[JobEventRecord]) -> bytes:
    """One row a step from the metrics events (a step's training and evaluation figures come separately)."""
    rows: dict[int, dict] = {}
    for event in events:
        if event.type == "metrics" and event.data and isinstance(event.data.get("step"), int):
            rows.setdefault(event.data["step"], {}).update(event.data)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=RESULT_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for step in sorted(rows):
        writer.writerow({**rows[step], "step": step})
    return out.getvalue().encode()
