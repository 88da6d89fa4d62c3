"""Pause and resume with the real trainer: the worker (`quiver.training.worker`, a process as the runner starts
it) stops at a step boundary when the pause file appears, saves HF Trainer's resumable checkpoint, and started
again on the same folder ends with the steps, and the losses, of an unpaused run with the same seed."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quiver.common.jobs import PAUSE, PAUSED, RESULT, SPEC, EventLog, JobResult, JobSpec, PausedRecord, write_record
from quiver.training.data import read_examples, read_preference_examples, write_jsonl

pytestmark = pytest.mark.training

REPO = Path(__file__).parent.parent
# 2 epochs of 2 steps (8 train examples, batch 4) with a validation split: a pause mid-epoch must not move the
# epoch's evaluation, its checkpoint or early stopping.
HYPERPARAMETERS = {"n_epochs": 2, "batch_size": 4}


def job_folder(root: Path, model_dir: Path, method: str = "supervised") -> Path:
    """10 chat examples (supervised), or 10 preference pairs (dpo): 8 to train on, 2 held out."""
    root.mkdir(parents=True)
    data = root / "train.jsonl"
    if method == "dpo":
        write_jsonl(data, read_preference_examples(REPO / "examples" / "concise.jsonl")[:10])
    else:
        write_jsonl(data, read_examples(REPO / "examples" / "pirate.jsonl")[:10])
    write_record(root / SPEC, JobSpec(name="pause", training_file=data, base_model_dir=model_dir,
                                      base_model_name="SmolLM2-135M-Instruct", hyperparameters=HYPERPARAMETERS,
                                      seed=5, method=method))
    return root


def start_worker(job_dir: Path) -> subprocess.Popen:
    log = open(job_dir / "worker.out", "ab")
    return subprocess.Popen([sys.executable, "-m", "quiver.training.worker", str(job_dir)], stdout=log,
                            stderr=subprocess.STDOUT, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


def finish(process: subprocess.Popen, job_dir: Path) -> JobResult:
    assert process.wait(timeout=900) == 0, (job_dir / "worker.out").read_text()[-3000:]
    return JobResult.model_validate_json((job_dir / RESULT).read_bytes())


def steps_logged(job_dir: Path) -> list[int]:
    return [e.data["step"] for e in EventLog(job_dir).read() if e.type == "metrics" and "train_loss" in e.data]


def pause_once_training_runs(job_dir: Path) -> JobResult:
    """Start the worker and ask for a pause once it has logged a step: its result at the next step boundary."""
    worker = start_worker(job_dir)
    deadline = time.monotonic() + 600
    while not steps_logged(job_dir):
        assert worker.poll() is None and time.monotonic() < deadline, (job_dir / "worker.out").read_text()[-3000:]
        time.sleep(0.2)
    (job_dir / PAUSE).touch()
    return finish(worker, job_dir)


def resume(job_dir: Path) -> JobResult:
    """Start the worker again on the paused folder, as the runner does: its request and the old result cleared."""
    (job_dir / PAUSE).unlink()
    (job_dir / RESULT).unlink()
    return finish(start_worker(job_dir), job_dir)


def test_a_paused_run_resumes_to_the_steps_and_losses_of_an_unpaused_one(tmp_path: Path, model_dir: Path) -> None:
    plain = job_folder(tmp_path / "plain", model_dir)
    unpaused = finish(start_worker(plain), plain)
    assert unpaused.status == "succeeded"
    reference = json.loads((unpaused.run_dir / "manifest.json").read_text())["training"]

    job = job_folder(tmp_path / "paused", model_dir)
    paused = pause_once_training_runs(job)
    assert paused.status == "paused" and 1 <= paused.step < reference["steps"], paused
    record = PausedRecord.model_validate_json((job / PAUSED).read_bytes())
    checkpoint = job / "run" / "checkpoints" / record.checkpoint
    assert record.step == paused.step and record.initial_validation_loss is not None
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
            "adapter_model.safetensors"} <= {p.name for p in checkpoint.iterdir()}
    assert max(steps_logged(job)) == paused.step  # it stopped at the step boundary it reports
    # Paused in the first epoch: its checkpoint (and evaluation) wait for the epoch to end in the resumed run.
    epoch_steps = reference["steps"] // 2
    if paused.step < epoch_steps:
        assert not (job / "checkpoints").exists() or not list((job / "checkpoints").iterdir())

    resumed = resume(job)
    assert resumed.status == "succeeded", resumed
    training = json.loads((resumed.run_dir / "manifest.json").read_text())["training"]
    assert training["steps"] == reference["steps"] and training["epochs_completed"] == reference["epochs_completed"]
    assert steps_logged(job) == list(range(1, reference["steps"] + 1))  # each step once, none repeated or lost
    assert training["initial_validation_loss"] == pytest.approx(reference["initial_validation_loss"])
    assert training["final_train_loss"] == pytest.approx(reference["final_train_loss"], rel=0.02)
    assert training["final_validation_loss"] == pytest.approx(reference["final_validation_loss"], rel=0.02)
    assert not (job / PAUSED).exists()
    # One checkpoint per epoch, as unpaused, each with its epoch's validation loss.
    assert sorted(int(p.name[5:]) for p in (job / "checkpoints").iterdir()) == [epoch_steps, reference["steps"]]
    messages = [e.message for e in EventLog(job).read()]
    assert f"Paused at step {paused.step}: its resumable checkpoint is saved" in messages
    assert f"Fine-tuning job resumed from step {paused.step}" in messages


def test_a_pause_after_an_evaluated_epoch_keeps_its_resumable_checkpoint(tmp_path: Path, model_dir: Path) -> None:
    """Once an epoch was evaluated HF Trainer holds a best checkpoint; a pause ends `train()`, and with a save
    limit of 1 HF then deletes every checkpoint but the best, the pause's own among them: the resumed run would
    start over. It resumes from the pause."""
    job = job_folder(tmp_path / "job", model_dir)
    worker = start_worker(job)
    deadline = time.monotonic() + 600
    while not any(e.message == "Checkpoint created at step 2" for e in EventLog(job).read()):  # epoch 1 evaluated
        assert worker.poll() is None and time.monotonic() < deadline, (job / "worker.out").read_text()[-3000:]
        time.sleep(0.2)
    (job / PAUSE).touch()
    paused = finish(worker, job)
    assert paused.status == "paused" and paused.step >= 2, paused
    record = PausedRecord.model_validate_json((job / PAUSED).read_bytes())
    assert (job / "run" / "checkpoints" / record.checkpoint / "trainer_state.json").is_file()

    assert resume(job).status == "succeeded"
    assert steps_logged(job) == [1, 2, 3, 4]  # each step once: resumed, not started over
    assert f"Fine-tuning job resumed from step {paused.step}" in [e.message for e in EventLog(job).read()]


def test_a_paused_dpo_run_resumes_to_the_steps_and_losses_of_an_unpaused_one(tmp_path: Path,
                                                                           model_dir: Path) -> None:
    """DPO trains on TRL's DPOTrainer, with a frozen reference (the base: the adapter switched off) that a
    resumed run must score as the unpaused one did, and preference pairs collated its own way."""
    plain = job_folder(tmp_path / "plain", model_dir, method="dpo")
    unpaused = finish(start_worker(plain), plain)
    assert unpaused.status == "succeeded", unpaused
    reference_manifest = json.loads((unpaused.run_dir / "manifest.json").read_text())
    assert reference_manifest["hyperparameters"]["method"] == "dpo"
    reference = reference_manifest["training"]

    job = job_folder(tmp_path / "paused", model_dir, method="dpo")
    paused = pause_once_training_runs(job)
    assert paused.status == "paused" and 1 <= paused.step < reference["steps"], paused
    record = PausedRecord.model_validate_json((job / PAUSED).read_bytes())
    assert record.step == paused.step
    assert (job / "run" / "checkpoints" / record.checkpoint / "trainer_state.json").is_file()

    resumed = resume(job)
    assert resumed.status == "succeeded", resumed
    manifest = json.loads((resumed.run_dir / "manifest.json").read_text())
    training = manifest["training"]
    assert manifest["hyperparameters"]["method"] == "dpo" and training["steps"] == reference["steps"]
    assert steps_logged(job) == list(range(1, reference["steps"] + 1))  # each step once, none repeated or lost
    assert training["final_train_loss"] == pytest.approx(reference["final_train_loss"], rel=0.02)
    assert training["final_validation_loss"] == pytest.approx(reference["final_validation_loss"], rel=0.02)
    assert f"Fine-tuning job resumed from step {paused.step}" in [e.message for e in EventLog(job).read()]
