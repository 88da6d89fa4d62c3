"""The loss mask, a short real LoRA training run on the default model, loss-curve warnings, and merge equivalence."""

from __future__ import annotations

import copy
import json

import pytest
from rich.console import Console

from quiver.training.config import TrainConfig
from quiver.training.curve import curve_warnings
from quiver.training.data import Example, read_examples, write_jsonl
from quiver.training.encoding import IGNORE_INDEX, LossMaskError, check_loss_mask, encode_example, end_of_turn_ids
from training_fixtures import REPO, base_model_dir, tokenizer  # noqa: F401

# Enough for the loss to fall visibly, small enough for a 2-core CPU: 6 steps of 4 pirate rewrites.
QUICK = TrainConfig(max_steps=6, batch_size=4, max_seq_len=160, learning_rate=3e-3, epochs=1, seed=1)
QUIET = Console(quiet=True)


def _conversation(*answers_and_weights):
    messages = [{"role": "system", "content": "Answer in one word."}]
    for index, (answer, weight) in enumerate(answers_and_weights):
        messages += [{"role": "user", "content": f"question {index}"}, {"role": "assistant", "content": answer, "weight": weight}]
    return Example(1, messages)


def test_mask_covers_exactly_the_trained_answers_and_their_end_of_turn(tokenizer):
    encoded = encode_example(_conversation(("skipped", 0), ("Paris", 1)), tokenizer)
    trained = tokenizer.decode([t for t, m in zip(encoded.input_ids, encoded.assistant_masks) if m])
    assert trained == "Paris<|im_end|>\n"
    rendered = tokenizer.apply_chat_template(_conversation(("skipped", 0), ("Paris", 1)).messages, tokenize=True)
    assert encoded.input_ids == rendered["input_ids"]


def test_mask_check_rejects_empty_mask_and_missing_end_of_turn(tokenizer):
    end_of_turn = end_of_turn_ids(tokenizer)
    assert tokenizer.convert_ids_to_tokens(sorted(end_of_turn)) == ["<|im_end|>"]
    with pytest.raises(LossMaskError, match="empty"):
        check_loss_mask([[IGNORE_INDEX] * 5], end_of_turn)

    # A template that closes each turn at the start of the next one leaves `<|im_end|>` out of the answer.
    late_close = copy.deepcopy(tokenizer)
    late_close.chat_template = (
        "{% for m in messages %}{% if not loop.first %}<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n"
        "{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<|im_end|>\n<|im_start|>assistant\n{% endif %}"
    )
    encoded = encode_example(_conversation(("Paris", 1)), late_close)
    labels = [t if m else IGNORE_INDEX for t, m in zip(encoded.input_ids, encoded.assistant_masks)]
    assert tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == "Paris"
    with pytest.raises(LossMaskError, match="never learn to stop"):
        check_loss_mask([labels], end_of_turn)


def test_training_fails_before_step_one_when_max_seq_len_cuts_every_end_of_turn(tmp_path, base_model_dir):
    from quiver.training.trainer import train

    subset = tmp_path / "pirate.jsonl"
    write_jsonl(subset, read_examples(REPO / "examples" / "pirate.jsonl")[:20])
    config = QUICK.model_copy(update={"max_seq_len": 70})  # prompts are ~60 tokens, answers ~50
    with pytest.raises(LossMaskError, match="end-of-turn"):
        train(subset, tmp_path / "run", config, base_model_dir=base_model_dir, console=QUIET)
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, base_model_dir):
    from quiver.training.trainer import train

    root = tmp_path_factory.mktemp("train")
    subset = root / "pirate.jsonl"
    write_jsonl(subset, read_examples(REPO / "examples" / "pirate.jsonl")[:40])
    return train(subset, root / "pirate", QUICK, name="pirate", base_model_dir=base_model_dir, base_model_name="smol", console=QUIET)


def test_short_training_run_lowers_the_loss_and_writes_the_run_folder(trained_run):
    run = trained_run.run_dir
    assert {"adapter_config.json", "adapter_model.safetensors", "manifest.json", "loss_curve.json", "loss_curve.png"} <= {
        p.name for p in run.iterdir()
    }
    assert not list(run.glob("*.bin")) and not (run / "checkpoints").exists()
    assert json.loads((run / "adapter_config.json").read_text())["r"] == QUICK.rank
    assert [len(read_examples(run / "data" / f"{part}.jsonl")) for part in ("train", "validation", "test")] == [32, 4, 4]

    training = trained_run.manifest["training"]
    assert training["steps"] == 6
    assert training["final_validation_loss"] < 0.8 * training["initial_validation_loss"]
    curve = json.loads((run / "loss_curve.json").read_text())
    losses = [p["loss"] for p in curve["train"]]
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2])
    assert curve["validation"][0]["step"] == 0 and curve["validation"][-1]["step"] == 6

    manifest = trained_run.manifest
    assert manifest["base_model"]["name"] == "smol" and manifest["base_model"]["digest"].startswith("sha256:")
    assert manifest["chat_template_sha256"].startswith("sha256:")
    assert len(manifest["dataset"]["train_file_sha256"]) == 64
    assert manifest["hyperparameters"]["learning_rate"] == QUICK.learning_rate
    assert set(manifest["versions"]) == {"quiver", "peft", "torch", "transformers", "trl"}


def test_merged_checkpoint_matches_base_plus_adapter(trained_run, base_model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from quiver.training.merge import merge_adapter

    merged_dir = merge_adapter(trained_run.run_dir, tmp_path / "merged")
    assert {"model.safetensors", "tokenizer.json", "chat_template.jinja", "config.json"} <= {p.name for p in merged_dir.iterdir()}
    from quiver.training.trainer import load_tokenizer

    tokenizer = load_tokenizer(merged_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": "You are Captain Quill. Rewrite the office announcement you are given in pirate "
          "speak, keeping every fact."}, {"role": "user", "content": "Please update your calendar."}],
        add_generation_prompt=True, tokenize=True, return_tensors="pt", return_dict=True,
    )
    base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(**prompt).logits
        adapted = PeftModel.from_pretrained(base, trained_run.run_dir).eval()
        adapted_logits = adapted(**prompt).logits
        adapted_tokens = adapted.generate(**prompt, max_new_tokens=12, do_sample=False)
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
        merged_logits = merged(**prompt).logits
        merged_tokens = merged.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert (adapted_logits - base_logits).abs().max() > 1e-2  # the adapter does something
    assert torch.allclose(merged_logits, adapted_logits, atol=1e-4)
    assert torch.equal(merged_tokens, adapted_tokens)


def _curve(train_losses, validation=()):
    return {
        "train": [{"step": i + 1, "loss": loss} for i, loss in enumerate(train_losses)],
        "validation": [{"step": step, "loss": loss} for step, loss in validation],
    }


def test_curve_warnings():
    assert curve_warnings(_curve([2.0, 1.6, 1.3, 1.1, 0.9, 0.8, 0.7, 0.6], [(0, 2.1), (4, 1.2), (8, 0.9)])) == []
    [spike] = curve_warnings(_curve([2.0, 1.8, 1.6, 1.5, 1.4, 4.5, 1.3, 1.2]))
    assert "spiked at step(s) 6" in spike
    [plateau] = curve_warnings(_curve([2.0, 1.95, 1.9, 1.9, 1.88, 1.89, 1.88, 1.88]))
    assert "flattened" in plateau
    [overfit] = curve_warnings(_curve([2.0, 1.5, 1.0, 0.8, 0.5, 0.3, 0.2, 0.1], [(0, 2.0), (4, 1.0), (8, 1.4)]))
    assert "overfitting" in overfit
