"""Preference tuning (DPO) glue between quiver's checked data and TRL's DPOTrainer: the rows it trains on, the
labels the loss-mask check reads, and the reward curve TRL logs next to the loss.

The rows are pre-rendered text (prompt, chosen, rejected) made with the base model's own chat template, exactly as
the data checks rendered them, rather than message lists: TRL's conversational path would hand the template the
`None`-filled keys an Arrow table gives messages of different shapes (`tool_calls`, `name`, ...).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quiver.training.encoding import TemplateError

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from quiver.training.data import PreferenceExample


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: Any, **kwargs: Any) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, **kwargs)


def preference_rows(examples: list[PreferenceExample], tokenizer: PreTrainedTokenizerBase) -> list[dict[str, str]]:
    """Each example as TRL's standard (text) preference row: the prompt with the generation prompt, and each answer
    as the text the model must produce, up to and including the end-of-turn token (what generation stops on; TRL
    appends an end-of-sequence token to any answer that does not end with one)."""
    eos = tokenizer.eos_token
    # TRL tokenizes text rows with the tokenizer's special tokens: a BOS the template already wrote would double.
    adds_bos = bool(tokenizer.bos_token) and tokenizer.bos_token_id in tokenizer("")["input_ids"]
    rows = []
    for example in examples:
        prompt = _render(tokenizer, example.messages, example.tools, add_generation_prompt=True)
        if adds_bos and prompt.startswith(tokenizer.bos_token):
            prompt = prompt[len(tokenizer.bos_token):]
        row = {"prompt": prompt}
        for column, answer in (("chosen", example.preferred), ("rejected", example.non_preferred)):
            full = _render(tokenizer, [*example.messages, answer], example.tools)
            if not full.startswith(prompt):
                raise TemplateError("template_not_prefix_preserving",
                                    f"line {example.line}: the chat template renders the prompt differently once the "
                                    "answer is added; the answer cannot be located")
            completion = full[len(prompt):]
            end = completion.rfind(eos)
            row[column] = completion[: end + len(eos)] if end >= 0 else completion
        rows.append(row)
    return rows


def preference_dataset(examples: list[PreferenceExample], tokenizer: PreTrainedTokenizerBase) -> Dataset:
    from datasets import Dataset

    return Dataset.from_list(preference_rows(examples, tokenizer))


def chosen_label_rows(tokenized: Dataset, max_length: int | None) -> list[list[int]]:
    """The preferred answers' tokens as DPO trains on them: TRL's collator keeps the start of prompt + answer up to
    max_length, so a long prompt cuts the answer's end (and its end-of-turn token) first."""
    rows = []
    for prompt_ids, chosen_ids in zip(tokenized["prompt_ids"], tokenized["chosen_ids"]):
        room = len(chosen_ids) if max_length is None else max(0, max_length - len(prompt_ids))
        rows.append(list(chosen_ids[:room]))
    return rows


REWARD_KEYS = {"margin": "rewards/margins", "accuracy": "rewards/accuracies"}


def reward_curve(log_history: list[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    """TRL's logged reward margin (preferred minus non-preferred implicit reward) and accuracy (share of pairs
    where the preferred answer has the higher reward), per training step and per evaluation."""
    curve: dict[str, list[dict[str, float]]] = {"train_rewards": [], "validation_rewards": []}
    for entry in log_history:
        for part, prefix in (("train_rewards", ""), ("validation_rewards", "eval_")):
            if f"{prefix}rewards/margins" in entry:
                curve[part].append({"step": entry["step"], "epoch": entry.get("epoch", 0.0),
                                    **{name: entry[f"{prefix}{key}"] for name, key in REWARD_KEYS.items()
                                       if f"{prefix}{key}" in entry}})
    return curve


def save_preference_curve(run_dir: Path, curve: dict[str, Any], warnings: list[str]) -> None:
    """loss_curve.json with the rewards added, and loss_curve.png with a second panel for them."""
    (run_dir / "loss_curve.json").write_text(json.dumps({**curve, "warnings": warnings}, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (losses, rewards) = plt.subplots(1, 2, figsize=(11, 4))
    for part, style in (("train", {"alpha": 0.8}), ("validation", {"marker": "o"})):
        if curve[part]:
            losses.plot([p["step"] for p in curve[part]], [p["loss"] for p in curve[part]], label=part, **style)
    losses.set_xlabel("optimizer step")
    losses.set_ylabel("DPO loss")
    for part, style in (("train_rewards", {"alpha": 0.8}), ("validation_rewards", {"marker": "o"})):
        points = curve.get(part) or []
        label = part.replace("_rewards", "")
        if points:
            rewards.plot([p["step"] for p in points], [p.get("margin") for p in points],
                         label=f"{label} reward margin", **style)
            rewards.plot([p["step"] for p in points], [p.get("accuracy") for p in points],
                         label=f"{label} reward accuracy", linestyle="--", **style)
    rewards.set_xlabel("optimizer step")
    rewards.set_ylabel("preferred - non-preferred reward / accuracy")
    for axes in (losses, rewards):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(run_dir / "loss_curve.png", dpi=100)
    plt.close(figure)
