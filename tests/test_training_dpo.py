"""Preference tuning (DPO) and continued training from an adapter, on the default model with tiny step counts;
the checks on the adapter to continue from; a DPO adapter registered and served by the real engine."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from rich.console import Console

from quiver.training.config import TrainConfig
from quiver.training.data import read_examples, read_preference_examples, write_jsonl
from training_fixtures import REPO, base_model_dir  # noqa: F401

QUIET = Console(quiet=True)
# Tiny on purpose: a DPO step is two forward passes per pair plus the reference's, on a shared 2-core CPU.
DPO_QUICK = TrainConfig(method="dpo", max_steps=3, batch_size=2, max_seq_len=128, learning_rate=3e-3, epochs=1, seed=1)
SFT_QUICK = TrainConfig(max_steps=2, batch_size=2, max_seq_len=160, learning_rate=3e-3, epochs=1, seed=1)
training = pytest.mark.training


def _subset(tmp_path, name: str, count: int, preference: bool):
    read = read_preference_examples if preference else read_examples
    path = tmp_path / f"{name}.jsonl"
    write_jsonl(path, read(REPO / "examples" / f"{name}.jsonl")[:count])
    return path


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, base_model_dir):
    from quiver.training.trainer import train

    root = tmp_path_factory.mktemp("sft")
    return train(_subset(root, "pirate", 20, False), root / "run", SFT_QUICK, base_model_dir=base_model_dir, console=QUIET)


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, base_model_dir):
    from quiver.training.trainer import train

    root = tmp_path_factory.mktemp("dpo")
    return train(_subset(root, "concise", 20, True), root / "run", DPO_QUICK, name="concise",
                 base_model_dir=base_model_dir, console=QUIET)


@training
def test_dpo_from_the_base_writes_an_adapter_that_loads_and_the_reward_curve(dpo_run, base_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = dpo_run.run_dir
    assert {"adapter_config.json", "adapter_model.safetensors", "manifest.json", "loss_curve.json", "loss_curve.png"} <= {
        p.name for p in run.iterdir()}
    assert not (run / "ref").exists() and not (run / "checkpoints").exists()
    assert len(read_preference_examples(run / "data" / "train.jsonl")) == 16

    manifest = dpo_run.manifest
    assert manifest["hyperparameters"]["method"] == "dpo" and manifest["hyperparameters"]["beta"] == 0.1
    assert manifest["init_adapter"] is None
    training = manifest["training"]
    assert training["steps"] == 3
    # DPO's loss starts at ln 2 (policy == reference) and falls as the preferred answers gain on the others.
    assert training["initial_validation_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert training["final_validation_loss"] < training["initial_validation_loss"]
    assert training["final_validation_reward_margin"] > 0
    curve = json.loads((run / "loss_curve.json").read_text())
    assert [p["step"] for p in curve["train_rewards"]] == [1, 2, 3]
    assert {"margin", "accuracy"} <= set(curve["train_rewards"][-1]) and curve["validation_rewards"]

    example = read_preference_examples(run / "data" / "train.jsonl")[0]
    from quiver.training.trainer import load_tokenizer

    tokenizer = load_tokenizer(base_model_dir)
    ids = tokenizer.apply_chat_template(example.messages, add_generation_prompt=True, tokenize=True,
                                        return_tensors="pt", return_dict=True)
    base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(**ids).logits
        adapted = PeftModel.from_pretrained(base, run).eval()
        assert (adapted(**ids).logits - base_logits).abs().max() > 1e-3


@training
def test_continued_sft_starts_from_the_adapter_weights_and_keeps_its_shape(sft_run, tmp_path, base_model_dir):
    from quiver.training.trainer import train

    start = sft_run.manifest["training"]
    assert start["final_validation_loss"] < start["initial_validation_loss"]
    data = tmp_path / "pirate.jsonl"
    shutil.copy(sft_run.manifest["dataset"]["train_file"], data)  # same lines and seed: the same validation split
    config = SFT_QUICK.model_copy(update={"init_adapter": sft_run.run_dir, "max_steps": 1, "rank": 4})
    result = train(data, tmp_path / "more", config, base_model_dir=base_model_dir, console=QUIET)

    # Before its first step the continued run already has the first run's validation loss, not the base's.
    assert result.manifest["training"]["initial_validation_loss"] == pytest.approx(start["final_validation_loss"], rel=1e-4)
    adapter = json.loads((tmp_path / "more" / "adapter_config.json").read_text())
    assert adapter["r"] == 8  # the adapter's rank, not the config's
    assert result.manifest["init_adapter"]["rank"] == 8
    assert result.manifest["init_adapter"]["path"] == str(sft_run.run_dir.resolve())


@training
def test_dpo_from_an_sft_adapter_uses_it_as_the_reference(sft_run, tmp_path, base_model_dir):
    from safetensors.torch import load_file

    from quiver.training.trainer import train

    # Two steps: the first is the learning-rate warm-up's (rate 0), so one step would leave the weights as loaded.
    config = DPO_QUICK.model_copy(update={"init_adapter": sft_run.run_dir, "max_steps": 2})
    result = train(_subset(tmp_path, "concise", 20, True), tmp_path / "run", config, base_model_dir=base_model_dir,
                   console=QUIET)
    # Against the base as reference the SFT adapter's own shift would already count: the loss starts at ln 2 only
    # because the reference is the adapter as loaded.
    assert result.manifest["training"]["initial_validation_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert not (tmp_path / "run" / "ref").exists()
    before = load_file(sft_run.run_dir / "adapter_model.safetensors")
    after = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert any(not (before[k] == after[k]).all() for k in before)


def test_init_adapter_is_checked_before_training(tmp_path, base_model_dir):
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from quiver.testing import random_adapter
    from quiver.training.trainer import InitAdapterError, load_init_adapter

    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    good = random_adapter(base_model_dir, tmp_path / "good", seed=1)
    assert load_init_adapter(model, good, base_model_dir).peft_config["default"].r == 8

    def variant(name, edit):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        edit(folder)
        return folder

    def shrink(folder):  # a LoRA made for a model with another hidden size
        tensors = load_file(folder / "adapter_model.safetensors")
        key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
        tensors[key] = tensors[key][:, :100].contiguous()
        save_file(tensors, folder / "adapter_model.safetensors")

    def other_method(folder):
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))

    cases = {
        "missing": (lambda folder: (folder / "adapter_model.safetensors").unlink(), "missing"),
        "shape": (shrink, "does not fit"),
        "method": (other_method, "only LoRA"),
        "digest": (lambda folder: (folder / "manifest.json").write_text(json.dumps({"base_model": {"digest": "sha256:0"}})),
                   "another base model"),
    }
    for name, (edit, message) in cases.items():
        fresh = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
        with pytest.raises(InitAdapterError, match=message):
            load_init_adapter(fresh, variant(name, edit), base_model_dir)


@training
def test_dpo_adapter_registers_and_serves_with_the_official_client(dpo_run, quiver_server):
    from quiver.training.register import register_adapter
    from conftest import ADMIN_KEY

    record = register_adapter(dpo_run.run_dir, quiver_server.base_url, "concise-dpo", ADMIN_KEY)
    assert record["id"] == "concise-dpo@1"
    client = quiver_server.openai()
    assert "concise-dpo" in {model.id for model in client.models.list()}
    example = read_preference_examples(dpo_run.run_dir / "data" / "test.jsonl")[0]
    reply = client.chat.completions.create(model="concise-dpo", messages=example.messages, temperature=0, max_tokens=64)
    # The gateway answers with the version it served.
    assert reply.model == "concise-dpo@1" and reply.choices[0].message.content.strip()
    assert reply.usage.completion_tokens > 0

    # `quiver eval` on a DPO run: base vs adapter on the held-out prompts, by the preferred trait.
    from quiver.training.evaluate import evaluate_run
    from conftest import API_KEY

    report = evaluate_run(dpo_run.run_dir, quiver_server.base_url, api_key=API_KEY, adapter_model="concise-dpo@1",
                          max_tokens=64)
    assert report["method"] == "dpo" and report["models"] == {"base": quiver_server.model_name,
                                                               "adapter": "concise-dpo@1"}
    for role in ("base", "adapter"):
        metrics = report["metrics"][role]
        assert metrics["examples"] == 2 and 0 < metrics["median_answer_tokens"] <= 64
        assert {"contains_preferred", "within_target_length", "target_tokens", "similarity"} <= set(metrics)
    markdown = (dpo_run.run_dir / "eval_report.md").read_text()
    assert "**non-preferred**" in markdown and "| within_target_length |" in markdown


def test_length_proxy_and_reward_curve_from_the_log_history():
    from quiver.training.evaluate import Answer, length_metrics
    from quiver.training.preference import reward_curve

    answers = [Answer("short", 8), Answer("short too", 12), Answer("a rambling answer", 90), Answer("x", 3)]
    assert length_metrics(answers, target_tokens=12) == {
        "median_answer_tokens": 10.0, "target_tokens": 12, "within_target_length": 0.75}

    history = [
        {"step": 1, "epoch": 0.5, "loss": 0.69, "rewards/margins": 0.0, "rewards/accuracies": 0.0},
        {"step": 2, "epoch": 1.0, "loss": 0.4, "rewards/margins": 0.9, "rewards/accuracies": 1.0},
        {"step": 2, "epoch": 1.0, "eval_loss": 0.3, "eval_rewards/margins": 1.2, "eval_rewards/accuracies": 1.0},
    ]
    assert reward_curve(history) == {
        "train_rewards": [{"step": 1, "epoch": 0.5, "margin": 0.0, "accuracy": 0.0},
                          {"step": 2, "epoch": 1.0, "margin": 0.9, "accuracy": 1.0}],
        "validation_rewards": [{"step": 2, "epoch": 1.0, "margin": 1.2, "accuracy": 1.0}],
    }
