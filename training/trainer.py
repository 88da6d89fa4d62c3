"""LoRA fine-tuning of the served base model with TRL's SFTTrainer, loss on assistant tokens only."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import PrinterCallback, TrainerCallback

from quiver.common.base_model import served_base_model
from quiver.common.files import file_sha256
from quiver.training.config import TrainConfig
from quiver.training.curve import curve_from_log_history, curve_warnings, save_curve
from quiver.training.data import (
    DatasetReport,
    Split,
    check_dataset,
    require_valid,
    split_examples,
    write_jsonl,
)
from quiver.training.encoding import MaskStats, check_loss_mask, encode_examples, end_of_turn_ids
from quiver.training.manifest import base_model_digest, package_versions, text_sha256, write_manifest

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SPLIT_DIR = "data"


@dataclass
class TrainResult:
    run_dir: Path
    manifest: dict[str, Any]
    warnings: list[str]


def default_base_model() -> tuple[Path, str]:
    """The base model the server serves: its HF folder (converted on first use) and its served name."""
    return served_base_model()


def is_main_process() -> bool:
    """True except in the other processes of a data-parallel run (`torchrun`/`accelerate launch` set RANK): one
    process writes the run folder."""
    return os.environ.get("RANK", "0") == "0"


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not tokenizer.chat_template:
        raise ValueError(f"{model_dir} has no chat template; quiver trains on chat-formatted data")
    return tokenizer


class RichProgress(TrainerCallback):
    """A rich progress bar with the running loss, replacing the trainer's tqdm output."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress: Progress | None = None
        self.task: Any = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.progress = Progress(
            TextColumn("[bold]training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, loss="-")

    def on_step_end(self, args, state, control, **kwargs):
        self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is not None and logs and "loss" in logs:
            self.progress.update(self.task, loss=f"{logs['loss']:.4f}")

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics:
            self.console.print(f"epoch {state.epoch or 0:.2f}  step {state.global_step}  validation loss {metrics['eval_loss']:.4f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()


def _checked(path: Path, tokenizer: PreTrainedTokenizerBase, config: TrainConfig, console: Console) -> DatasetReport:
    report = check_dataset(path, tokenizer, config.max_seq_len)
    require_valid(report)
    for warning in report.warnings:
        console.print(f"[yellow]{warning}")
    return report


def prepare_split(
    train_file: Path,
    validation_file: Path | None,
    tokenizer: PreTrainedTokenizerBase,
    config: TrainConfig,
    console: Console,
) -> Split:
    examples = _checked(train_file, tokenizer, config, console).examples
    if validation_file is None:
        return split_examples(examples, config.seed, config.validation_fraction, config.test_fraction)
    validation = _checked(validation_file, tokenizer, config, console).examples
    split = split_examples(examples, config.seed, validation_fraction=0.0, test_fraction=config.test_fraction)
    return Split(split.train, validation, split.test)


@dataclass
class Run:
    """One training run, set up: what `fit`, `validate` and `save` work on."""

    run_dir: Path
    name: str
    config: TrainConfig
    console: Console
    train_file: Path
    validation_file: Path | None
    base_model_dir: Path
    base_model_name: str
    tokenizer: PreTrainedTokenizerBase
    split: Split
    epochs: int
    use_bf16: bool
    trainer: Any  # trl.SFTTrainer (imported lazily: torch is heavy)
    mask: MaskStats
    initial_validation_loss: float | None = None
    train_seconds: float = 0.0

    @property
    def has_validation(self) -> bool:
        return bool(self.split.validation)

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"


def train(
    train_file: Path,
    out_dir: Path,
    config: TrainConfig | None = None,
    *,
    name: str | None = None,
    validation_file: Path | None = None,
    base_model_dir: Path | None = None,
    base_model_name: str | None = None,
    console: Console | None = None,
    callbacks: list[TrainerCallback] | None = None,
) -> TrainResult:
    """Validate and split the data, train a LoRA adapter, and write the run folder (adapter, manifest, curve)."""
    run = setup(train_file, out_dir, config, name=name, validation_file=validation_file,
                base_model_dir=base_model_dir, base_model_name=base_model_name, console=console, callbacks=callbacks)
    output = fit(run)
    final_validation_loss = validate(run)
    return save(run, output, final_validation_loss)


def setup(
    train_file: Path,
    out_dir: Path,
    config: TrainConfig | None = None,
    *,
    name: str | None = None,
    validation_file: Path | None = None,
    base_model_dir: Path | None = None,
    base_model_name: str | None = None,
    console: Console | None = None,
    callbacks: list[TrainerCallback] | None = None,
) -> Run:
    """Check and split the data (the splits are written), load the base model, build the trainer, check the loss mask."""
    import torch
    from transformers import AutoModelForCausalLM, EarlyStoppingCallback
    from trl import SFTTrainer

    config = config or TrainConfig()
    console = (console or Console()) if is_main_process() else Console(quiet=True)
    if base_model_dir is None:
        base_model_dir, default_name = default_base_model()
        base_model_name = base_model_name or default_name
    base_model_name = base_model_name or Path(base_model_dir).name
    run_dir = Path(out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    tokenizer = load_tokenizer(base_model_dir)
    split = prepare_split(Path(train_file), validation_file and Path(validation_file), tokenizer, config, console)
    if is_main_process():  # every process splits alike (seeded); one writes
        for part in ("train", "validation", "test"):
            write_jsonl(run_dir / SPLIT_DIR / f"{part}.jsonl", getattr(split, part))
    epochs = config.resolved_epochs(len(split.train))
    console.print(
        f"{len(split.train)} train / {len(split.validation)} validation / {len(split.test)} test examples, "
        f"{epochs} epoch(s)"
    )

    use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.bfloat16 if use_bf16 else torch.float32)
    has_validation = bool(split.validation)
    callbacks = [RichProgress(console), *(callbacks or [])]
    if has_validation:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
    trainer = SFTTrainer(
        model=model,
        args=_sft_args(config, run_dir / "checkpoints", epochs, has_validation, use_bf16),
        train_dataset=encode_examples(split.train, tokenizer),
        eval_dataset=encode_examples(split.validation, tokenizer) if has_validation else None,
        processing_class=tokenizer,
        peft_config=_lora_config(config),
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # RichProgress reports instead of raw log dicts
    mask = check_loss_mask(
        trainer.train_dataset["labels"], end_of_turn_ids(tokenizer), decode=lambda t: tokenizer.decode([t])
    )
    if mask.examples_ending_turn < mask.examples:
        console.print(
            f"[yellow]{mask.examples - mask.examples_ending_turn} of {mask.examples} training examples lose their "
            "end-of-turn token to max_seq_len"
        )
    return Run(
        run_dir=run_dir, name=name or run_dir.name, config=config, console=console, train_file=Path(train_file),
        validation_file=Path(validation_file) if validation_file else None, base_model_dir=Path(base_model_dir),
        base_model_name=base_model_name, tokenizer=tokenizer, split=split, epochs=epochs, use_bf16=use_bf16,
        trainer=trainer, mask=mask,
    )


def _sft_args(config: TrainConfig, checkpoints: Path, epochs: int, has_validation: bool, use_bf16: bool):
    import torch
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(checkpoints),
        max_length=config.max_seq_len,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        num_train_epochs=epochs,
        max_steps=config.max_steps or -1,
        warmup_steps=config.warmup_ratio,
        lr_scheduler_type="linear",
        seed=config.seed,
        data_seed=config.seed,
        bf16=use_bf16,
        logging_steps=1,
        eval_strategy="epoch" if has_validation else "no",
        save_strategy="epoch" if has_validation else "no",
        save_total_limit=1,
        load_best_model_at_end=has_validation,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        gradient_checkpointing=config.gradient_checkpointing,
        report_to=[],
        disable_tqdm=True,
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning is a CUDA feature; on CPU it only warns
        # Without an accelerator, Accelerate treats the processes of `torchrun` as data-parallel (gloo) only
        # when told it runs on CPU; otherwise each process would train alone on all the data.
        use_cpu=not torch.accelerator.is_available(),
    )


def _lora_config(config: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules,
        task_type="CAUSAL_LM",
    )


def fit(run: Run) -> Any:
    """Train; the validation loss before the first step is measured first, as the curve's starting point."""
    if run.has_validation:
        run.initial_validation_loss = run.trainer.evaluate()["eval_loss"]
    started = time.monotonic()
    output = run.trainer.train()
    run.train_seconds = time.monotonic() - started
    return output


def validate(run: Run) -> float | None:
    """The final validation loss. With load_best_model_at_end the adapter kept is the best checkpoint, and
    best_metric is its validation loss."""
    if not run.has_validation:
        return None
    return run.trainer.state.best_metric or run.trainer.evaluate()["eval_loss"]


def save(run: Run, output: Any, final_validation_loss: float | None) -> TrainResult:
    """Write the adapter, the loss curve (with its warnings) and the manifest; drop the checkpoints."""
    trainer, console = run.trainer, run.console
    # Data-parallel: every process has the same weights and log history; one writes, once all are done
    # (each loads the best checkpoint at the end of training before it may go).
    trainer.accelerator.wait_for_everyone()
    main = trainer.is_world_process_zero()
    if main:
        trainer.model.save_pretrained(run.run_dir, safe_serialization=True)
        shutil.rmtree(run.checkpoints, ignore_errors=True)
    curve = curve_from_log_history(trainer.state.log_history)
    if run.initial_validation_loss is not None:  # train() starts a fresh log history, without the step-0 evaluation
        curve["validation"].insert(0, {"step": 0, "epoch": 0.0, "loss": run.initial_validation_loss})
    warnings = curve_warnings(curve)
    manifest = _manifest(run, output, curve, warnings, final_validation_loss)
    if main:
        save_curve(run.run_dir, curve, warnings)
        for warning in warnings:
            console.print(f"[yellow]warning: {warning}")
        write_manifest(run.run_dir, manifest)
    trainer.accelerator.wait_for_everyone()  # no process reports the run before its files are written
    return TrainResult(run.run_dir, manifest, warnings)


def _manifest(run: Run, output: Any, curve: dict[str, Any], warnings: list[str],
              final_validation_loss: float | None) -> dict[str, Any]:
    import torch

    trainer, split, config = run.trainer, run.split, run.config
    train_losses = [p["loss"] for p in curve["train"]]
    tokens_seen = next((e["num_tokens"] for e in reversed(trainer.state.log_history) if "num_tokens" in e), None)
    train_seconds = run.train_seconds
    return {
        "name": run.name,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_model": {
            "name": run.base_model_name,
            "path": str(run.base_model_dir.resolve()),
            "digest": base_model_digest(run.base_model_dir),
        },
        "chat_template_sha256": text_sha256(run.tokenizer.chat_template),
        "dataset": {
            "train_file": str(run.train_file),
            "train_file_sha256": file_sha256(run.train_file),
            "validation_file": str(run.validation_file) if run.validation_file else None,
            "validation_file_sha256": file_sha256(run.validation_file) if run.validation_file else None,
            "split_seed": config.seed,
            "counts": {"train": len(split.train), "validation": len(split.validation), "test": len(split.test)},
            "test_split": f"{SPLIT_DIR}/test.jsonl",
        },
        "hyperparameters": {**config.model_dump(), "resolved_epochs": run.epochs},
        "training": {
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "dtype": "bfloat16" if run.use_bf16 else "float32",
            "processes": trainer.args.world_size,  # data-parallel processes; batch_size is per process
            "steps": output.global_step,
            "epochs_completed": round(trainer.state.epoch or 0.0, 3),
            "stopped_early": output.global_step < trainer.state.max_steps,
            "train_seconds": round(train_seconds, 1),
            "tokens_seen": tokens_seen,
            "tokens_per_second": round(tokens_seen / train_seconds, 1) if tokens_seen else None,
            "trained_tokens_per_epoch": run.mask.trained_tokens,
            "first_train_loss": train_losses[0] if train_losses else None,
            "final_train_loss": train_losses[-1] if train_losses else None,
            "initial_validation_loss": run.initial_validation_loss,
            "final_validation_loss": final_validation_loss,
            "warnings": warnings,
        },
        "eval": None,
        "registered": None,
        "versions": package_versions(),
    }
