"""Training hyperparameters: typed, with defaults, `auto` where the data decides, loadable from YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from quiver.common.jobs import Hyperparameters
from quiver.training.data import auto_epochs

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # LoRA
    rank: int = Field(8, ge=1, le=256)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))

    # Optimisation; defaults measured on SmolLM2-135M with a few hundred short examples.
    learning_rate: float = Field(1e-3, gt=0)
    batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_seq_len: int = Field(1024, ge=8)
    epochs: int | Literal["auto"] = "auto"
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (quick runs)")
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    seed: int = 42
    # Trades compute for memory: worth it for large models on GPUs, a pure slowdown for small models on CPU.
    gradient_checkpointing: bool = False
    # Data path (supervised only), measured in loadtests/train_bench.py: each batch's examples laid end to end in
    # one row, kept apart by their position ids (no padding computed), and batches drawn from examples of similar
    # lengths (HF's `group_by_length`: less padding when not padding-free, fewer wasted positions either way).
    padding_free: bool = True
    group_by_length: bool = True
    # Project through the 49k-wide LM head, forward and backward, only the positions that carry loss (the assistant
    # tokens), on CPU as TRL already does on GPUs.
    compact_lm_head: bool = True

    # Method: supervised fine-tuning (SFTTrainer) or preference tuning (TRL's DPOTrainer, OpenAI's `dpo` method).
    method: Literal["supervised", "dpo"] = "supervised"
    # DPO's KL penalty weight: higher keeps the adapter closer to its reference. OpenAI bounds it to (0, 2].
    beta: float = Field(0.1, gt=0, le=2)
    # Continue from an existing LoRA adapter folder (its weights, rank and targets) instead of a fresh LoRA.
    # With `dpo` the adapter as loaded is also the reference model.
    init_adapter: Path | None = None

    # Data split and early stopping on validation loss (checked once per epoch).
    validation_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.1, ge=0, lt=1)
    early_stopping_patience: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _split_leaves_training(self) -> TrainConfig:
        if self.validation_fraction + self.test_fraction >= 0.9:
            raise ValueError("validation_fraction + test_fraction must leave at least 10% for training")
        if isinstance(self.epochs, int) and self.epochs < 1:
            raise ValueError("epochs must be at least 1 or 'auto'")
        return self

    def resolved_epochs(self, n_train: int) -> int:
        return auto_epochs(n_train) if self.epochs == "auto" else self.epochs

    @classmethod
    def from_yaml(cls, path: Path, **overrides: object) -> TrainConfig:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of hyperparameters")
        return cls.model_validate({**loaded, **overrides})

    @classmethod
    def from_openai(cls, hyperparameters: Hyperparameters, seed: int, **overrides: object) -> TrainConfig:
        """OpenAI's fine-tuning hyperparameters as a config: `auto` keeps the trainer's default, and
        `learning_rate_multiplier` scales the default learning rate."""
        config: dict[str, object] = {"seed": seed, "epochs": hyperparameters.n_epochs}
        if hyperparameters.batch_size != "auto":
            config["batch_size"] = hyperparameters.batch_size
        if hyperparameters.learning_rate_multiplier != "auto":
            config["learning_rate"] = cls.model_fields["learning_rate"].default * hyperparameters.learning_rate_multiplier
        return cls.model_validate({**config, **overrides})
