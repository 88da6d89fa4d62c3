"""One fine-tuning job in its own process: `python -m quiver.training.worker JOB_DIR`.

The server's job runner writes JOB_DIR/spec.json (a `JobSpec`) and starts this under the engine guard, so it
dies with the gateway; it reports through two files the runner reads: events.jsonl (appended, one event a
line: messages and per-step metrics) and result.json (a `JobResult`, written last, atomically). Keeping
training out of the gateway's process keeps serving responsive while a job runs.

Under `torchrun` (QUIVER_FINETUNING_PROCESSES > 1: one process per GPU) every process trains its share of
each batch and only the first one (RANK 0) reports: events, result.json and the run folder are written once.

Pause: when the runner creates JOB_DIR/pause, the worker stops at the next step boundary, HF Trainer saves a
resumable checkpoint there (run/checkpoints/checkpoint-N: adapter, optimizer, scheduler, RNG, trainer state),
the worker writes run/paused.json and a `paused` result, and exits. Started again on that folder, it resumes
from that checkpoint with HF Trainer's `resume_from_checkpoint` and ends with the steps of an unpaused run.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from rich.console import Console
from transformers import TrainerCallback

from quiver.common.jobs import (
    CHECKPOINT,
    CHECKPOINTS,
    KEPT_CHECKPOINTS,
    PAUSE,
    PAUSED,
    RESULT,
    RESUMED,
    STARTED,
    SPEC,
    TRAIN_LOG,
    CheckpointRecord,
    EventLog,
    JobFailure,
    JobResult,
    JobSpec,
    PausedRecord,
    ResolvedHyperparameters,
    write_record,
)
from quiver.training.config import TrainConfig

# The trainer's log keys -> the names OpenAI's metrics use (events, checkpoints, the results CSV).
_TRAIN_KEYS = {"loss": "train_loss", "mean_token_accuracy": "train_mean_token_accuracy",
               "learning_rate": "learning_rate"}
# Quiver evaluates on the whole validation split, so the "full" and the per-step figures are the same number.
_EVAL_KEYS = {"eval_loss": ("valid_loss", "full_valid_loss"),
              "eval_mean_token_accuracy": ("valid_mean_token_accuracy", "full_valid_mean_token_accuracy")}


class MetricsEvents(TrainerCallback):
    """Each logged training step and evaluation becomes a `metrics` event, as the hosted APIs report them."""

    def __init__(self, events: EventLog) -> None:
        self.events = events

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        data: dict[str, Any] = {"step": state.global_step, "total_steps": state.max_steps}
        if "loss" in logs or "eval_loss" in logs:
            data.update(_metrics(logs))
            self.events.emit(f"Step {state.global_step}/{state.max_steps}", kind="metrics", data=data)


def _metrics(logs: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, name in _TRAIN_KEYS.items():
        if isinstance(logs.get(key), (int, float)):
            out[name] = float(logs[key])
    for key, names in _EVAL_KEYS.items():
        if isinstance(logs.get(key), (int, float)):
            out.update(dict.fromkeys(names, float(logs[key])))
    return out


def _epoch_complete(state) -> bool:
    # HF Trainer sets epoch = epochs done + the share of this one: a whole number only when an epoch ended.
    return float(state.epoch or 0).is_integer()


def _all_agree(flag: bool, args) -> bool:
    """True when any process of a data-parallel run saw `flag`: every process must stop at the same step."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    seen = torch.tensor([int(flag)], device=args.device)
    dist.all_reduce(seen, op=dist.ReduceOp.MAX)
    return bool(seen.item())


class PauseAtStep(TrainerCallback):
    """Stops training at the step boundary after the runner's pause request appears, and has HF Trainer save
    its resumable checkpoint there (at the epoch-end hook, which the trainer calls after any stop). A pause in
    the middle of an epoch skips that hook's evaluation, so a resumed run evaluates exactly when an unpaused one
    does; a pause at an epoch's last step lets the evaluation happen first. The last step is never paused."""

    def __init__(self, request: Path) -> None:
        self.request = request
        self.paused_at: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.paused_at is None and state.global_step < state.max_steps and _all_agree(self.request.exists(), args):
            self.paused_at = state.global_step
            control.should_training_stop = True
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.paused_at is not None:
            control.should_save = True
            if not _epoch_complete(state):
                control.should_evaluate = False
        return control


class EpochCheckpoints(TrainerCallback):
    """The adapter at the end of each epoch, saved to JOB_DIR/checkpoints/step-N with its metrics; the
    gateway registers each as a staged version. With a validation split the record waits for the epoch's
    evaluation (which the trainer runs right after `on_epoch_end`) so it carries the validation loss."""

    def __init__(self, job_dir: Path, events: EventLog, pause: PauseAtStep | None = None) -> None:
        self.root = job_dir / CHECKPOINTS
        self.events = events
        self.pause = pause
        self.latest: dict[str, float] = {}  # the last logged training figures
        self.pending: tuple[Path, CheckpointRecord] | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.latest.update({k: v for k, v in _metrics(logs or {}).items() if not k.startswith(("valid", "full"))})

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self.pause is not None and self.pause.paused_at is not None and not _epoch_complete(state):
            return  # paused mid-epoch: the epoch ends in the resumed run
        self._commit()  # an earlier epoch's, if its evaluation never came
        folder = self.root / f"step-{state.global_step}"
        model.save_pretrained(folder, safe_serialization=True)
        record = CheckpointRecord(step=state.global_step, created_at=int(time.time()),
                                  metrics={"step": float(state.global_step), **self.latest})
        self.pending = (folder, record)
        if args.eval_strategy == "no":
            self._commit()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.pending and self.pending[1].step == state.global_step:
            self.pending[1].metrics.update(_metrics(metrics or {}))
            self._commit()

    def on_train_end(self, args, state, control, **kwargs):
        self._commit()

    def _commit(self) -> None:
        if self.pending is None:
            return
        folder, record = self.pending
        self.pending = None
        write_record(folder / CHECKPOINT, record)
        self.events.emit(f"Checkpoint created at step {record.step}")
        complete = sorted(self.root.glob(f"step-*/{CHECKPOINT}"), key=lambda path: int(path.parent.name[5:]))
        for old in complete[:-KEPT_CHECKPOINTS]:
            shutil.rmtree(old.parent, ignore_errors=True)


def config_for(spec: JobSpec) -> TrainConfig:
    """The job's trainer config: OpenAI's hyperparameters, and the method and starting adapter when they
    differ from the defaults (so a plain supervised job asks nothing new of the trainer)."""
    overrides: dict[str, Any] = {}
    if spec.method != "supervised":
        overrides["method"] = spec.method
    if spec.beta is not None:
        overrides["beta"] = spec.beta
    if spec.init_adapter is not None:
        overrides["init_adapter"] = spec.init_adapter
    return TrainConfig.from_openai(spec.hyperparameters, spec.seed, **overrides)


def resolved_hyperparameters(manifest: dict[str, Any], method: str) -> ResolvedHyperparameters:
    used = manifest["hyperparameters"]
    default_rate = TrainConfig.model_fields["learning_rate"].default
    return ResolvedHyperparameters(
        n_epochs=used["resolved_epochs"], batch_size=used["batch_size"],
        learning_rate_multiplier=round(used["learning_rate"] / default_rate, 6),
        beta=used.get("beta") if method == "dpo" else None)


class _Silent:
    """The event log of the other processes of a data-parallel run: the first one reports for all."""

    def emit(self, *_args, **_kwargs) -> None:
        return None


def _stopped_early(trainer) -> bool:
    """Whether early stopping ended the run (its patience ran out), whatever else asked to stop."""
    from transformers import EarlyStoppingCallback

    return any(isinstance(callback, EarlyStoppingCallback)
               and callback.early_stopping_patience_counter >= callback.early_stopping_patience
               for callback in trainer.callback_handler.callbacks)


def _resume_point(job_dir: Path, checkpoints: Path) -> tuple[PausedRecord, Path] | None:
    """The paused run's record and its checkpoint, when this job was paused. The trainer state names the best
    epoch's checkpoint by its path, which moved if the job resumes in another workspace: it is pointed at the
    same folder here."""
    path = job_dir / PAUSED
    if not path.exists():
        return None
    paused = PausedRecord.model_validate_json(path.read_bytes())
    checkpoint = checkpoints / paused.checkpoint
    state_file = checkpoint / "trainer_state.json"
    if not state_file.is_file():  # its runner went away before publishing it: the run starts over
        path.unlink()
        return None
    state = json.loads(state_file.read_text())
    best = state.get("best_model_checkpoint")
    if best and (checkpoints / Path(best).name).is_dir() and Path(best) != checkpoints / Path(best).name:
        state["best_model_checkpoint"] = str(checkpoints / Path(best).name)
        state_file.write_text(json.dumps(state, indent=2))
    return paused, checkpoint


def run(job_dir: Path) -> int:
    from quiver.training.trainer import fit, is_main_process, save, setup, validate

    main = is_main_process()
    events = EventLog(job_dir) if main else _Silent()
    try:
        spec = JobSpec.model_validate_json((job_dir / SPEC).read_bytes())
        config = config_for(spec)
        pause = PauseAtStep(job_dir / PAUSE)
        with open(job_dir / TRAIN_LOG, "a") as log:
            training = setup(
                spec.training_file,
                job_dir / "run",
                config,
                name=spec.name,
                validation_file=spec.validation_file,
                base_model_dir=spec.base_model_dir,
                base_model_name=spec.base_model_name,
                console=Console(file=log, force_terminal=False),
                # Checkpoints are written by the first process only (the others hold the same weights).
                callbacks=[MetricsEvents(events), pause] + ([EpochCheckpoints(job_dir, events, pause)] if main else []),
            )
            resume = _resume_point(job_dir, training.checkpoints)
            if resume is None:
                events.emit(STARTED)
            else:
                paused, checkpoint = resume
                training.initial_validation_loss, training.train_seconds = (paused.initial_validation_loss,
                                                                            paused.train_seconds)
                events.emit(f"{RESUMED} from step {paused.step}")
            output = fit(training, resume[1] if resume else None)
            if pause.paused_at is not None and not _stopped_early(training.trainer):
                if main:
                    write_record(job_dir / PAUSED, PausedRecord(
                        step=pause.paused_at, checkpoint=f"checkpoint-{pause.paused_at}",
                        initial_validation_loss=training.initial_validation_loss,
                        train_seconds=training.train_seconds))
                    write_record(job_dir / RESULT, JobResult(status="paused", step=pause.paused_at))
                events.emit(f"Paused at step {pause.paused_at}: its resumable checkpoint is saved")
                return 0
            result = save(training, output, validate(training))
        (job_dir / PAUSED).unlink(missing_ok=True)
        for warning in result.warnings:
            events.emit(warning, level="warn")
        trained = result.manifest["training"]
        trained_tokens = (trained.get("trained_tokens_per_epoch") or 0) * (trained.get("epochs_completed") or 0)
        if main:
            write_record(job_dir / RESULT, JobResult(
                status="succeeded", trained_tokens=int(trained_tokens), run_dir=result.run_dir,
                hyperparameters=resolved_hyperparameters(result.manifest, spec.method)))
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
