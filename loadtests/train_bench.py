"""Trainer throughput: quiver's `train()` against a plain TRL `SFTTrainer` + PEFT run, same data and LoRA.

The plain run is TRL's documented recipe with `SFTConfig`'s own defaults (TRL 1.16: `gradient_checkpointing=True`,
dynamic padding to the longest example of a random batch, no packing, no padding-free, loss on every token, the fused
LM head scoring every position on CPU) and only these set: the LoRA (rank, alpha, dropout, targets), and the
optimisation quiver uses (learning rate, batch size, warm-up, schedule, seed, steps, sequence length), so that both
final validation losses are comparable. Two defaults cannot stay on this CPU: `bf16` (TrainingArguments refuses it
without a bf16 GPU unless told `use_cpu`, and quiver trains in float32 on CPU: both sides use float32) and
`dataloader_pin_memory` (a CUDA feature; off for both). TRL gets the tokenizer with the template the engine serves
(quiver's), so both sides see the same tokens.

Measured on both sides with the same instruments:
- tokens: the SFTTrainer's own `num_tokens` (the attention mask's sum, or the flattened row's length when
  padding-free): non-padding tokens;
- time: `StepTimer`, the seconds of the optimizer steps themselves (data loading included; evaluation, checkpoint
  saving, and loading the best checkpoint excluded: quiver does these, plain TRL does not);
- validation loss: `heldout_loss`, the mean loss per assistant token of the final model on the same held-out
  validation split (quiver's `split_examples` with the same seed), outside the timer.

Each run is a fresh process; sides alternate round by round.

    python -m loadtests.train_bench compare --steps 30 --rounds 3 --out loadtests/results/$(date +%F)-trainer
    python -m loadtests.train_bench levers --steps 30 --out loadtests/results/$(date +%F)-trainer
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from loadtests.servers import DEFAULT_MODEL_DIR

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "json-extract.jsonl"
app = typer.Typer(add_completion=False)

# Each lever alone against quiver's defaults (all levers on), and all of them off: `levers` runs these.
LEVERS: dict[str, dict[str, Any]] = {
    "quiver defaults": {},
    "no padding-free (padded batches)": {"padding_free": False},
    "no length grouping": {"group_by_length": False},
    "no padding-free, no grouping": {"padding_free": False, "group_by_length": False},
    "gradient checkpointing on (TRL's default)": {"gradient_checkpointing": True},
    "no compact LM head (every position scored)": {"compact_lm_head": False},
    "all of them off": {"padding_free": False, "group_by_length": False, "compact_lm_head": False,
                        "gradient_checkpointing": True},
}


def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Seconds spent in optimizer steps: from the end of one step (or of what the trainer did after it: logging,
        evaluation, saving) to the end of the next, so evaluation and checkpoints are left out on both sides."""

        def __init__(self) -> None:
            self.seconds = 0.0
            self.steps = 0
            self._mark = 0.0

        def _reset(self, *args: Any, **kwargs: Any) -> None:
            self._mark = time.perf_counter()

        on_train_begin = on_log = on_evaluate = on_save = _reset

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            now = time.perf_counter()
            self.seconds += now - self._mark
            self.steps += 1
            self._mark = now

    return StepTimer()


def heldout_loss(model: Any, tokenizer: Any, examples: list) -> float:
    """Mean loss per assistant token (quiver's mask) of `model` on `examples`, one example at a time."""
    import torch

    from quiver.training.encoding import IGNORE_INDEX, encode_example

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            encoded = encode_example(example, tokenizer)
            input_ids = torch.tensor([encoded.input_ids])
            labels = torch.tensor([[t if m else IGNORE_INDEX for t, m in zip(encoded.input_ids, encoded.assistant_masks)]])
            # The model's own (unfused) forward: logits, then the summed loss over the shifted labels.
            logits = model(input_ids=input_ids).logits[0, :-1].float()
            targets = labels[0, 1:]
            total += torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((targets != IGNORE_INDEX).sum())
    return total / count


def _tokens(trainer: Any) -> int:
    return int(next(e["num_tokens"] for e in reversed(trainer.state.log_history) if "num_tokens" in e))


def run_quiver(data: Path, model_dir: Path, steps: int, out: Path, overrides: dict[str, Any]) -> dict:
    from rich.console import Console

    from quiver.training.config import TrainConfig
    from quiver.training.trainer import fit, save, setup, validate

    started = time.monotonic()
    timer = _step_timer()
    run = setup(data, out / "quiver-run", TrainConfig(max_steps=steps, **overrides), base_model_dir=model_dir,
                console=Console(quiet=True), callbacks=[timer])
    output = fit(run)
    save(run, output, validate(run))
    loss = heldout_loss(run.trainer.model, run.tokenizer, run.split.validation)
    return {"tokens": _tokens(run.trainer), "train_seconds": round(timer.seconds, 2), "steps": timer.steps,
            "validation_loss": round(loss, 4), "wall_seconds": round(time.monotonic() - started, 1),
            "overrides": overrides}


def run_plain_trl(data: Path, model_dir: Path, steps: int, out: Path, overrides: dict[str, Any]) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from quiver.training.config import TrainConfig
    from quiver.training.data import check_dataset, split_examples
    from quiver.training.trainer import load_tokenizer

    started = time.monotonic()
    defaults = TrainConfig()
    tokenizer = load_tokenizer(model_dir)  # the served template: the same tokens as quiver's side
    # The same training split quiver uses, so both sides see the same examples in the same amounts.
    examples = check_dataset(data, tokenizer, defaults.max_seq_len).examples
    split = split_examples(examples, defaults.seed, defaults.validation_fraction, defaults.test_fraction)
    dataset = Dataset.from_list([{"messages": example.messages} for example in split.train])
    timer = _step_timer()
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        args=SFTConfig(output_dir=str(out / "trl-run"), max_length=defaults.max_seq_len, max_steps=steps,
                       per_device_train_batch_size=defaults.batch_size, learning_rate=defaults.learning_rate,
                       warmup_steps=defaults.warmup_ratio, lr_scheduler_type="linear", seed=defaults.seed,
                       logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
                       # SFTConfig's bf16=True is refused on a CPU without `use_cpu`; both sides train in float32.
                       bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
                       dataloader_pin_memory=torch.cuda.is_available(), **overrides),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=defaults.rank, lora_alpha=defaults.alpha, lora_dropout=defaults.dropout,
                               target_modules=defaults.target_modules, task_type="CAUSAL_LM"),
        callbacks=[timer],
    )
    trainer.train()
    loss = heldout_loss(trainer.model, tokenizer, split.validation)
    return {"tokens": _tokens(trainer), "train_seconds": round(timer.seconds, 2), "steps": timer.steps,
            "validation_loss": round(loss, 4), "wall_seconds": round(time.monotonic() - started, 1),
            "overrides": overrides}


RUNNERS = {"quiver": run_quiver, "trl": run_plain_trl}


def in_fresh_process(side: str, data: Path, model_dir: Path, steps: int, overrides: dict[str, Any]) -> dict:
    with tempfile.TemporaryDirectory(prefix="train-bench-") as out:
        result = subprocess.run(
            [sys.executable, "-m", "loadtests.train_bench", "one", side, str(data), str(model_dir), str(steps), out,
             "--overrides", json.dumps(overrides)],
            capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{side} run failed:\n{result.stderr[-4000:]}")
        run = json.loads(result.stdout.strip().splitlines()[-1])
    run["tokens_per_second"] = round(run["tokens"] / run["train_seconds"], 2)
    run["loadavg_1_5_15_after"] = [round(x, 2) for x in os.getloadavg()]
    return run


def _machine() -> dict:
    return {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
            "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()], "nice": os.nice(0),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


@app.command()
def one(side: str, data: Path, model_dir: Path, steps: int, out: Path,
        overrides: Annotated[str, typer.Option(help="JSON: TrainConfig fields (quiver) or SFTConfig ones (trl)")] = "{}",
        ) -> None:
    """(internal) One run of one side, in this process; prints its figures as one JSON line."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(json.dumps(RUNNERS[side](data, model_dir, steps, out, json.loads(overrides))))


def _print_run(label: str, run: dict) -> None:
    print(f"{label:45s} {run['tokens_per_second']:8.2f} tok/s  steps {run['train_seconds']:7.1f} s  "
          f"wall {run['wall_seconds']:7.1f} s  tokens {run['tokens']}  val loss {run['validation_loss']}  "
          f"load {run['loadavg_1_5_15_after']}", flush=True)


def _write(out: Optional[Path], name: str, figures: dict, table: str) -> None:
    print(table)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(figures, indent=2) + "\n")
        (out / f"{name}.md").write_text(table + "\n")


@app.command()
def compare(
    data: Annotated[Path, typer.Option(help="chat-format JSONL")] = EXAMPLES,
    model_dir: Annotated[Path, typer.Option(help="HF model folder")] = DEFAULT_MODEL_DIR,
    steps: Annotated[int, typer.Option(help="optimizer steps per run")] = 30,
    rounds: Annotated[int, typer.Option(help="alternating quiver/TRL pairs")] = 3,
    out: Annotated[Optional[Path], typer.Option(help="folder for train-bench.json / .md")] = None,
) -> None:
    """Train both sides alternately (each run a fresh process); tokens/s, the quiver/TRL ratio, validation losses."""
    before = _machine()
    runs: dict[str, list[dict]] = {"quiver": [], "trl": []}
    for round_number in range(rounds):
        order = ("trl", "quiver") if round_number % 2 == 0 else ("quiver", "trl")
        for side in order:
            run = in_fresh_process(side, data, model_dir, steps, {})
            runs[side].append(run)
            _print_run(f"round {round_number + 1} {side}", run)
            if out:  # every run kept as it ends: a long benchmark on a shared machine may be stopped
                out.mkdir(parents=True, exist_ok=True)
                (out / "train-bench-runs.json").write_text(json.dumps({"machine_before": before, "runs": runs}, indent=2))
    after = _machine()
    median = {side: statistics.median(r["tokens_per_second"] for r in side_runs) for side, side_runs in runs.items()}
    loss = {side: statistics.median(r["validation_loss"] for r in side_runs) for side, side_runs in runs.items()}
    ratio = round(median["quiver"] / median["trl"], 3)
    per_round = [round(q["tokens_per_second"] / t["tokens_per_second"], 3) for q, t in zip(runs["quiver"], runs["trl"])]
    figures = {"data": str(data), "steps": steps, "rounds": rounds, "machine_before": before, "machine_after": after,
               "runs": runs, "median_tokens_per_second": median, "median_validation_loss": loss, "ratio": ratio,
               "ratio_per_round": per_round}
    lines = [
        f"quiver vs plain TRL, {data.name}, {steps} steps per run, {rounds} alternating rounds, each run a fresh process.",
        f"Load average (1/5/15 min) before {before['loadavg_1_5_15']}, after {after['loadavg_1_5_15']}; "
        f"{before['cpus']} CPUs, nice {before['nice']}.",
        "",
        "| side | tokens/s (median) | per round | final validation loss (median) |",
        "|---|---|---|---|",
        *(f"| {side} | {median[side]:.2f} | {', '.join(str(r['tokens_per_second']) for r in runs[side])} | {loss[side]:.4f} |"
          for side in ("quiver", "trl")),
        "",
        f"Ratio of medians quiver / TRL: **{ratio}x** (per round: {', '.join(map(str, per_round))}).",
    ]
    _write(out, "train-bench", figures, "\n".join(lines))


@app.command()
def levers(
    data: Annotated[Path, typer.Option(help="chat-format JSONL")] = EXAMPLES,
    model_dir: Annotated[Path, typer.Option(help="HF model folder")] = DEFAULT_MODEL_DIR,
    steps: Annotated[int, typer.Option(help="optimizer steps per run")] = 30,
    rounds: Annotated[int, typer.Option(help="passes over the levers, order reversed every other pass")] = 1,
    only: Annotated[Optional[list[str]], typer.Option(help="lever names to run (default: all)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="folder for levers.json / .md")] = None,
) -> None:
    """quiver with each lever turned off (or TRL's gradient checkpointing on) against plain TRL."""
    chosen = {name: o for name, o in LEVERS.items() if not only or name in only}
    before = _machine()
    runs: dict[str, list[dict]] = {name: [] for name in [*chosen, "plain TRL"]}
    configs = [*((name, "quiver", o) for name, o in chosen.items()), ("plain TRL", "trl", {})]
    for round_number in range(rounds):
        for name, side, overrides in configs if round_number % 2 == 0 else configs[::-1]:
            run = in_fresh_process(side, data, model_dir, steps, overrides)
            runs[name].append(run)
            _print_run(name, run)
            if out:
                out.mkdir(parents=True, exist_ok=True)
                (out / "levers-runs.json").write_text(json.dumps({"machine_before": before, "runs": runs}, indent=2))
    after = _machine()
    median = {name: statistics.median(r["tokens_per_second"] for r in rs) for name, rs in runs.items()}
    loss = {name: statistics.median(r["validation_loss"] for r in rs) for name, rs in runs.items()}
    figures = {"data": str(data), "steps": steps, "rounds": rounds, "machine_before": before, "machine_after": after,
               "levers": chosen, "runs": runs, "median_tokens_per_second": median, "median_validation_loss": loss}
    lines = [
        f"Levers, {data.name}, {steps} steps per run, {rounds} pass(es), each run a fresh process.",
        f"Load average (1/5/15 min) before {before['loadavg_1_5_15']}, after {after['loadavg_1_5_15']}.",
        "",
        "| configuration | tokens/s | / plain TRL | final validation loss |",
        "|---|---|---|---|",
        *(f"| {name} | {median[name]:.2f} | {median[name] / median['plain TRL']:.2f}x | {loss[name]:.4f} |"
          for name in runs),
    ]
    _write(out, "levers", figures, "\n".join(lines))


if __name__ == "__main__":
    app()
