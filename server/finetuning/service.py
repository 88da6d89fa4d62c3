"""Training files and fine-tuning jobs, persisted in the shared records (`records.py`: a folder or the adapter
store's bucket) so that every replica sees the same files and jobs. Any replica's runner may take a queued job:
it claims the job first (a create-if-absent write, so two runners never take the same one), keeps the claim's
heartbeat fresh while the training runs, and a job whose runner went away (no heartbeat for `lease_s`) fails
as interrupted. The training itself runs where the launcher (`launcher.py`) puts it.

    files/<file-id>.jsonl + .json      uploaded training data and its record (results files too)
    jobs/<job-id>/job.json             the job record (updated with compare-and-swap)
    jobs/<job-id>/claim.json           {"owner", "at"}: which runner took it, its last heartbeat
    jobs/<job-id>/{spec.json, events.jsonl, result.json, train.log, run/manifest.json}
    jobs/<job-id>/listed-checkpoints/step-N.json       a registered epoch checkpoint (its weights are in the
                                                        adapter store as a staged version); apart from the
                                                        worker's `checkpoints/`, which a folder store shares
    jobs/<job-id>/run/paused.json, run/checkpoints/     a paused job's resume point (published from the
                                                        workspace when the records are a bucket)

Pause and resume: `pause` marks a running job `paused` (a record change); the runner holding its claim sees it
within a second when it is this replica, else at its next heartbeat, asks the worker to stop at the next step
boundary (the `pause` file), publishes the resumable checkpoint the worker saved, and lets the claim go. A
paused job holds no process and no claim, and survives restarts; `resume` queues it, and whichever runner
claims it continues from that checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import socket
import time
import typing
import uuid
from pathlib import Path
from typing import BinaryIO, TypeVar

from pydantic import BaseModel

from quiver.adapters.model_id import ModelRef, parse_adapter_ref
from quiver.adapters.service import AdapterRegistry
from quiver.adapters.store import StoreUnavailable
from quiver.adapters.validation import unserved_modules
from quiver.errors import Conflict, DomainError, InvalidRequest, NotFound, NotSupported, PayloadTooLarge
from quiver.finetuning.launcher import Launcher, LocalLauncher, Run
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
from quiver.common.files import file_sha256, write_bytes_atomic
from quiver.common.jobs import (
    CHECKPOINT,
    CHECKPOINTS,
    KEPT_CHECKPOINTS,
    PAUSE,
    PAUSED,
    RESULT,
    RESUME_CHECKPOINTS,
    RESUMED,
    STARTED,
    SPEC,
    TRAIN_LOG,
    EVENTS,
    CheckpointRecord,
    DpoHyperparameters,
    Hyperparameters,
    JobEventRecord,
    JobResult,
    JobSpec,
    write_record,
)
from quiver.finetuning.records import LocalRecords, Records

log = logging.getLogger(__name__)

FINE_TUNE_PURPOSE = "fine-tune"
RESULTS_PURPOSE = "fine-tune-results"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# The runner's listing of registered checkpoints. Not inside the worker's `checkpoints/`: with a folder store the
# workspace is the record folder, and a worker that rotates or rewrites its own checkpoints must not touch it.
LISTED_CHECKPOINTS = "listed-checkpoints"
INIT_ADAPTER = "init_adapter"
# The results file's columns (OpenAI's names); a step without a figure leaves its cell empty.
RESULT_COLUMNS = ("step", "train_loss", "valid_loss", "learning_rate", "train_mean_token_accuracy",
                  "valid_mean_token_accuracy")
_MAX_REPORTED_ERRORS = 5
# How often the runner looks for a new epoch checkpoint in the worker's workspace (a local glob) to register it.
_CHECKPOINT_POLL_S = 1.0
_COPY_CHUNK = 1024 * 1024
# What `_new_id` makes; anything else is no id of ours (and never reaches a path or a key).
_FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")
_JOB_ID = re.compile(r"^ftjob-[0-9a-f]{24}$")
JOB, CLAIM = "job.json", "claim.json"
RUN_MANIFEST = "run/manifest.json"  # the training run's manifest (quiver.training.manifest), written by the worker
# The runners of this process (tests run several gateways in one): another owner with this pid is an earlier
# process that had the same pid (PID 1 in a restarted container), unless it is one of these.
_OWNERS_HERE: set[str] = set()
Record = TypeVar("Record", bound=BaseModel)


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _parse(raw: bytes | None, model: type[Record]) -> Record | None:
    if raw is None:
        return None
    try:
        return model.model_validate_json(raw)
    except (ValueError, RecursionError):
        return None


def load_record(records: Records, key: str, model: type[Record]) -> Record | None:
    """The record at `key`, or None when it is missing; an unreadable one is moved aside (and logged) so that
    it cannot stop the server or hide the records beside it."""
    raw = records.read(key)
    if raw is None:
        return None
    try:
        return model.model_validate_json(raw)
    except (ValueError, RecursionError) as exc:  # truncated, not JSON, too deep, or not this record's shape
        aside = records.move_aside(key)
        log.error("unreadable record %s/%s moved aside to %s: %s", records.location, key, aside,
                  str(exc).splitlines()[0])
        return None


def _records(root: Path | Records) -> Records:
    return root if isinstance(root, Records) else LocalRecords(root)


def file_not_found(file_id: str, param: str = "file_id") -> NotFound:
    return NotFound(f"no file with id `{file_id}`", code="file_not_found", param=param)


def _page(items: list, after: str | None, limit: int) -> tuple[list, bool]:
    """OpenAI's cursor paging: the items after the one with id `after`, at most `limit`, and whether more follow."""
    if after:
        ids = [item.id for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    return items[:limit], len(items) > limit


class FileService:
    def __init__(self, root: Path | Records, max_bytes: int) -> None:
        self.records = _records(root)
        self.max_bytes = max_bytes
        for leftover in self.records.scratch_dir.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)

    def data_path(self, file_id: str) -> Path:
        """A local copy of the file's bytes (the file itself in a folder; files never change, so a download
        stays right)."""
        return self.records.local_file(f"{file_id}.jsonl", self.records.scratch_dir / "downloads")

    def create(self, filename: str, source: BinaryIO, purpose: str) -> FileObject:
        if purpose != FINE_TUNE_PURPOSE:
            raise InvalidRequest(f"only purpose `{FINE_TUNE_PURPOSE}` is supported", code="invalid_purpose",
                                 param="purpose")
        file_id = _new_id("file")
        tmp = self.records.scratch_dir / f".{file_id}.tmp"
        try:
            size = self._copy_limited(source, tmp)
            report = self._check(tmp)
            record = FileObject(id=file_id, bytes=size, created_at=int(time.time()),
                                filename=Path(filename).name[:255] or "training.jsonl", purpose=purpose,
                                status_details=f"{len(report.examples)} examples, {len(report.warnings)} warnings")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return self._store(tmp, record)

    def _store(self, tmp: Path, record: FileObject) -> FileObject:
        """Move the file's bytes into the records, then its record, which commits the file. Whatever fails (a
        full disk, a cancelled request), nothing of it stays behind."""
        try:
            self.records.put_file(f"{record.id}.jsonl", tmp)
            self.records.write(f"{record.id}.json", json.dumps(record.model_dump(), indent=2).encode())
        except BaseException:
            tmp.unlink(missing_ok=True)
            with contextlib.suppress(Exception):
                self.records.delete(f"{record.id}.jsonl")
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
        # The same parser and line-numbered checks as `quiver data check`, for chat or preference data (the
        # format its first line shows); token checks need the tokenizer: the worker runs them before training.
        from quiver.training.data import check_training_file

        report = check_training_file(path, None, None, format="auto")
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
        tmp = self.records.scratch_dir / f".{file_id}.tmp"
        write_bytes_atomic(tmp, content)
        return self._store(tmp, record)

    def get(self, file_id: str, param: str = "file_id") -> FileObject:
        record = load_record(self.records, f"{file_id}.json", FileObject) if _FILE_ID.match(file_id) else None
        if record is None:
            raise file_not_found(file_id, param)
        return record

    def list(self, after: str | None = None, limit: int = 10000) -> tuple[list[FileObject], bool]:
        records = [r for key in self.records.keys("file-*.json")
                   if (r := load_record(self.records, key, FileObject)) is not None]
        return _page(sorted(records, key=lambda r: (r.created_at, r.id), reverse=True), after, limit)

    def delete(self, file_id: str) -> None:
        self.get(file_id)
        self.records.delete(f"{file_id}.json")
        self.records.delete(f"{file_id}.jsonl")


class JobService:
    """Jobs run one at a time per runner. Each ends in exactly one terminal state: every change of job.json is a
    compare-and-swap that never overwrites a terminal state, and registering the adapter is the commit point,
    taken under the same lock as cancelling: a job cancelled before it registers nothing, and a cancel that
    arrives while it registers waits and finds it succeeded. (A cancel from another replica during that moment
    cannot wait for this one's lock: the job then stays cancelled and its adapter stays registered.)"""

    def __init__(self, root: Path | Records, files: FileService, registry: AdapterRegistry, base_model_dir: Path,
                 launcher: Launcher | None = None, *, poll_s: float = 5.0, lease_s: float = 60.0,
                 run_jobs: bool = True) -> None:
        self.records = _records(root)
        self.files = files
        self.registry = registry
        self.base_model_dir = base_model_dir
        self.launcher: Launcher = launcher or LocalLauncher()
        self.poll_s = poll_s
        self.lease_s = lease_s
        self.run_jobs = run_jobs  # False: this server accepts and lists jobs; other runners train them
        # Unique per process: a restarted server (even with the same pid, as PID 1 in a container) is another.
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        _OWNERS_HERE.add(self.owner)
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._enqueued: set[str] = set()
        self._done: set[str] = set()  # finished jobs seen by the scan: terminal states never change
        self._runner: asyncio.Task | None = None
        self._worker: Run | None = None
        self._running_job: str | None = None
        self._cancelled: set[str] = set()
        self._seen: dict[str, set[int]] = {}  # per job, the checkpoint steps this runner registered or refused
        self._to_discard: set[str] = set()  # jobs the scan failed: their checkpoints go (async, in the queue)
        self._pausing: set[str] = set()  # pauses asked of this replica: its runner acts without waiting a beat
        self._commit = asyncio.Lock()

    # --- persistence -------------------------------------------------------------------------------

    def _save(self, job: FineTuningJob) -> None:
        self.records.write(f"{job.id}/{JOB}", _dump(job))

    def get(self, job_id: str) -> FineTuningJob:
        job = load_record(self.records, f"{job_id}/{JOB}", FineTuningJob) if _JOB_ID.match(job_id) else None
        if job is None:
            raise NotFound(f"no fine-tuning job with id `{job_id}`", code="job_not_found", param="fine_tuning_job_id")
        return job

    def list(self, after: str | None = None, limit: int = 20) -> tuple[list[FineTuningJob], bool]:
        jobs = [job for key in self.records.keys(f"ftjob-*/{JOB}")
                if (job := load_record(self.records, key, FineTuningJob)) is not None]
        return _page(sorted(jobs, key=lambda job: (job.created_at, job.id), reverse=True), after, limit)

    def events(self, job_id: str, after: str | None = None, limit: int = 20) -> tuple[list[JobEvent], bool]:
        """Newest first, as OpenAI's; `after` is an event id: the page continues with the older ones."""
        self.get(job_id)
        raw = _parse_events(self.records.read(f"{job_id}/{EVENTS}"))
        events = [JobEvent(id=f"ftevent-{job_id[6:]}-{n}", **event.model_dump()) for n, event in enumerate(raw)][::-1]
        return _page(events, after, limit)

    def view(self, job: FineTuningJob) -> FineTuningJob:
        """The job as callers see it: a running job's `estimated_finish` is worked out from its progress."""
        if job.status != "running":
            return job
        return job.model_copy(update={"estimated_finish": estimate_finish(self._events(job.id))})

    def _events(self, job_id: str) -> list[JobEventRecord]:
        return _parse_events(self.records.read(f"{job_id}/{EVENTS}"))

    def checkpoints(self, job_id: str, after: str | None = None, limit: int = 10) -> tuple[list[JobCheckpoint], bool]:
        """The job's registered checkpoints, the latest step first (OpenAI's order)."""
        self.get(job_id)
        found = [
            JobCheckpoint(id=f"ftckpt-{job_id[6:]}-{record.step}", created_at=record.created_at,
                          fine_tuned_model_checkpoint=record.fine_tuned_model_checkpoint,
                          fine_tuning_job_id=job_id, step_number=record.step,
                          metrics=CheckpointMetrics.model_validate(record.metrics))
            for record in self._listed_checkpoints(job_id)
        ]
        return _page(sorted(found, key=lambda c: c.step_number, reverse=True), after, limit)

    def _listed_checkpoints(self, job_id: str) -> list[CheckpointRecord]:
        """The checkpoints the job registered so far, in step order, from the shared records (any replica
        answers, while the job runs too)."""
        found = [record for key in self.records.keys(f"{job_id}/{LISTED_CHECKPOINTS}/step-*.json")
                 if (record := load_record(self.records, key, CheckpointRecord)) is not None]
        return sorted((record for record in found if record.fine_tuned_model_checkpoint), key=lambda r: r.step)

    @staticmethod
    def _workspace_checkpoints(workspace: Path) -> list[tuple[Path, CheckpointRecord]]:
        """The worker's complete checkpoints in the runner's workspace (those with their record), in step order."""
        found = [(path.parent, record) for path in (workspace / CHECKPOINTS).glob(f"step-*/{CHECKPOINT}")
                 if (record := _parse(path.read_bytes(), CheckpointRecord)) is not None]
        return sorted(found, key=lambda item: item[1].step)

    def manifest(self, job_id: str) -> bytes | None:
        """The job's training manifest (data hashes, hyperparameters, losses), once its worker wrote one."""
        self.get(job_id)
        return self.records.read(f"{job_id}/{RUN_MANIFEST}")

    def _emit(self, job_id: str, message: str, level: str = "info") -> None:
        event = JobEventRecord(created_at=int(time.time()), level=level, message=message)
        self.records.append(f"{job_id}/{EVENTS}", event.model_dump_json().encode())

    def _update(self, job: FineTuningJob, message: str | None = None, level: str = "info",
                expect: tuple[str, ...] | None = None, **changes) -> FineTuningJob:
        """Apply `changes` to the stored record (`job` when there is none yet) unless it reached a terminal
        state, which then stands, or (with `expect`) is in none of those states; compare-and-swap, so a change
        made meanwhile by another replica is never lost."""
        return self._change(job, message, level, expect, **changes)[0]

    def _change(self, job: FineTuningJob, message: str | None = None, level: str = "info",
                expect: tuple[str, ...] | None = None, **changes) -> tuple[FineTuningJob, bool]:
        """`_update`, and whether this call made the change."""
        changed = False

        def change(raw: bytes | None) -> bytes | None:
            nonlocal changed
            current = _parse(raw, FineTuningJob) if raw is not None else job
            if current is None or current.status in FINISHED or (expect is not None and current.status not in expect):
                return None  # unreadable (get() moves it aside), final, or not in the state the change is for
            new = current.model_copy(update=changes)
            if new.status in FINISHED and new.finished_at is None:
                new.finished_at = int(time.time())
            changed = True
            return _dump(new)

        stored = _parse(self.records.update(f"{job.id}/{JOB}", change), FineTuningJob)
        if changed and message:
            self._emit(job.id, message, level=level)
        return (stored if stored is not None else self.get(job.id)), changed

    def _finish(self, job_id: str, status: str, message: str | None = None, level: str = "info",
                **changes) -> FineTuningJob:
        """Move the job to a terminal state unless it already reached one (which then stands)."""
        job = self._update(self.get(job_id), message, level=level, status=status, **changes)
        if job.status != status:
            log.info("job %s is already %s; not marking it %s", job_id, job.status, status)
        return job

    # --- claims --------------------------------------------------------------------------------------

    def _stale(self, raw: bytes | None) -> bool:
        """A claim whose runner is gone: no heartbeat for `lease_s`, or a process of this host that no longer
        runs (or is an earlier server that had this pid)."""
        try:
            claim = json.loads(raw) if raw else {}
            owner, at = str(claim["owner"]), float(claim["at"])
        except (ValueError, KeyError, TypeError, RecursionError):
            return True
        if owner == self.owner:
            return self._running_job is None  # ours, but this runner runs nothing: left by an aborted start
        host, _, rest = owner.partition(":")
        if host == socket.gethostname():
            pid = rest.partition(":")[0]
            if not pid.isdigit() or not _alive(int(pid)) or (int(pid) == os.getpid() and owner not in _OWNERS_HERE):
                return True
        return time.time() - at > self.lease_s

    def _claim_bytes(self) -> bytes:
        return json.dumps({"owner": self.owner, "at": time.time()}).encode()

    def _claim(self, job_id: str) -> bool:
        """Take the job for this runner: exactly one of several racing runners gets True."""
        new = self._claim_bytes()
        stored = self.records.update(f"{job_id}/{CLAIM}", lambda raw: new if raw is None or self._stale(raw) else None)
        return stored == new

    def _heartbeat(self, job_id: str) -> bool:
        """Refresh this runner's claim; False when another runner holds it now (ours was taken as stale)."""
        new = self._claim_bytes()

        def change(raw: bytes | None) -> bytes | None:
            try:
                return new if raw and json.loads(raw).get("owner") == self.owner else None
            except ValueError:
                return None

        return self.records.update(f"{job_id}/{CLAIM}", change) == new

    def scan(self) -> list[str]:
        """Look through the shared records: fail the running jobs whose runner is gone, and return the queued
        jobs (oldest first) that no live runner holds, which this runner may claim."""
        by_job: dict[str, set[str]] = {}
        for key in self.records.keys("ftjob-*/*"):
            job_id, _, name = key.partition("/")
            by_job.setdefault(job_id, set()).add(name)
        runnable = []
        for job_id, names in by_job.items():
            if job_id in self._done or job_id == self._running_job or JOB not in names or not _JOB_ID.match(job_id):
                continue
            if CLAIM in names and not self._stale(self.records.read(f"{job_id}/{CLAIM}")):
                continue
            job = load_record(self.records, f"{job_id}/{JOB}", FineTuningJob)
            if job is None or job.status in FINISHED:
                self._done.add(job_id)
            elif job.status == "running":
                self._finish(job_id, "failed", "The server running this job stopped while it was running",
                             level="error", error=JobError(code="interrupted",
                                                           message="the server restarted while the job was running"))
                self._done.add(job_id)
                self._to_discard.add(job_id)
            elif job.status in ("validating_files", "queued"):
                runnable.append((job.created_at, job_id))
        return [job_id for _, job_id in sorted(runnable)]

    # --- lifecycle ---------------------------------------------------------------------------------

    def _enqueue(self, job_id: str) -> None:
        if job_id not in self._enqueued:
            self._enqueued.add(job_id)
            self._queue.put_nowait(job_id)

    def start(self) -> None:
        """Resume after a restart: a job that was running (here, or on a runner that went away) is failed with
        the reason; queued ones run."""
        if not self.run_jobs:
            return
        for job_id in self.scan():
            self._enqueue(job_id)
        self._runner = asyncio.create_task(self._run_queue(), name="fine-tuning-jobs")

    async def stop(self) -> None:
        _OWNERS_HERE.discard(self.owner)
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
        # (A server that only accepts jobs, for runners elsewhere, does not need it.)
        if self.run_jobs and (importlib.util.find_spec("trl") is None or importlib.util.find_spec("datasets") is None):
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
        self._check_format(request.training_file, method, "training_file")
        if request.validation_file:
            self._check_format(request.validation_file, method, "validation_file")
        job_id = _new_id("ftjob")
        job = FineTuningJob(
            id=job_id, created_at=int(time.time()), model=model, status="validating_files",
            training_file=request.training_file, validation_file=request.validation_file,
            hyperparameters=method_hyperparameters(method).model_dump(include=set(Hyperparameters.model_fields)),
            seed=request.seed if request.seed is not None else 42, suffix=request.suffix, metadata=request.metadata,
            integrations=request.integrations, method=method,
        )
        if not self.records.create(f"{job_id}/{JOB}", _dump(job)):
            raise Conflict(f"job id `{job_id}` is taken; try again", code="job_id_taken")
        self._emit(job_id, "Validating training file")
        job = self._update(job, "Job queued", status="queued")
        if self.run_jobs:
            self._enqueue(job_id)
        return job

    def _check_format(self, file_id: str, method: Method, param: str) -> None:
        """Preference data trains a `dpo` job, chat data a `supervised` one: a mismatch is refused now rather
        than failing in the worker. (With a bucket this reads the file down once more.)"""
        from quiver.training.data import detect_format

        found = detect_format(self.files.data_path(file_id))
        wanted = "preference" if method.type == "dpo" else "chat"
        if found != wanted:
            raise InvalidRequest(
                f"file `{file_id}` holds {found} data, but a `{method.type}` job trains on {wanted} data "
                f"({'`input`, `preferred_output`, `non_preferred_output`' if wanted == 'preference' else '`messages`'}"
                " on each line)", code="invalid_training_file_format", param=param)

    def _starting_model(self, model: str) -> str:
        """The base model, or a registered adapter to continue training from: `name` is pinned to its current
        version now (`name@N`), so the job trains from exactly what was served when it was created."""
        if model == self.registry.base_model_name:
            self._check_served_modules()
            return model
        try:
            target = self.registry.resolve(model)
        except DomainError:
            raise InvalidRequest(
                f"fine-tuning starts from the served base model `{self.registry.base_model_name}` or a registered "
                f"adapter (`name` or `name@version`), not `{model[:100]}`",
                code="model_not_available", param="model") from None
        return target.engine_model

    def _check_served_modules(self) -> None:
        """A new adapter trains the trainer's default layers; a server that applies LoRA to fewer
        (lora_target_modules) could not register the result, so the job is refused now, not after training.
        (Continued training keeps its adapter's layers, which registration has already checked.)"""
        base = self.registry.base
        if base.served_modules is None:
            return
        from quiver.training.config import DEFAULT_TARGET_MODULES

        if unserved_modules(DEFAULT_TARGET_MODULES, base):
            raise InvalidRequest(
                f"fine-tuning trains {', '.join(DEFAULT_TARGET_MODULES)}; this server applies LoRA to "
                f"{', '.join(sorted(base.served_modules))} only (lora_target_modules), so it could not serve "
                "the result",
                code="target_module_not_served", param="model")

    async def cancel(self, job_id: str) -> FineTuningJob:
        async with self._commit:
            job = self.get(job_id)
            if job.status in FINISHED:
                raise Conflict(f"job `{job_id}` has already {job.status}", code="job_finished",
                               param="fine_tuning_job_id")
            self._cancelled.add(job_id)
            self._pausing.discard(job_id)
            job = self._finish(job_id, "cancelled", "Job cancelled")
            if job.status != "cancelled":  # another replica finished it meanwhile
                self._cancelled.discard(job_id)
                raise Conflict(f"job `{job_id}` has already {job.status}", code="job_finished",
                               param="fine_tuning_job_id")
        # Running here: stop it now. Running on another replica: its runner sees the state at its next heartbeat
        # (and discards whatever it registered meanwhile).
        if self._running_job == job_id:
            await self._kill_worker()
        await self._discard_checkpoints(job_id)
        self._drop_resume_state(job_id)
        return job

    async def pause(self, job_id: str) -> FineTuningJob:
        """Mark a running job `paused`; its runner (here or on another replica) stops the worker at the next step
        boundary, keeps the resumable checkpoint and lets the job go."""
        async with self._commit:
            job, paused = self._change(self.get(job_id), "Pausing the job at the next step boundary",
                                       expect=("running",), status="paused")
            if not paused:
                self._refuse(job, "paused", "only a running job can be paused")
            self._pausing.add(job_id)
        return job

    async def resume(self, job_id: str) -> FineTuningJob:
        """Queue a paused job again: a runner claims it and the worker continues from its resumable checkpoint."""
        job, resumed = self._change(self.get(job_id), "Job resumed", expect=("paused",), status="queued")
        if not resumed:
            self._refuse(job, "resumed", "only a paused job can be resumed")
        self._pausing.discard(job_id)
        if self.run_jobs:
            self._enqueue(job_id)
        return job

    @staticmethod
    def _refuse(job: FineTuningJob, verb: str, rule: str) -> typing.NoReturn:
        if job.status in FINISHED:
            raise Conflict(f"job `{job.id}` has already {job.status}", code="job_finished", param="fine_tuning_job_id")
        code = "job_not_running" if verb == "paused" else "job_not_paused"
        raise Conflict(f"job `{job.id}` is {job.status}: {rule}", code=code, param="fine_tuning_job_id")

    def _release(self, job_id: str) -> None:
        """Let the job's claim go (a paused job holds none), if it is still this runner's."""
        try:
            owner = json.loads(self.records.read(f"{job_id}/{CLAIM}") or b"{}").get("owner")
        except ValueError:
            return
        if owner == self.owner:
            self.records.delete(f"{job_id}/{CLAIM}")

    def _resume_keys(self, job_id: str) -> list[str]:
        return [*self.records.keys(f"{job_id}/{RESUME_CHECKPOINTS}/checkpoint-*/*"),
                *self.records.keys(f"{job_id}/{PAUSED}")]

    def _publish_resume_state(self, job_id: str, workspace: Path) -> None:
        """A paused worker's resume point into the shared records (with a folder it is there already): any
        runner may resume the job. What HF Trainer rotated away goes from the records too."""
        if self.records.in_place:
            return
        local = {path.relative_to(workspace).as_posix()
                 for path in (workspace / RESUME_CHECKPOINTS).glob("checkpoint-*/*") if path.is_file()}
        local.add(PAUSED)
        self.records.publish(job_id, workspace, {name: name for name in sorted(local)})
        for key in self._resume_keys(job_id):
            if key.partition("/")[2] not in local:
                self.records.delete(key)

    def _fetch_resume_state(self, job_id: str, workspace: Path) -> None:
        """The resume point of a paused job into this runner's workspace (nothing to do with a folder)."""
        if self.records.in_place:
            return
        for key in self._resume_keys(job_id):
            self.records.local_file(key, (workspace / key.partition("/")[2]).parent)

    def _drop_resume_state(self, job_id: str) -> None:
        """A job that ended needs no resume point (in a folder the trainer's own cleanup already removed it)."""
        with contextlib.suppress(OSError, StoreUnavailable):
            for key in self._resume_keys(job_id):
                self.records.delete(key)

    async def _kill_worker(self) -> None:
        if self._worker is not None:
            await self._worker.kill()

    async def _run_queue(self) -> None:
        while True:
            try:
                job_id = await asyncio.wait_for(self._queue.get(), timeout=self.poll_s or None)
            except TimeoutError:
                try:  # jobs accepted by other replicas, and runners gone away
                    for job_id in await asyncio.to_thread(self.scan):
                        self._enqueue(job_id)
                    while self._to_discard:
                        await self._discard_checkpoints(self._to_discard.pop())
                except Exception:  # the store away for a moment: the next scan tries again
                    log.exception("scanning the fine-tuning jobs failed")
                continue
            self._enqueued.discard(job_id)
            try:
                if job_id in self._cancelled or self.get(job_id).status in FINISHED:
                    continue
                await self._run(job_id)
            except Exception as exc:  # one broken job must not stop the queue
                log.exception("fine-tuning job %s failed", job_id)
                with contextlib.suppress(NotFound):  # its record may be gone
                    self._finish(job_id, "failed", f"Job failed: {exc}", level="error",
                                 error=JobError(code="internal_error", message=str(exc)))
                await self._discard_checkpoints(job_id)

    def _source(self, job: FineTuningJob) -> ModelRef | None:
        """The adapter version a continued job starts from; None for a job from the base model."""
        return None if job.model == self.registry.base_model_name else parse_adapter_ref(job.model)

    def _adapter_name(self, job: FineTuningJob) -> str:
        # Continued training adds a version to the adapter it started from, unless a suffix asks for a new name.
        source = self._source(job)
        if source is not None and not job.suffix:
            return source.name
        return f"{job.suffix or 'ft'}-{job.id.removeprefix('ftjob-')[:8]}"

    def _copy_init_adapter(self, job: FineTuningJob, workspace: Path) -> Path | None:
        """The starting version's adapter files, copied into the job's workspace: deleting the version meanwhile
        cannot pull them from under the trainer."""
        source = self._source(job)
        if source is None:
            return None
        try:
            folder = self.registry.store.local_path(source.name, source.version)
            target = workspace / INIT_ADAPTER
            target.mkdir(exist_ok=True)
            for name in ADAPTER_FILES:
                shutil.copyfile(folder / name, target / name)
        except (OSError, DomainError):  # gone from a folder store, or from the bucket (NotFound)
            raise InvalidRequest(f"`{job.model}` no longer exists: it was deleted after the job was created",
                                 code="model_not_available", param="model") from None
        return target.resolve()

    def _publish(self, job_id: str, workspace: Path, shipped: int) -> int:
        """Copy the worker's files into the shared records (nothing to do when the workspace is the job's own
        folder); returns how many bytes of the worker's events.jsonl are now in the job's event log."""
        if self.records.in_place:
            return shipped
        self.records.publish(job_id, workspace, {RESULT: RESULT, TRAIN_LOG: TRAIN_LOG, SPEC: SPEC,
                                                 RUN_MANIFEST: RUN_MANIFEST})
        path = workspace / EVENTS
        if not path.exists():
            return shipped
        with open(path, "rb") as file:
            file.seek(shipped)
            fresh = file.read()
        complete = fresh[:fresh.rfind(b"\n") + 1]  # a line being written waits for the next round
        for line in complete.splitlines():
            self.records.append(f"{job_id}/{EVENTS}", line)
        return shipped + len(complete)

    async def _run(self, job_id: str) -> None:
        if not self._claim(job_id):
            log.info("job %s was taken by another runner", job_id)
            return
        try:
            await self._run_claimed(job_id)
        finally:
            self._running_job = None
            self._seen.pop(job_id, None)

    async def _run_claimed(self, job_id: str) -> None:
        job = self.get(job_id)
        workspace = self.records.workspace(job_id)
        name = self._adapter_name(job)
        method = job.method or Method()
        try:
            init_adapter = await asyncio.to_thread(self._copy_init_adapter, job, workspace)
        except InvalidRequest as exc:
            self._finish(job_id, "failed", f"Job failed: {exc.message}", level="error",
                         error=JobError(code=exc.code, message=exc.message, param=exc.param))
            self.records.drop_workspace(job_id, workspace)
            return
        hyperparameters = method_hyperparameters(method)
        beta = getattr(hyperparameters, "beta", "auto")
        data = workspace / "data"
        write_record(workspace / SPEC, JobSpec(
            name=name,
            training_file=self.files.records.local_file(f"{job.training_file}.jsonl", data).resolve(),
            validation_file=self.files.records.local_file(f"{job.validation_file}.jsonl", data).resolve()
            if job.validation_file else None,
            base_model_dir=self.base_model_dir.resolve(),
            base_model_name=self.registry.base_model_name,
            hyperparameters=Hyperparameters.model_validate(
                hyperparameters.model_dump(include=set(Hyperparameters.model_fields))),
            seed=job.seed,
            method=method.type,
            beta=None if beta == "auto" else beta,
            init_adapter=init_adapter,
        ))
        # A resumed job: the worker continues from the pause's checkpoint; the last run's request and result go.
        await asyncio.to_thread(self._fetch_resume_state, job_id, workspace)
        (workspace / PAUSE).unlink(missing_ok=True)
        (workspace / RESULT).unlink(missing_ok=True)
        shipped = (workspace / EVENTS).stat().st_size if (workspace / EVENTS).exists() else 0
        async with self._commit:
            if job_id in self._cancelled or self._update(self.get(job_id), expect=("validating_files", "queued"),
                                                         status="running").status != "running":
                return
            self._running_job = job_id
            self._worker = None
        try:
            self._worker = await self.launcher.start(workspace)
            if job_id in self._cancelled:  # cancelled while the process was starting
                await self._kill_worker()
            waiting = asyncio.ensure_future(self._worker.wait())
            beat = time.monotonic()
            pausing = False
            while not waiting.done():
                await asyncio.wait({waiting}, timeout=_CHECKPOINT_POLL_S)
                if waiting.done():
                    break
                try:
                    async with self._commit:  # a new checkpoint is listed and callable within a second
                        await self._register_checkpoints(job_id, name, workspace)
                    if job_id in self._pausing and not pausing:  # asked here: no need to wait for the beat
                        pausing = self._ask_pause(job_id, workspace)
                    if time.monotonic() - beat < min(self.lease_s / 4, 10):
                        continue
                    beat = time.monotonic()
                    shipped = await asyncio.to_thread(self._publish, job_id, workspace, shipped)
                    still_ours = await asyncio.to_thread(self._heartbeat, job_id)
                    status = self.get(job_id).status
                    stopped = not still_ours or status in FINISHED  # cancelled elsewhere
                    if status == "paused" and not pausing:  # paused on another replica
                        pausing = self._ask_pause(job_id, workspace)
                    elif status == "queued" and not pausing:  # paused and resumed before the worker was asked
                        self._update(self.get(job_id), expect=("queued",), status="running")
                except (StoreUnavailable, OSError) as exc:
                    # The store away for a moment: training goes on; the lease outlasts a few missed beats.
                    log.warning("job %s: could not reach the records (%s); still training", job_id, exc)
                    continue
                if stopped:
                    self._cancelled.add(job_id)
                    await self._kill_worker()
            returncode = waiting.result()
        finally:
            self._running_job = None
        self._pausing.discard(job_id)
        await asyncio.to_thread(self._publish, job_id, workspace, shipped)
        result = _parse((workspace / RESULT).read_bytes() if (workspace / RESULT).exists() else None, JobResult)
        if result is not None and result.status == "paused" and job_id not in self._cancelled:
            await self._paused(job_id, name, workspace, result)
            return
        self._drop_resume_state(job_id)
        if job_id in self._cancelled:
            await self._discard_checkpoints(job_id)
            self.records.drop_workspace(job_id, workspace)
            return
        if result is None or result.status != "succeeded" or result.run_dir is None:
            error = result.error if result and result.error else None
            self._finish(job_id, "failed", level="error", error=JobError(
                code=error.code if error else "worker_crashed",
                message=error.message if error else f"the training process exited with {returncode}"))
            await self._discard_checkpoints(job_id)
            self.records.drop_workspace(job_id, workspace)
            return
        await self._register(job_id, name, result, workspace)
        self.records.drop_workspace(job_id, workspace)

    def _ask_pause(self, job_id: str, workspace: Path) -> bool:
        """Ask the worker to stop at its next step boundary (it watches for the file)."""
        (workspace / PAUSE).touch()
        log.info("job %s: pausing", job_id)
        return True

    async def _paused(self, job_id: str, name: str, workspace: Path, result: JobResult) -> None:
        """The worker stopped at a step boundary and saved its resume point: keep it, list any checkpoint it
        wrote last, and let the job go. A resume that came meanwhile queues it again."""
        async with self._commit:
            await self._register_checkpoints(job_id, name, workspace)
        await asyncio.to_thread(self._publish_resume_state, job_id, workspace)
        job = self._update(self.get(job_id), expect=("running",), status="paused")  # normally paused already
        self._release(job_id)
        self.records.drop_workspace(job_id, workspace)
        if job.status in FINISHED:  # cancelled while it paused
            await self._discard_checkpoints(job_id)
            self._drop_resume_state(job_id)
        elif job.status == "queued" and self.run_jobs:
            self._enqueue(job_id)
        log.info("job %s paused at step %s", job_id, result.step)

    async def _register_folder(self, name: str, folder: Path, make_current: bool):
        with contextlib.ExitStack() as stack:
            files = [(file, stack.enter_context(open(folder / file, "rb"))) for file in ADAPTER_FILES]
            return await self.registry.register(name, files, make_current=make_current)

    def _checkpoint_key(self, job_id: str, step: int) -> str:
        return f"{job_id}/{LISTED_CHECKPOINTS}/step-{step}.json"

    async def _register_checkpoints(self, job_id: str, name: str, workspace: Path) -> None:
        """Each complete checkpoint the worker wrote and that is not registered yet becomes a staged version
        (`name@N`, never the bare name) and is listed in the shared records at once, where every replica reads
        it; then only the latest `KEPT_CHECKPOINTS` stay. Runs on the runner holding the workspace, under the
        commit lock: a job cancelled here registers nothing more."""
        seen = self._seen.setdefault(job_id, set())
        fresh = [(folder, record) for folder, record in self._workspace_checkpoints(workspace)
                 if record.step not in seen]
        if not fresh or job_id in self._cancelled or self.get(job_id).status in FINISHED:
            return
        listed = {record.step: record for record in self._listed_checkpoints(job_id)}
        for folder, record in fresh:
            if record.step in listed:
                seen.add(record.step)
                continue
            try:
                digest = file_sha256(folder / ADAPTER_FILES[1])
                version = await self._register_folder(name, folder, make_current=False)
            except FileNotFoundError:  # the worker dropped it meanwhile (an older one, beyond the kept three)
                continue
            except DomainError as exc:  # refused by admission: the job goes on; its final adapter decides
                seen.add(record.step)
                self._emit(job_id, f"Checkpoint at step {record.step} could not be registered: {exc.message}",
                           level="warn")
                continue
            record = record.model_copy(update={"fine_tuned_model_checkpoint": version.id, "adapter_sha256": digest})
            try:
                self.records.write(self._checkpoint_key(job_id, record.step), record.model_dump_json(indent=2).encode())
            except BaseException:
                with contextlib.suppress(DomainError, OSError):
                    await self.registry.delete(name, version.version)
                raise
            listed[record.step] = record
            seen.add(record.step)
            self._emit(job_id, f"Checkpoint at step {record.step} is served as {version.id}")
        for record in sorted(listed.values(), key=lambda r: r.step)[:-KEPT_CHECKPOINTS]:
            await self._drop_checkpoint(job_id, record)

    async def _drop_checkpoint(self, job_id: str, record: CheckpointRecord) -> None:
        """Delete a listed checkpoint's staged version and its listing. A version someone made current (or put
        in a canary) meanwhile is theirs now: it stays, listed."""
        ref = parse_adapter_ref(record.fine_tuned_model_checkpoint or "")
        try:
            await self._version(ref.name, ref.version)
            adapter = self.registry.get(ref.name)
            canary = adapter.canary
            if adapter.current_version == ref.version or (canary and canary.active and canary.version == ref.version):
                return
            await self.registry.delete(ref.name, ref.version)
        except NotFound:  # deleted already
            pass
        self.records.delete(self._checkpoint_key(job_id, record.step))

    async def _discard_checkpoints(self, job_id: str) -> None:
        """A job that ends without succeeding (cancelled, failed, interrupted) leaves no checkpoint versions
        behind, except one that someone made current while it ran."""
        try:
            for record in self._listed_checkpoints(job_id):
                await self._drop_checkpoint(job_id, record)
        except (DomainError, OSError, StoreUnavailable) as exc:
            log.warning("job %s: its checkpoints could not all be removed: %s", job_id, exc)

    async def _version(self, name: str, version: int):
        """The version's record; one another runner registered (before a pause) may need a fresh look at the
        store first."""
        try:
            return self.registry.version(name, version)
        except NotFound:
            await self.registry.refresh()
            return self.registry.version(name, version)

    async def _register(self, job_id: str, name: str, result: JobResult, workspace: Path) -> None:
        """Runs on the runner that holds the workspace: the last checkpoints' weights are there."""
        async with self._commit:  # the commit point: a cancel either came before (nothing registers) or waits
            if job_id in self._cancelled or self.get(job_id).status in FINISHED:
                return
            await self._register_checkpoints(job_id, name, workspace)  # any the last round did not see
            # The final adapter is usually one of them (the last epoch's, or the best one the trainer kept):
            # then that version is promoted rather than registered twice.
            kept = {record.adapter_sha256: parse_adapter_ref(record.fine_tuned_model_checkpoint).version
                    for record in self._listed_checkpoints(job_id) if record.adapter_sha256}
            final = kept.get(file_sha256(result.run_dir / ADAPTER_FILES[1]))
            if final is not None:
                # A version that failed its name's suite stays staged: the gate decides, not the job.
                gate = (await self._version(name, final)).gate
                if gate is None or gate.passed:
                    await self.registry.promote(name, final)
                version_id = f"{name}@{final}"
            else:
                registered = await self._register_folder(name, result.run_dir, make_current=True)
                version_id, gate = registered.id, registered.gate
            changes = {}
            if result.hyperparameters is not None:  # what `auto` became
                used = result.hyperparameters.model_dump(exclude_none=True)
                job = self.get(job_id)
                method = job.method or Method()
                changes["hyperparameters"] = Hyperparameters.model_validate(
                    {k: v for k, v in used.items() if k in Hyperparameters.model_fields})
                changes["method"] = with_hyperparameters(method, used)
            results = self._results_file(job_id)
            if gate is not None and not gate.passed:  # the name's suite kept it from becoming current
                self._finish(job_id, "succeeded", f"gated: {gate.passed_cases}/{gate.total_cases} passed, staged as "
                             f"{version_id} (report: {gate.report}.md)", level="warn", fine_tuned_model=version_id,
                             trained_tokens=result.trained_tokens, result_files=results, **changes)
                return
            passed = f"; suite passed {gate.passed_cases}/{gate.total_cases}" if gate is not None else ""
            self._finish(job_id, "succeeded", f"New fine-tuned model created: {name} ({version_id}){passed}",
                         fine_tuned_model=name, trained_tokens=result.trained_tokens, result_files=results, **changes)

    def _results_file(self, job_id: str) -> list[str]:
        """The metrics CSV (from the job's published events) as a file of purpose `fine-tune-results`, in the
        shared records; a failure to write it costs the job nothing but the file (a warning event says so)."""
        try:
            content = metrics_csv(self._events(job_id))
            return [self.files.create_result(f"{job_id}-results.csv", content).id]
        except (OSError, StoreUnavailable) as exc:
            log.warning("job %s: the results file could not be written: %s", job_id, exc)
            with contextlib.suppress(OSError, StoreUnavailable):
                self._emit(job_id, "The results file could not be written", level="warn")
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
    """When the last step should end, from the measured time per step of the worker's latest run (None until
    it logged two steps)."""
    starts = [n for n, e in enumerate(events) if e.type == "message" and e.message.startswith((STARTED, RESUMED))]
    latest_run = events[starts[-1]:] if starts else events  # a pause's idle time is no training time
    steps = [(e.created_at, e.data["step"], e.data.get("total_steps")) for e in latest_run
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


def _dump(job: FineTuningJob) -> bytes:
    return json.dumps(job.model_dump(mode="json"), indent=2, ensure_ascii=False).encode()


def _parse_events(raw: bytes | None) -> list[JobEventRecord]:
    events = []
    for line in (raw or b"").decode("utf-8", errors="replace").splitlines():
        try:
            events.append(JobEventRecord.model_validate_json(line))
        except (ValueError, RecursionError):  # a line being written right now, or damaged: skip it
            continue
    return events


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
