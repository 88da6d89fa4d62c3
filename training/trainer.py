"""LoRA fine-tuning of the served base model with TRL: SFTTrainer (loss on assistant tokens only) or, for
`method="dpo"`, DPOTrainer on preference pairs; from a fresh LoRA or continuing an existing adapter."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import PrinterCallback, TrainerCallback

from quiver.common.base_model import chat_template_file, served_base_model
from quiver.common.files import file_sha256
from quiver.training.config import TrainConfig
from quiver.training.curve import curve_from_log_history, curve_warnings, save_curve
from quiver.training.data import (
    DatasetReport,
    Split,
    check_dataset,
    check_preference_dataset,
    require_valid,
    split_examples,
    write_jsonl,
)
from quiver.training.encoding import MaskStats, check_loss_mask, encode_examples, end_of_turn_ids
from quiver.training.manifest import (
    ADAPTER_FILES,
    MANIFEST_FILE,
    base_model_digest,
    package_versions,
    text_sha256,
    write_manifest,
)
from quiver.training.preference import chosen_label_rows, preference_dataset, reward_curve, save_preference_curve

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SPLIT_DIR = "data"


class InitAdapterError(ValueError):
    """The adapter to continue from is missing, not LoRA, or made for another base model."""


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
    template = chat_template_file(model_dir)
    if template is not None:  # the engine serves with the same file (`--chat-template`)
        tokenizer.chat_template = template.read_text(encoding="utf-8")
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
    check = check_preference_dataset if config.method == "dpo" else check_dataset
    report = check(path, tokenizer, config.max_seq_len)
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
    trainer: Any  # trl.SFTTrainer or trl.DPOTrainer (imported lazily: torch is heavy)
    mask: MaskStats
    initial_validation_loss: float | None = None
    train_seconds: float = 0.0

    @property
    def has_validation(self) -> bool:
        return bool(self.split.validation)

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"


def train(train_file: Path, out_dir: Path, config: TrainConfig | None = None, **options: Any) -> TrainResult:
    """Validate and split the data, train a LoRA adapter, and write the run folder (adapter, manifest, curve).
    `options` are `setup`'s keywords (name, validation_file, base model, console, callbacks)."""
    run = setup(train_file, out_dir, config, **options)
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
    """Check and split the data (the splits are written), load the base model (and the adapter to continue from),
    build the trainer for the method, check the loss mask."""
    import torch
    from transformers import AutoModelForCausalLM, EarlyStoppingCallback
    from trl import DPOTrainer, SFTTrainer

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

    score_only_trained_positions(config.compact_lm_head)
    use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.bfloat16 if use_bf16 else torch.float32)
    # A fresh LoRA is made by the trainer from `peft_config`; a continued one is loaded trainable here, and then
    # DPOTrainer keeps a frozen copy of it as the reference model (the base model is the reference otherwise).
    peft_config = _lora_config(config)
    if config.init_adapter is not None:
        model, peft_config = load_init_adapter(model, config.init_adapter, Path(base_model_dir)), None
        console.print(f"continuing from the adapter in {config.init_adapter}")
    has_validation = bool(split.validation)
    callbacks = [RichProgress(console), *(callbacks or [])]
    if has_validation:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
    args = _training_args(config, run_dir / "checkpoints", epochs, has_validation, use_bf16)
    # The two methods differ only in their trainer class and how examples become its dataset.
    dpo = config.method == "dpo"
    dataset = preference_dataset if dpo else partial(encode_examples, max_len=config.max_seq_len)
    trainer = (DPOTrainer if dpo else SFTTrainer)(
        model=model,
        args=args,
        train_dataset=dataset(split.train, tokenizer),
        eval_dataset=dataset(split.validation, tokenizer) if has_validation else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    labels = chosen_label_rows(trainer.train_dataset, config.max_seq_len) if dpo else trainer.train_dataset["labels"]
    trainer.remove_callback(PrinterCallback)  # RichProgress reports instead of raw log dicts
    mask = check_loss_mask(labels, end_of_turn_ids(tokenizer), decode=lambda t: tokenizer.decode([t]))
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


def _training_args(config: TrainConfig, checkpoints: Path, epochs: int, has_validation: bool, use_bf16: bool):
    """SFTConfig or DPOConfig: the same schedule, checkpoints and logging for both methods."""
    import torch
    from trl import DPOConfig, SFTConfig

    method_args = {"beta": config.beta} if config.method == "dpo" else _sft_data_args(config)
    return (DPOConfig if config.method == "dpo" else SFTConfig)(
        **{"max_length": config.max_seq_len, **method_args},
        output_dir=str(checkpoints),
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
        # 2, not 1: at the end of `train()` HF deletes every checkpoint but the best when the limit is 1, and a
        # pause ends `train()` with its resumable checkpoint (the latest, rarely the best). With 2 HF keeps the
        # latest and the best; `save` drops them all once the run is done.
        save_total_limit=2,
        load_best_model_at_end=has_validation,
        restore_callback_states_from_checkpoint=True,  # a resumed run keeps early stopping's count
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


def _sft_data_args(config: TrainConfig) -> dict[str, Any]:
    """How SFT batches are built (loadtests/train_bench.py measures each). Padding-free lays a batch's examples end to
    end in one row; the attention keeps them apart through their position ids (transformers builds a block-diagonal
    mask from them for sdpa/eager, flash-attention uses the collator's cu_seq_lens). SFTTrainer then refuses to
    truncate, so `encode_examples` does (max_length=None)."""
    args: dict[str, Any] = {"train_sampling_strategy": "group_by_length" if config.group_by_length else "random"}
    if config.padding_free:
        args.update(padding_free=True, max_length=None)
    return args


_COMPACT_ON_CPU = {"on": False}


def score_only_trained_positions(on: bool) -> None:
    """TRL's fused LM head (`add_fused_lm_head`, trl/trainer/utils.py) projects only the positions whose label is not
    -100 on Triton devices, and every position elsewhere, so that compiling backends (Neuron) see fixed tile shapes.
    Eager CPU compiles nothing, and with the loss on assistant tokens only (about a third of the tokens here) the rest
    of the vocabulary-wide projection and its backward is waste. TRL decides with its module's `_use_triton`, consulted
    for nothing else there (pinned TRL; tests/test_training_encoding_padding_free.py checks the hook and the loss)."""
    import trl.trainer.utils as fused

    _COMPACT_ON_CPU["on"] = on
    if getattr(fused._use_triton, "quiver_compact_on_cpu", False):
        return
    triton_device = fused._use_triton

    def compact(device: Any) -> bool:
        return triton_device(device) or (device.type == "cpu" and _COMPACT_ON_CPU["on"])

    compact.quiver_compact_on_cpu = True
    fused._use_triton = compact


def _lora_config(config: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules,
        task_type="CAUSAL_LM",
    )


def load_init_adapter(model: Any, adapter_dir: Path, base_model_dir: Path) -> Any:
    """`model` with the LoRA adapter in `adapter_dir` loaded trainable, after checking it was made for this base:
    the base digest its manifest records (quiver runs), else every LoRA tensor's shape against the module it adapts."""
    from peft import PeftModel
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    missing = [name for name in ADAPTER_FILES if not (adapter_dir / name).is_file()]
    if missing:
        raise InitAdapterError(f"{adapter_dir} is not a LoRA adapter folder: {', '.join(missing)} missing")
    try:
        adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise InitAdapterError(f"{adapter_dir}/adapter_config.json is not readable JSON: {exc}") from exc
    if not isinstance(adapter_config, dict) or adapter_config.get("peft_type") != "LORA":
        raise InitAdapterError(f"{adapter_dir} holds a {adapter_config.get('peft_type') if isinstance(adapter_config, dict) else None!r} "
                               "adapter; only LoRA adapters can be continued")
    if (adapter_dir / MANIFEST_FILE).is_file():
        recorded = (json.loads((adapter_dir / MANIFEST_FILE).read_text()).get("base_model") or {}).get("digest")
        if recorded and recorded != base_model_digest(base_model_dir):
            raise InitAdapterError(f"{adapter_dir} was trained on another base model ({recorded}), not {base_model_dir}")
    with safe_open(adapter_dir / "adapter_model.safetensors", framework="pt") as tensors:
        for key in tensors.keys():
            kind = next((k for k in ("lora_A", "lora_B") if key.endswith(f".{k}.weight")), None)
            if kind is None:
                continue
            path = key.removeprefix("base_model.model.").removesuffix(f".{kind}.weight")
            try:
                module = model.get_submodule(path)
            except AttributeError:
                raise InitAdapterError(f"{adapter_dir} adapts {path}, which the base model does not have") from None
            shape = tuple(tensors.get_slice(key).get_shape())
            fits = (shape[1] == getattr(module, "in_features", None) if kind == "lora_A"
                    else shape[0] == getattr(module, "out_features", None))
            if len(shape) != 2 or not fits:
                raise InitAdapterError(f"{adapter_dir}: {key} has shape {list(shape)}, which does not fit the base "
                                       f"model's {path}: it was made for another base model")
    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)


def fit(run: Run, resume_from: Path | None = None) -> Any:
    """Train; the validation loss before the first step is measured first, as the curve's starting point.
    `resume_from`: one of HF Trainer's checkpoints of this run (adapter, optimizer, scheduler, RNG, step, early
    stopping's count) to continue an interrupted run from; the run's starting loss and training time so far are
    then the caller's to restore (`run.initial_validation_loss`, `run.train_seconds`)."""
    if run.has_validation and resume_from is None:
        run.initial_validation_loss = run.trainer.evaluate()["eval_loss"]
    started = time.monotonic()
    output = run.trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    run.train_seconds += time.monotonic() - started
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
        # Only the trained adapter: continued DPO also holds its frozen reference copy ("ref"), which is not saved.
        trainer.model.save_pretrained(run.run_dir, safe_serialization=True, selected_adapters=["default"])
        shutil.rmtree(run.checkpoints, ignore_errors=True)
    curve = curve_from_log_history(trainer.state.log_history)
    if run.initial_validation_loss is not None:  # train() starts a fresh log history, without the step-0 evaluation
        curve["validation"].insert(0, {"step": 0, "epoch": 0.0, "loss": run.initial_validation_loss})
    warnings = curve_warnings(curve)
    if run.config.method == "dpo":
        curve.update(reward_curve(trainer.state.log_history))
    manifest = _manifest(run, output, curve, warnings, final_validation_loss)
    if main:
        (save_preference_curve if run.config.method == "dpo" else save_curve)(run.run_dir, curve, warnings)
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
        "hyperparameters": {**config.model_dump(mode="json"), "resolved_epochs": run.epochs},
        "init_adapter": _init_adapter_record(config.init_adapter),
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
            **_final_rewards(curve),
            "warnings": warnings,
        },
        "eval": None,
        "registered": None,
        "versions": package_versions(),
    }


def _init_adapter_record(adapter_dir: Path | None) -> dict[str, Any] | None:
    """Where a continued adapter started: its folder, weights digest and LoRA shape (which the result keeps)."""
    if adapter_dir is None:
        return None
    adapter_config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return {
        "path": str(Path(adapter_dir).resolve()),
        "adapter_sha256": file_sha256(Path(adapter_dir) / "adapter_model.safetensors"),
        "rank": adapter_config.get("r"),
        "alpha": adapter_config.get("lora_alpha"),
        "target_modules": adapter_config.get("target_modules"),
    }


def _final_rewards(curve: dict[str, Any]) -> dict[str, Any]:
    """DPO only: the last logged reward margin and accuracy, on the training batches and on the validation split."""
    record: dict[str, Any] = {}
    for part in ("train_rewards", "validation_rewards"):
        if curve.get(part):
            last = curve[part][-1]
            record[f"final_{part.removesuffix('_rewards')}_reward_margin"] = last.get("margin")
            record[f"final_{part.removesuffix('_rewards')}_reward_accuracy"] = last.get("accuracy")
    return record
