"""`quiver train` data-parallel under `torchrun`: two processes on CPU (the gloo backend), as several GPUs would
run it. Each process takes its share of every batch; the run folder is the single-process one, written once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from quiver.training.data import read_examples, write_jsonl
from training_fixtures import REPO, base_model_dir  # noqa: F401

pytestmark = pytest.mark.training

PROCESSES, STEPS, BATCH = 2, 2, 2
# The files of a run folder, as a single-process run writes them.
RUN_FILES = {"adapter_config.json", "adapter_model.safetensors", "manifest.json", "loss_curve.json",
             "loss_curve.png", "README.md", "data"}


@dataclass
class DistributedRun:
    run_dir: Path
    output: str
    train_examples: int


@pytest.fixture(scope="module")
def distributed_run(base_model_dir: Path, tmp_path_factory) -> DistributedRun:  # noqa: F811
    work = tmp_path_factory.mktemp("distributed")
    data = work / "pirate.jsonl"
    write_jsonl(data, read_examples(REPO / "examples" / "pirate.jsonl")[:20])
    torchrun = Path(sys.executable).with_name("torchrun")
    quiver = Path(sys.executable).with_name("quiver")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [str(torchrun), "--nproc_per_node", str(PROCESSES), "--no-python", str(quiver), "train", str(data),
         "--name", "dist", "--out", str(work / "run"), "--base-model", str(base_model_dir),
         "--max-steps", str(STEPS), "--batch-size", str(BATCH), "--max-seq-len", "160", "--epochs", "1",
         "--learning-rate", "0.003", "--seed", "1"],
        cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    manifest = json.loads((work / "run" / "manifest.json").read_text())
    return DistributedRun(work / "run", done.stdout, manifest["dataset"]["counts"]["train"])


def test_two_processes_train_one_adapter_data_parallel_and_write_the_run_once(distributed_run) -> None:
    run = distributed_run
    assert {p.name for p in run.run_dir.iterdir()} == RUN_FILES
    assert run.output.count("adapter written to") == 1  # one process reports
    manifest = json.loads((run.run_dir / "manifest.json").read_text())
    training = manifest["training"]
    assert training["processes"] == PROCESSES and training["steps"] == STEPS
    # Data-parallel: each step consumed BATCH examples in each process, so the epoch advanced twice as fast as
    # one process with the same per-process batch would.
    assert training["epochs_completed"] == pytest.approx(round(STEPS * BATCH * PROCESSES / run.train_examples, 3))
    curve = json.loads((run.run_dir / "loss_curve.json").read_text())
    assert [point["step"] for point in curve["train"]] == list(range(1, STEPS + 1))
    assert training["final_train_loss"] == curve["train"][-1]["loss"]
    assert sorted(p.name for p in (run.run_dir / "data").iterdir()) == ["test.jsonl", "train.jsonl",
                                                                         "validation.jsonl"]


def test_the_adapter_loads_with_peft_and_changes_the_model(distributed_run, base_model_dir: Path) -> None:  # noqa: F811
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "The meeting moved to 3 pm."}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(**prompt).logits[0, -1].clone()
    tuned = PeftModel.from_pretrained(base, distributed_run.run_dir)
    with torch.no_grad():
        tuned_logits = tuned(**prompt).logits[0, -1]
        generated = tuned.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert not torch.allclose(base_logits, tuned_logits)  # the trained LoRA weights took effect
    assert generated.shape[1] > prompt["input_ids"].shape[1]


def test_the_adapter_is_served(distributed_run, quiver_server, tmp_path: Path) -> None:
    import shutil

    for name in ("adapter_config.json", "adapter_model.safetensors"):  # what the trainer's upload sends
        shutil.copy(distributed_run.run_dir / name, tmp_path / name)
    registered = quiver_server.register("dist-trained", tmp_path)
    assert registered.status_code == 201, registered.text
    reply = quiver_server.openai().chat.completions.create(
        model="dist-trained", messages=[{"role": "user", "content": "The meeting moved to 3 pm."}], max_tokens=8,
        temperature=0)
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens > 0


def test_a_fine_tuning_job_trains_on_two_processes_and_reports_once(base_model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    """The job runner's launcher with QUIVER_FINETUNING_PROCESSES=2: the worker under torchrun, one result."""
    import asyncio

    from quiver.common.jobs import EventLog, Hyperparameters, JobResult, JobSpec, write_record
    from quiver.finetuning.launcher import LocalLauncher

    data = tmp_path / "train.jsonl"
    write_jsonl(data, read_examples(REPO / "examples" / "pirate.jsonl")[:12])
    workspace = tmp_path / "job"
    workspace.mkdir()
    write_record(workspace / "spec.json", JobSpec(
        name="dist-job", training_file=data, base_model_dir=base_model_dir, base_model_name="SmolLM2-135M-Instruct",
        hyperparameters=Hyperparameters(n_epochs=1, batch_size=2), seed=3))
    launcher = LocalLauncher(processes=PROCESSES)
    assert "torch.distributed.run" in launcher.command(workspace)

    async def run() -> int:
        return await (await launcher.start(workspace)).wait()

    returncode = asyncio.run(run())
    log = (workspace / "train.log").read_text(errors="replace")
    assert returncode == 0, log[-3000:]
    result = JobResult.model_validate_json((workspace / "result.json").read_bytes())
    assert result.status == "succeeded" and (result.run_dir / "adapter_model.safetensors").is_file()
    events = EventLog(workspace).read()
    assert [event.message for event in events].count("Fine-tuning job started") == 1
    # Each step's training loss reported once, not once per process.
    trained = [event.data for event in events if event.type == "metrics" and "train_loss" in event.data]
    assert [data["step"] for data in trained] == list(range(1, trained[-1]["total_steps"] + 1))
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["training"]["processes"] == PROCESSES
