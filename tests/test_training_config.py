"""OpenAI's fine-tuning hyperparameters become the trainer's config inside quiver.training."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from quiver.common.jobs import Hyperparameters, JobSpec
from quiver.training.config import TrainConfig


def test_auto_keeps_the_trainers_defaults() -> None:
    config = TrainConfig.from_openai(Hyperparameters(), seed=7)
    defaults = TrainConfig()
    assert (config.epochs, config.batch_size, config.learning_rate, config.seed) == (
        "auto", defaults.batch_size, defaults.learning_rate, 7)


def test_numbers_map_onto_the_config() -> None:
    config = TrainConfig.from_openai(
        Hyperparameters(n_epochs=2, batch_size=8, learning_rate_multiplier=0.5), seed=1)
    assert (config.epochs, config.batch_size, config.seed) == (2, 8, 1)
    assert config.learning_rate == pytest.approx(TrainConfig().learning_rate * 0.5)


def test_the_spec_refuses_what_the_api_refuses() -> None:
    spec = {"name": "x", "training_file": "/t.jsonl", "base_model_dir": "/m", "base_model_name": "m"}
    assert JobSpec.model_validate(spec).hyperparameters == Hyperparameters()
    for bad in ({"n_epochs": 0}, {"n_epochs": 2.0}, {"batch_size": "4"}, {"learning_rate_multiplier": -1}):
        with pytest.raises(ValidationError):
            JobSpec.model_validate({**spec, "hyperparameters": bad})
    with pytest.raises(ValidationError):
        JobSpec.model_validate({**spec, "unexpected": 1})
