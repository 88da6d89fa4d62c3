"""One fine-tuning job in its own process: `python -m quiver.training.worker JOB_DIR`.

The server's job runner writes JOB_DIR/spec.json (a `JobSpec`) and starts this under the engine guard, so it
dies with the gateway; it reports through two files the runner reads: events.jsonl (appended, one event a
line: messages and per-step metrics) and result.json (a `JobResult`, written last, atomically). Keeping
training out of the gateway's process keeps serving responsive while a job runs.

Under `torchrun` (QUIVER_FINETUNING_PROCESSES > 1: one process per GPU) every process trains its share of
each batch and only the first one (RANK 0) reports: events, result.json and the run folder are written once.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any

from rich.console import Console
from transformers import TrainerCallback

from quiver.common.jobs import RESULT, SPEC, TRAIN_LOG, EventLog, JobFailure, JobResult, JobSpec, write_record
from quiver.training.config import TrainConfig


class MetricsEvents(TrainerCallback):
    """Each logged training step and evaluation becomes a `metrics` event, as the hosted APIs report them."""

    def __init__(self, events: EventLog) -> None:
        self.events = events

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        data: dict[str, Any] = {"step": state.global_step, "total_steps": state.max_steps}
        if "loss" in logs:
            data["train_loss"] = logs["loss"]
        if "eval_loss" in logs:
            data["valid_loss"] = logs["eval_loss"]
        if len(data) > 2:
            self.events.emit(f"Step {state.global_step}/{state.max_steps}", kind="metrics", data=data)


class _Silent:
    """The event log of the other processes of a data-parallel run: the first one reports for all."""

    def emit(self, *_args, **_kwargs) -> None:
        return None


def run(job_dir: Path) -> int:
    from quiver.training.trainer import is_main_process, train

    main = is_main_process()
    events = EventLog(job_dir) if main else _Silent()
    try:
        spec = JobSpec.model_validate_json((job_dir / SPEC).read_bytes())
        config = TrainConfig.from_openai(spec.hyperparameters, spec.seed)
        events.emit("Fine-tuning job started")
        with open(job_dir / TRAIN_LOG, "a") as log:
            result = train(
                spec.training_file,
                job_dir / "run",
                config,
                name=spec.name,
                validation_file=spec.validation_file,
                base_model_dir=spec.base_model_dir,
                base_model_name=spec.base_model_name,
                console=Console(file=log, force_terminal=False),
                callbacks=[MetricsEvents(events)],
            )
        for warning in result.warnings:
            events.emit(warning, level="warn")
        training = result.manifest["training"]
        trained_tokens = (training.get("trained_tokens_per_epoch") or 0) * (training.get("epochs_completed") or 0)
        if main:
            write_record(job_dir / RESULT, JobResult(status="succeeded", trained_tokens=int(trained_tokens),
                                                     run_dir=result.run_dir))
        return 0
    except Exception as exc:  # the job fails with the reason; the server stays up
        events.emit(f"Training failed: {exc}", level="error")
        with open(job_dir / TRAIN_LOG, "a") as log:
            log.write(traceback.format_exc())
        if main:
            write_record(job_dir / RESULT, JobResult(
                status="failed", error=JobFailure(code="training_failed", message=str(exc))))
        return 1


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1])))
