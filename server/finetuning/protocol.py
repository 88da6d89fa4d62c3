"""OpenAI's shapes for files and fine-tuning jobs (what the official client parses)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from quiver.common.jobs import DpoHyperparameters, Hyperparameters, Seed

JobStatus = Literal["validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"]
FINISHED: tuple[str, ...] = ("succeeded", "failed", "cancelled")


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool = False  # the official client pages on until this is false


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters | None = None


class DpoMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: DpoHyperparameters | None = None


class Method(BaseModel):
    """OpenAI's `method`: `supervised` and `dpo` train here; `reinforcement` is refused by name (not as
    malformed). On the job object it carries the hyperparameters used, `auto` resolved once the job ran."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "dpo", "reinforcement"] = "supervised"
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    reinforcement: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _settings_match_type(self) -> Method:
        for other in ("supervised", "dpo", "reinforcement"):
            if other != self.type and getattr(self, other) is not None:
                raise ValueError(f"`{other}` settings given for a `{self.type}` job")
        return self


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None = None
    model: str
    fine_tuned_model: str | None = None
    organization_id: str = "quiver"
    result_files: list[str] = Field(default_factory=list)
    status: JobStatus
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters
    trained_tokens: int | None = None
    error: JobError | None = None
    seed: int
    suffix: str | None = None
    estimated_finish: int | None = None
    integrations: list[Any] | None = None
    metadata: dict[str, str] | None = None
    method: Method | None = None


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool = False


class CreateJobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    training_file: str = Field(max_length=64)
    validation_file: str | None = Field(None, max_length=64)
    # OpenAI allows 64 characters; here the suffix becomes part of an adapter name (64 at most, with a job tag).
    suffix: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9._-]{0,39}$",
                               description="becomes part of the adapter's name: 1-40 of a-z 0-9 . _ -")
    seed: Seed | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = Field(None, description="{'type': 'supervised', 'supervised': {'hyperparameters': ...}}")
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=16)
    # OpenAI's only integration is Weights & Biases; quiver refuses any (see docs/fine-tuning.md).
    integrations: list[Any] | None = Field(None, max_length=10)


class JobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"] = "message"
    data: dict[str, Any] | None = None


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEvent]
    has_more: bool = False


class CheckpointMetrics(BaseModel):
    step: float | None = None
    train_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None
    full_valid_loss: float | None = None
    full_valid_mean_token_accuracy: float | None = None


class JobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str = Field(description="`name@version`: callable as a model id")
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobCheckpoint]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None
