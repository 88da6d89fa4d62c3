"""`quiver train`'s hyperparameter options come from TrainConfig's fields, and reach the trainer as typed values."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from quiver.cli import app
from quiver.training.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


def test_every_scalar_hyperparameter_is_an_option() -> None:
    import typer.main

    command = typer.main.get_command(app).commands["train"]
    options = {name for param in command.params for name in param.opts}
    scalar = [name for name, field in TrainConfig.model_fields.items() if name != "target_modules"]
    assert scalar and all(f"--{name.replace('_', '-')}" in options for name in scalar)
    assert "--target-modules" not in options  # a list: set in the YAML --config


def test_options_override_the_yaml_and_reach_the_trainer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import quiver.training.trainer as trainer

    seen: dict = {}

    def capture(train_file, out_dir, config, **kwargs):
        seen.update(config=config, out_dir=out_dir, **kwargs)
        raise SystemExit(0)  # stop before any training: this test is about the wiring

    monkeypatch.setattr(trainer, "train", capture)
    yaml = tmp_path / "hyper.yaml"
    yaml.write_text("rank: 4\nlearning_rate: 0.01\nwarmup_ratio: 0.2\n")
    result = runner.invoke(app, [
        "train", str(REPO / "examples" / "pirate.jsonl"), "--name", "p", "--out", str(tmp_path / "run"),
        "--config", str(yaml), "--base-model", str(tmp_path), "--learning-rate", "0.002", "--epochs", "2",
        "--max-steps", "5", "--gradient-checkpointing", "--alpha", "8",
    ])
    assert result.exit_code == 0, result.output
    config: TrainConfig = seen["config"]
    assert (config.rank, config.learning_rate, config.warmup_ratio) == (4, 0.002, 0.2)
    assert (config.epochs, config.max_steps, config.gradient_checkpointing, config.alpha) == (2, 5, True, 8.0)
    assert config.batch_size == TrainConfig().batch_size  # untouched: the default
    assert seen["name"] == "p" and seen["out_dir"] == tmp_path / "run"


@pytest.mark.parametrize("args", [["--epochs", "many"], ["--epochs", "0"], ["--rank", "0"], ["--dropout", "1.5"]])
def test_an_invalid_hyperparameter_exits_2_naming_it(args: list[str], tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", str(REPO / "examples" / "pirate.jsonl"), "--name", "p",
                                 "--base-model", str(tmp_path), *args])
    assert result.exit_code == 2
    assert "invalid hyperparameters" in result.output and args[0].lstrip("-").replace("-", "_") in result.output
