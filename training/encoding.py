"""Chat examples to token ids plus an assistant-token mask, with the base model's own chat template.

TRL can mask assistant tokens only for chat templates with `{% generation %}` markers, and it patches just the
templates it knows (SmolLM2's is not one of them). Rendering each assistant turn's prefix works with any
prefix-preserving template: the characters between "conversation so far + generation prompt" and "conversation
including this turn" are exactly what the model must produce, end-of-turn token included. The resulting
`assistant_masks` column is what SFTTrainer turns into labels.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from quiver.training.example import Example

IGNORE_INDEX = -100


class TemplateError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class LossMaskError(RuntimeError):
    """The prepared training data would not teach the model to answer, or to stop."""


@dataclass
class Encoded:
    input_ids: list[int]
    assistant_masks: list[int]


def _template_message(message: dict[str, Any]) -> dict[str, Any]:
    plain = {k: v for k, v in message.items() if k != "weight"}
    if plain.get("tool_calls"):
        # Arguments arrive as OpenAI's JSON string and are decoded once into an object here, as vLLM does for the
        # chats it serves (renderers/chat_utils.py, _postprocess_messages): the template then writes the call
        # exactly as the served prompt shows it and as the engine's tool parser reads it back.
        plain["tool_calls"] = [
            {**call, "function": {**call["function"], "arguments": json.loads(call["function"]["arguments"])}}
            if isinstance(call["function"].get("arguments"), str) else call
            for call in plain["tool_calls"]
        ]
    return plain


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: Any, **kwargs: Any) -> str:
    plain = [_template_message(m) for m in messages]
    try:
        return tokenizer.apply_chat_template(plain, tools=tools, tokenize=False, **kwargs)
    except Exception as exc:  # jinja raises TemplateError, TypeError, ... depending on what the template does
        raise TemplateError("template_error", f"the chat template cannot render this example: {exc}") from exc


def encode_example(example: Example, tokenizer: PreTrainedTokenizerBase) -> Encoded:
    template = tokenizer.chat_template or ""
    if any(m.get("tool_calls") for m in example.messages) and "tool_calls" not in template:
        raise TemplateError(
            "tools_unsupported", "the base model's chat template does not render `tool_calls`; they would be dropped"
        )
    if example.tools and "tools" not in template:
        raise TemplateError(
            "tools_unsupported", "the base model's chat template does not render `tools`; they would be dropped"
        )

    full = _render(tokenizer, example.messages, example.tools)
    spans: list[tuple[int, int]] = []
    for index, message in enumerate(example.messages):
        if message["role"] != "assistant" or message.get("weight", 1) == 0:
            continue
        before = _render(tokenizer, example.messages[:index], example.tools, add_generation_prompt=True)
        through = _render(tokenizer, example.messages[: index + 1], example.tools)
        if not (through.startswith(before) and full.startswith(through)):
            raise TemplateError(
                "template_not_prefix_preserving",
                f"the chat template renders messages[{index}]'s context differently once the turn is added; "
                "assistant tokens cannot be located",
            )
        spans.append((len(before), len(through)))

    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(start <= token_start < end for start, end in spans)) for token_start, _ in encoding["offset_mapping"]]
    return Encoded(list(encoding["input_ids"]), mask)


def encode_examples(examples: list[Example], tokenizer: PreTrainedTokenizerBase, max_len: int | None = None) -> Dataset:
    """The trainer's dataset, cut to `max_len` tokens from the start (as SFTTrainer's `keep_start` would: padding-free
    batches leave truncation to the data)."""
    from datasets import Dataset

    encoded = [encode_example(e, tokenizer) for e in examples]
    return Dataset.from_dict(
        {"input_ids": [e.input_ids[:max_len] for e in encoded],
         "assistant_masks": [e.assistant_masks[:max_len] for e in encoded]}
    )


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The tokens that end an assistant turn: what generation stops on (`<|im_end|>` for ChatML models)."""
    if tokenizer.eos_token_id is None:
        raise LossMaskError("the tokenizer has no end-of-sequence token; cannot check that turns end")
    return {tokenizer.eos_token_id}


@dataclass
class MaskStats:
    examples: int
    examples_with_loss: int
    examples_ending_turn: int
    trained_tokens: int


def check_loss_mask(label_rows: Iterable[list[int]], end_of_turn: set[int], decode: Any = None) -> MaskStats:
    """Fail unless some tokens carry loss and the trained tokens include the end-of-turn token.

    Runs on the labels the trainer will actually use (after truncation), before the first step.
    """
    examples = with_loss = ending = trained = 0
    for labels in label_rows:
        examples += 1
        targets = [t for t in labels if t != IGNORE_INDEX]
        trained += len(targets)
        with_loss += bool(targets)
        ending += any(t in end_of_turn for t in targets)
    stats = MaskStats(examples, with_loss, ending, trained)
    names = sorted(decode(t) if decode else str(t) for t in end_of_turn)
    if trained == 0:
        raise LossMaskError(
            f"the loss mask is empty: none of the {examples} training examples has an assistant token to learn "
            "(check assistant `weight`s and that max_seq_len does not cut every answer)"
        )
    if ending == 0:
        raise LossMaskError(
            f"the loss mask never includes the end-of-turn token {names}: the adapter would never learn to stop. "
            "The chat template must close each assistant turn itself, and max_seq_len must leave room for it"
        )
    return stats
