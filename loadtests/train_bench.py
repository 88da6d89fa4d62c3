"""Trainer throughput: quiver's `train()` against a plain TRL `SFTTrainer` + PEFT run, same data and settings.

The plain run is what the TRL docs show: a `messages` dataset handed to `SFTTrainer` with a `LoraConfig`
(loss on every token, no validation, no checks). quiver's run adds the data checks, the split, the
assistant-only mask, the step-0 validation pass and the run folder. Both train the same LoRA (rank,
alpha, targets, learning rate, batch size, sequence length, seed) on the same training split for the
same number of optimizer steps, each in a fresh process so neither inherits the other's warm caches,
alternating for `--rounds`. Throughput is training tokens seen per second of `trainer.train()`; the
wall time of the whole call (model load, checks, writing the run) is reported too.

    python -m loadtests.train_bench --steps 30 --rounds 2 --json loadtests/results/train-bench.json
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from loadtests.servers import DEFAULT_MODEL_DIR

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "json-extract.jsonl"
app = typer.Typer(add_completion=False)


def run_quiver(data: Path, model_dir: Path, steps: int, out: Path) -> dict:
    from rich.console import Console

    from quiver.training.config import TrainConfig
    from quiver.training.trainer import train

    started = time.monotonic()
    result = train(data, out / "quiver-run", TrainConfig(max_steps=steps), base_model_dir=model_dir,
                   console=Console(quiet=True))
    training = result.manifest["training"]
    return {"tokens": training["tokens_seen"], "train_seconds": training["train_seconds"],
            "wall_seconds": round(time.monotonic() - started, 1), "steps": training["steps"]}


def run_plain_trl(data: Path, model_dir: Path, steps: int, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from quiver.training.config import TrainConfig
    from quiver.training.data import check_dataset, split_examples

    started = time.monotonic()
    defaults = TrainConfig()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # The same training split quiver uses, so both sides see the same examples in the same amounts.
    examples = check_dataset(data, tokenizer, defaults.max_seq_len).examples
    split = split_examples(examples, defaults.seed, defaults.validation_fraction, defaults.test_fraction)
    dataset = Dataset.from_list([{"messages": example.messages} for example in split.train])
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        args=SFTConfig(output_dir=str(out / "trl-run"), max_length=defaults.max_seq_len, max_steps=steps,
                       per_device_train_batch_size=defaults.batch_size, learning_rate=defaults.learning_rate,
                       warmup_steps=defaults.warmup_ratio, lr_scheduler_type="linear", seed=defaults.seed,
                       logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
                       # TRL's SFTConfig defaults to bf16, which a CPU refuses; quiver also picks bf16 only on GPUs.
                       bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
                       dataloader_pin_memory=torch.cuda.is_available()),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=defaults.rank, lora_alpha=defaults.alpha, lora_dropout=defaults.dropout,
                               target_modules=defaults.target_modules, task_type="CAUSAL_LM"),
    )
    train_started = time.monotonic()
    trainer.train()
    train_seconds = time.monotonic() - train_started
    tokens = next(e["num_tokens"] for e in reversed(trainer.state.log_history) if "num_tokens" in e)
    return {"tokens": tokens, "train_seconds": round(train_seconds, 1),
            "wall_seconds": round(time.monotonic() - started, 1), "steps": trainer.state.global_step}


RUNNERS = {"quiver": run_quiver, "trl": run_plain_trl}


def in_fresh_process(side: str, data: Path, model_dir: Path, steps: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="train-bench-") as out:
        result = subprocess.run(
            [sys.executable, "-m", "loadtests.train_bench", "one", side, str(data), str(model_dir), str(steps), out],
            capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{side} run failed:\n{result.stderr[-4000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])


@app.command()
def one(side: str, data: Path, model_dir: Path, steps: int, out: Path) -> None:
    """(internal) One run of one side, in this process; prints its figures as one JSON line."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(json.dumps(RUNNERS[side](data, model_dir, steps, out)))


@app.command()
def compare(
    data: Annotated[Path, typer.Option(help="chat-format JSONL")] = EXAMPLES,
    model_dir: Annotated[Path, typer.Option(help="HF model folder")] = DEFAULT_MODEL_DIR,
    steps: Annotated[int, typer.Option(help="optimizer steps per run")] = 30,
    rounds: Annotated[int, typer.Option(help="alternating quiver/TRL pairs")] = 2,
    json_out: Annotated[Optional[Path], typer.Option("--json")] = None,
) -> None:
    """Train both sides alternately and print tokens/s and the quiver/TRL ratio."""
    runs: dict[str, list[dict]] = {"quiver": [], "trl": []}
    for round_number in range(rounds):
        order = ("quiver", "trl") if round_number % 2 == 0 else ("trl", "quiver")
        for side in order:
            run = in_fresh_process(side, data, model_dir, steps)
            run["tokens_per_second"] = round(run["tokens"] / run["train_seconds"], 1)
            runs[side].append(run)
            print(f"round {round_number + 1} {side:6s} {run['tokens_per_second']:8.1f} tok/s  "
                  f"train {run['train_seconds']:6.1f} s  wall {run['wall_seconds']:6.1f} s  tokens {run['tokens']}")
    median = {side: statistics.median(r["tokens_per_second"] for r in side_runs) for side, side_runs in runs.items()}
    ratio = round(median["quiver"] / median["trl"], 3)
    print(f"median tokens/s: quiver {median['quiver']:.1f}, plain TRL {median['trl']:.1f}; ratio {ratio}x")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"data": str(data), "steps": steps, "rounds": rounds, "runs": runs,
                                        "median_tokens_per_second": median, "ratio": ratio,
                                        "threads": os.environ.get("OMP_NUM_THREADS")}, indent=2) + "\n")


if __name__ == "__main__":
    app()
