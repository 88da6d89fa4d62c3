"""A fine-tuning job's records, shared by the gateway's job runner and the training worker (another process).

    <job dir>/spec.json      JobSpec: what to train; written by the runner before it starts the worker
    <job dir>/events.jsonl   appended by both, one event a line: messages and per-step metrics (progress)
    <job dir>/result.json    JobResult: written last by the worker, atomically
    <job dir>/train.log      the worker's console output
    <job dir>/checkpoints/step-<N>/   an adapter saved at the end of an epoch, with checkpoint.json
                             (CheckpointRecord) written last: a folder without it is incomplete
    <job dir>/pause          created by the runner: the worker stops at the next step boundary, saves a
                             resumable checkpoint and reports `paused`
    <job dir>/run/checkpoints/checkpoint-<N>/   HF Trainer's own checkpoints (adapter, optimizer, scheduler,
                             RNG, trainer state): what a paused job resumes from
    <job dir>/run/paused.json  PausedRecord: written by the worker once it paused, names the checkpoint

`Hyperparameters` is OpenAI's shape with OpenAI's bounds; the trainer maps it to its own config.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WrapValidator
from pydantic_core import PydanticCustomError

from quiver.common.files import write_json_atomic

SPEC = "spec.json"
EVENTS = "events.jsonl"
RESULT = "result.json"
TRAIN_LOG = "train.log"
CHECKPOINTS = "checkpoints"
CHECKPOINT = "checkpoint.json"
PAUSE = "pause"
PAUSED = "run/paused.json"
# The worker's first event of each run of a job (a resumed one: `RESUMED from step N`); the finish estimate
# times the steps of the latest run only.
STARTED = "Fine-tuning job started"
RESUMED = "Fine-tuning job resumed"
RESUME_CHECKPOINTS = "run/checkpoints"  # the trainer's output_dir: HF Trainer's resumable checkpoints
# The epochs' checkpoints kept (and registered), the latest ones: OpenAI's number. With the trainer's early
# stopping patience of 2 epochs the best epoch, the one the final adapter comes from, is always among them.
KEPT_CHECKPOINTS = 3

# OpenAI's types: integers must be JSON integers (strict: 3.0, "3" and true are refused), the multiplier a finite
# number above zero. Bounds as OpenAI documents them (1-50 epochs, batch size 1-256).
Epochs = Annotated[int, Field(strict=True, ge=1, le=50)]
BatchSize = Annotated[int, Field(strict=True, ge=1, le=256)]
Multiplier = Annotated[float, Field(strict=True, gt=0, le=100, allow_inf_nan=False)]
Seed = Annotated[int, Field(strict=True, ge=0, le=2**31 - 1)]
# DPO's beta: OpenAI publishes no bound; above 0 (the loss needs it), at most 2 (TRL's default is 0.1, papers
# use 0.01-0.5).
Beta = Annotated[float, Field(strict=True, gt=0, le=2, allow_inf_nan=False)]


def _one_error(expected: str) -> WrapValidator:
    """Report a value that fits neither the number nor 'auto' as one error at the field itself (OpenAI's
    `param` is `hyperparameters.n_epochs`, not one per branch of the union)."""

    def validate(value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("invalid_hyperparameter", "must be {expected}", {"expected": expected}) from None

    return WrapValidator(validate)


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: Annotated[Epochs | Literal["auto"], _one_error("an integer from 1 to 50, or 'auto'")] = Field(
        "auto", description="1-50, or 'auto' to pick from the dataset size")
    batch_size: Annotated[BatchSize | Literal["auto"], _one_error("an integer from 1 to 256, or 'auto'")] = Field(
        "auto", description="1-256, or 'auto'")
    learning_rate_multiplier: Annotated[Multiplier | Literal["auto"], _one_error(
        "a number above 0 and at most 100, or 'auto'")] = Field(
        "auto", description="above 0: scales the trainer's default learning rate, or 'auto'")


class DpoHyperparameters(Hyperparameters):
    """OpenAI's DPO hyperparameters: the supervised ones and `beta`."""

    beta: Annotated[Beta | Literal["auto"], _one_error("a number above 0 and at most 2, or 'auto'")] = Field(
        "auto", description="above 0, at most 2: how far the adapter may move from the base, or 'auto' (0.1)")


TrainingMethod = Literal["supervised", "dpo"]


class JobSpec(BaseModel):
    """What the worker trains: the runner's whole instruction, validated again on the worker's side."""

    model_config = ConfigDict(extra="forbid")
    name: str
    training_file: Path
    validation_file: Path | None = None
    base_model_dir: Path
    base_model_name: str
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    seed: Seed = 42
    method: TrainingMethod = "supervised"
    beta: Beta | None = None  # DPO only; None keeps the trainer's default
    init_adapter: Path | None = None  # continue training from this adapter folder (a copy the job owns)


class JobFailure(BaseModel):
    code: str
    message: str


class ResolvedHyperparameters(BaseModel):
    """What `auto` became: reported back so the job object shows the values the trainer used."""

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    beta: float | None = None


class JobResult(BaseModel):
    status: Literal["succeeded", "failed", "paused"]
    trained_tokens: int | None = None
    step: int | None = None  # paused: the step the resumable checkpoint holds
    run_dir: Path | None = None
    error: JobFailure | None = None
    hyperparameters: ResolvedHyperparameters | None = None


class CheckpointRecord(BaseModel):
    """checkpoints/step-<N>/checkpoint.json: the worker writes it after the adapter's files; the gateway adds
    `fine_tuned_model_checkpoint` (`name@version`) and the weights' digest once the checkpoint is registered."""

    step: int
    created_at: int
    metrics: dict[str, float] = Field(default_factory=dict)
    fine_tuned_model_checkpoint: str | None = None
    adapter_sha256: str | None = None  # so that the final adapter is recognised as a checkpoint on any runner


class PausedRecord(BaseModel):
    """run/paused.json: where a paused run stopped, and what its next run needs that HF Trainer's checkpoint
    does not keep."""

    step: int
    checkpoint: str  # the folder under run/checkpoints, `checkpoint-<step>`
    initial_validation_loss: float | None = None  # measured before the first step, the curve's step 0
    train_seconds: float = 0.0  # training time so far


class JobEventRecord(BaseModel):
    """One line of events.jsonl: a message, or (type `metrics`) a training step's numbers in `data`."""

    created_at: int
    level: Literal["info", "warn", "error"] = "info"
    message: str
    type: Literal["message", "metrics"] = "message"
    data: dict[str, Any] | None = None


def write_record(path: Path, record: BaseModel) -> None:
    write_json_atomic(path, record.model_dump(mode="json"))


class EventLog:
    def __init__(self, job_dir: Path) -> None:
        self.path = Path(job_dir) / EVENTS

    def emit(self, message: str, level: str = "info", kind: str = "message", data: dict[str, Any] | None = None) -> None:
        event = JobEventRecord(created_at=int(time.time()), level=level, message=message, type=kind, data=data)
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(event.model_dump_json() + "\n")

    def read(self) -> list[JobEventRecord]:
        if not self.path.exists():
            return []
        events = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                events.append(JobEventRecord.model_validate(json.loads(line)))
            except (ValueError, RecursionError):  # a line being written right now, or damaged: skip it
                continue
        return events
