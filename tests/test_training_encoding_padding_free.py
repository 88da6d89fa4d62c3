"""Padding-free batches (quiver's default data path) give the same loss and gradients as padded ones: on CPU the
attention keeps the examples of the flattened row apart through their position ids. The LM head scoring only the
trained positions gives the same as scoring all. Forward/backward only, no optimizer step."""

from __future__ import annotations

import pytest
from rich.console import Console

from quiver.training.config import TrainConfig
from quiver.training.data import read_examples
from quiver.training.encoding import encode_examples
from quiver.training.trainer import score_only_trained_positions
from training_fixtures import REPO, base_model_dir, tokenizer  # noqa: F401

# Backward passes of the real model: minutes on a loaded 2-core CPU, so not in the fast group.
pytestmark = pytest.mark.training

MAX_LEN = 112  # pirate examples run 93-126 tokens: some are cut, the others padded


def _trainer(tmp_path, base_model_dir, **data_path):  # noqa: F811
    from quiver.training.trainer import setup

    config = TrainConfig(max_steps=1, batch_size=3, max_seq_len=MAX_LEN, validation_fraction=0.0, test_fraction=0.1,
                         dropout=0.0, seed=3, **data_path)
    return setup(REPO / "examples" / "pirate.jsonl", tmp_path / str(sorted(data_path.items())), config,
                 base_model_dir=base_model_dir, console=Console(quiet=True)).trainer


def _loss_and_grads(trainer, features):
    import torch

    model = trainer.model
    model.train()
    model.zero_grad()
    batch = trainer._prepare_inputs(trainer.data_collator(features))
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, batch, torch


def test_padding_free_matches_padded_loss_and_gradients(tmp_path, base_model_dir, tokenizer):  # noqa: F811
    padded = _trainer(tmp_path, base_model_dir, padding_free=False)
    flat = _trainer(tmp_path, base_model_dir, padding_free=True)
    # Three examples of different lengths, one cut by max_seq_len: the padded batch really pads.
    pool = sorted(encode_examples(read_examples(REPO / "examples" / "pirate.jsonl")[:12], tokenizer, MAX_LEN),
                  key=lambda f: len(f["input_ids"]))
    middle = next(f for f in pool if len(pool[0]["input_ids"]) < len(f["input_ids"]) < MAX_LEN)
    features = [pool[0], pool[-1], middle]
    lengths = [len(f["input_ids"]) for f in features]
    assert len(set(lengths)) == 3 and max(lengths) == MAX_LEN

    flat.model.load_state_dict(padded.model.state_dict())  # the same LoRA initialisation on both sides
    padded_loss, padded_grads, padded_batch, torch = _loss_and_grads(padded, _with_labels(features))
    flat_loss, flat_grads, flat_batch, _ = _loss_and_grads(flat, _with_labels(features))
    # The LM head scoring every position (TRL's own CPU path) instead of the trained ones only: the same numbers.
    import trl.trainer.utils

    assert trl.trainer.utils._use_triton(torch.device("cpu"))
    score_only_trained_positions(False)
    try:
        assert not trl.trainer.utils._use_triton(torch.device("cpu"))
        full_loss, full_grads, _, _ = _loss_and_grads(padded, _with_labels(features))
    finally:
        score_only_trained_positions(True)
    assert full_loss.item() == pytest.approx(padded_loss.item(), rel=1e-5)
    for name, grad in full_grads.items():
        torch.testing.assert_close(padded_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    assert "attention_mask" in padded_batch and padded_batch["input_ids"].shape == (3, MAX_LEN)
    assert "attention_mask" not in flat_batch and flat_batch["input_ids"].shape == (1, sum(lengths))
    assert flat_loss.item() == pytest.approx(padded_loss.item(), rel=1e-5)
    assert padded_grads.keys() == flat_grads.keys() and padded_grads
    for name, grad in padded_grads.items():
        torch.testing.assert_close(flat_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    # The same flattened row with plain causal attention across the examples (positions running on): a different
    # loss, so the equality above is the attention keeping the examples apart, not an insensitive comparison.
    leaky = {**flat_batch, "position_ids": torch.arange(sum(lengths))[None]}
    flat.model.zero_grad()
    leaky_loss = flat.compute_loss(flat.model, leaky).item()
    assert abs(leaky_loss - flat_loss.item()) > 1e-3


def _with_labels(features):
    """What SFTTrainer's dataset preparation makes of `assistant_masks`: labels on the assistant tokens only."""
    return [{"input_ids": f["input_ids"],
             "labels": [t if m else -100 for t, m in zip(f["input_ids"], f["assistant_masks"])]} for f in features]
