"""Training data: load and validate JSONL examples, report on them, and split them.

Two line formats are accepted for supervised training, and both become a list of chat messages:
- OpenAI chat format: `{"messages": [...], "tools": [...]}` with `tool_calls` / `tool_call_id` and an optional
  assistant `weight` (0 or 1; 0 keeps the turn as context without training on it);
- prompt/response pairs: `{"prompt": "...", "response": "..."}` (or `"completion"` instead of `"response"`).

Preference tuning (DPO) takes OpenAI's preference format instead, one pair of answers to one prompt per line:
`{"input": {"messages": [...], "tools"?: [...]}, "preferred_output": [{"role": "assistant", ...}],
"non_preferred_output": [{"role": "assistant", ...}]}` (see the "preference data" section at the end).
"""

from __future__ import annotations

import json
import math
import random
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from quiver.training.encoding import TemplateError, encode_example
from quiver.training.tool_schema import SchemaProblem, ToolSchemas
from quiver.training.example import Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant", "tool")
EXAMPLE_KEYS = {"messages", "tools", "parallel_tool_calls"}
PAIR_KEYS = {"prompt", "response", "completion"}
MESSAGE_KEYS = {"role", "content", "name", "tool_calls", "tool_call_id", "weight"}

# Chat examples nest a few levels (tool schemas a few more); anything far deeper is hostile and would make the
# later steps (json.dumps, the chat template) recurse past Python's limit.
MAX_JSON_DEPTH = 64

MIN_EXAMPLES = 50
RECOMMENDED_EXAMPLES = (100, 1000)

# The hosted fine-tuning APIs pick epochs so that small sets are seen enough times and large ones not too often.
AUTO_EPOCHS_DEFAULT = 3
AUTO_MIN_TARGET_EXAMPLES = 100
AUTO_MAX_TARGET_EXAMPLES = 25_000
AUTO_MAX_EPOCHS = 25


@dataclass(frozen=True)
class Issue:
    severity: Literal["error", "warning"]
    code: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line is not None else ""
        return f"{self.severity} [{self.code}] {where}{self.message}"


@dataclass
class TokenStats:
    examples: int
    total: int
    trained: int
    min: int
    mean: float
    median: float
    max: int
    truncated_examples: int
    tokens_cut: int


@dataclass
class DatasetReport:
    path: Path
    lines: int
    examples: list[Example]
    issues: list[Issue] = field(default_factory=list)
    tokens: TokenStats | None = None
    auto_epochs: int | None = None
    max_seq_len: int | None = None
    format: Literal["chat", "preference"] = "chat"

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "file": str(self.path),
            "format": self.format,
            "lines": self.lines,
            "examples": len(self.examples),
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "with_system_message": sum(any(m["role"] == "system" for m in e.messages) for e in self.examples),
            "with_tools": sum(bool(e.tools) or _has_tool_calls(e) for e in self.examples),
            "auto_epochs": self.auto_epochs,
        }
        if self.tokens is not None:
            summary["max_seq_len"] = self.max_seq_len
            summary["tokens"] = self.tokens.__dict__
            if self.auto_epochs is not None:
                summary["auto_training_tokens"] = self.tokens.total * self.auto_epochs
        return summary


class DatasetError(ValueError):
    """A dataset that cannot be trained on; carries the issues found."""

    def __init__(self, path: Path, issues: list[Issue]) -> None:
        errors = [i for i in issues if i.severity == "error"]
        shown = "\n".join(str(i) for i in errors[:20])
        more = f"\n... and {len(errors) - 20} more" if len(errors) > 20 else ""
        super().__init__(f"{path}: {len(errors)} error(s)\n{shown}{more}")
        self.issues = issues


def auto_epochs(n_train: int) -> int:
    if n_train <= 0:
        return AUTO_EPOCHS_DEFAULT
    if n_train * AUTO_EPOCHS_DEFAULT < AUTO_MIN_TARGET_EXAMPLES:
        return min(AUTO_MAX_EPOCHS, math.ceil(AUTO_MIN_TARGET_EXAMPLES / n_train))
    if n_train * AUTO_EPOCHS_DEFAULT > AUTO_MAX_TARGET_EXAMPLES:
        return max(1, AUTO_MAX_TARGET_EXAMPLES // n_train)
    return AUTO_EPOCHS_DEFAULT


# ---------------------------------------------------------------------------------------------- parsing


def load_examples(path: Path, parse: Any = None) -> tuple[list[Any], list[Issue], int]:
    """Parse every line (with `parse`, default `parse_line`); return the valid examples, the per-line issues and
    the number of lines read."""
    parse = parse or parse_line
    examples: list[Any] = []
    issues: list[Issue] = []
    lines = 0
    with open(path, "rb") as f:
        for lineno, raw_bytes in enumerate(f, start=1):
            lines = lineno
            # Decoded line by line, so that bad bytes are one line's error, not the whole file's exception.
            try:
                raw = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as exc:
                issues.append(Issue("error", "invalid_utf8", f"not valid UTF-8 (byte {exc.start + 1})", lineno))
                continue
            if not raw.strip():
                continue
            example, line_issues = parse(raw, lineno)
            issues.extend(line_issues)
            if example is not None and not any(i.severity == "error" for i in line_issues):
                examples.append(example)
    if not examples and not issues:
        issues.append(Issue("error", "empty_file", "the file holds no examples"))
    return examples, issues, lines


def json_depth(value: Any) -> int:
    """How deeply lists and objects nest in `value`, walked without recursion (so any depth is safe to measure)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in item)
    return deepest


def _json_object(raw: str) -> dict[str, Any] | tuple[str, str]:
    """A line as a JSON object, bounded in depth; or the (code, message) of why it is not one. Both formats' lines."""
    try:
        row = json.loads(raw)
    except json.JSONDecodeError as exc:
        return "invalid_json", f"not valid JSON ({exc.msg} at column {exc.colno})"
    except RecursionError:  # the parser gave up on the nesting itself
        return "too_deeply_nested", f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
    if json_depth(row) > MAX_JSON_DEPTH:
        return "too_deeply_nested", f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
    if not isinstance(row, dict):
        return "invalid_example", f"each line must be a JSON object, got {type(row).__name__}"
    return row


def parse_line(raw: str, line: int) -> tuple[Example | None, list[Issue]]:
    def error(code: str, message: str) -> tuple[None, list[Issue]]:
        return None, [Issue("error", code, message, line)]

    row = _json_object(raw)
    if isinstance(row, tuple):
        return error(*row)
    if "messages" not in row and "prompt" in row:
        return _parse_pair(row, line)
    if "messages" not in row:
        return error("missing_messages", "no `messages` (chat format) and no `prompt` (prompt/response format)")
    unknown = sorted(set(row) - EXAMPLE_KEYS)
    if unknown:
        return error("unknown_key", f"unknown key(s) {unknown}; allowed: {sorted(EXAMPLE_KEYS)}")

    messages, tools = row["messages"], row.get("tools")
    if not isinstance(messages, list) or not messages:
        return error("invalid_messages", "`messages` must be a non-empty list")
    schemas: ToolSchemas | None = None
    if tools is not None:
        tool_issue = _check_tools(tools)
        if tool_issue:
            return error("invalid_tools", tool_issue)
        try:
            schemas = ToolSchemas(tools)
        except SchemaProblem as exc:
            return error("invalid_tools", str(exc))

    issues: list[Issue] = []
    normalized: list[dict[str, Any]] = []
    call_ids: set[str] = set()
    answered: set[str] = set()
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            return error("invalid_message", f"{where} must be an object")
        unknown = sorted(set(message) - MESSAGE_KEYS)
        if unknown:
            return error("unknown_key", f"{where} has unknown key(s) {unknown}; allowed: {sorted(MESSAGE_KEYS)}")
        role = message.get("role")
        if role not in ROLES:
            return error("unknown_role", f"{where} has role {role!r}; expected one of {list(ROLES)}")
        content, content_problem = _text_content(message.get("content"))
        if content_problem:
            return error("invalid_content", f"{where}: {content_problem}")
        out: dict[str, Any] = {"role": role, "content": content}

        if "weight" in message:
            if role != "assistant":
                return error("invalid_weight", f"{where}: `weight` is only allowed on assistant messages")
            if message["weight"] not in (0, 1) or isinstance(message["weight"], bool):
                return error("invalid_weight", f"{where}: `weight` must be 0 or 1, got {message['weight']!r}")
            out["weight"] = message["weight"]
        if "tool_calls" in message:
            if role != "assistant":
                return error("invalid_tool_calls", f"{where}: only assistant messages carry `tool_calls`")
            problem = _check_tool_calls(message["tool_calls"])
            if problem:
                return error("invalid_tool_calls", f"{where}: {problem}")
            for position, call in enumerate(message["tool_calls"]):
                if call["id"] in call_ids:
                    return error("duplicate_tool_call_id", f"{where}.tool_calls[{position}]: id {call['id']!r} is used twice")
                call_ids.add(call["id"])
                if schemas is None:
                    issues.append(Issue("warning", "undeclared_tool", f"{where}.tool_calls[{position}] calls "
                                        f"{call['function']['name']!r} but the example declares no `tools`: the "
                                        "model learns a call it was never shown, and its arguments go unchecked", line))
                    continue
                try:
                    schemas.check_call(call["function"]["name"], json.loads(call["function"]["arguments"]))
                except SchemaProblem as exc:
                    return error(exc.code, f"{where}.tool_calls[{position}]: {exc}")
            out["tool_calls"] = message["tool_calls"]
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                return error("missing_tool_call_id", f"{where}: a tool message needs `tool_call_id`")
            if call_id not in call_ids:
                return error("unknown_tool_call_id", f"{where}: `tool_call_id` {call_id!r} answers no earlier tool call")
            if call_id in answered:
                return error("duplicate_tool_result", f"{where}: tool call {call_id!r} already has its result")
            answered.add(call_id)
            out["tool_call_id"] = call_id
        elif "tool_call_id" in message:
            return error("unknown_key", f"{where}: `tool_call_id` is only allowed on tool messages")
        if "name" in message:
            out["name"] = message["name"]

        if content is None and not (role == "assistant" and out.get("tool_calls")):
            return error("missing_content", f"{where} ({role}) has no content")
        if content is not None and not content.strip() and role != "assistant":
            return error("missing_content", f"{where} ({role}) has empty content")
        normalized.append(out)

    unanswered = sorted(call_ids - answered)
    if unanswered:
        return error("missing_tool_result", f"tool call(s) {unanswered} have no `tool` message with their result")
    assistants = [m for m in normalized if m["role"] == "assistant"]
    if not assistants:
        return error("no_assistant_message", "no assistant message: nothing to learn from")
    if all(m.get("weight", 1) == 0 for m in assistants):
        return error("no_trained_assistant_message", "every assistant message has weight 0: nothing to learn from")
    return Example(line, normalized, tools), issues


def _parse_pair(row: dict[str, Any], line: int) -> tuple[Example | None, list[Issue]]:
    unknown = sorted(set(row) - PAIR_KEYS)
    if unknown:
        return None, [Issue("error", "unknown_key", f"unknown key(s) {unknown}; allowed: {sorted(PAIR_KEYS)}", line)]
    if "response" in row and "completion" in row:
        return None, [Issue("error", "ambiguous_response", "give either `response` or `completion`, not both", line)]
    prompt, answer = row["prompt"], row.get("response", row.get("completion"))
    if answer is None:
        return None, [Issue("error", "missing_response", "a `prompt` needs a `response` or `completion`", line)]
    for name, value in (("prompt", prompt), ("response", answer)):
        if not isinstance(value, str) or not value.strip():
            return None, [Issue("error", "missing_content", f"`{name}` must be a non-empty string", line)]
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return Example(line, messages), []


def _text_content(content: Any) -> tuple[str | None, str | None]:
    """Plain string content, or OpenAI's list of text parts joined; anything else is a problem."""
    if content is None or isinstance(content, str):
        return content, None
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        if all(isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content), None
    return None, "`content` must be a string or a list of text parts"


def _check_tools(tools: Any) -> str | None:
    if not isinstance(tools, list):
        return "`tools` must be a list"
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            return f"tools[{index}] must be {{'type': 'function', 'function': {{...}}}}"
        if not isinstance(function.get("name"), str) or not function["name"]:
            return f"tools[{index}].function needs a `name`"
    return None


def _check_tool_calls(tool_calls: Any) -> str | None:
    if not isinstance(tool_calls, list) or not tool_calls:
        return "`tool_calls` must be a non-empty list"
    for index, call in enumerate(tool_calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(call, dict) or not isinstance(call.get("id"), str) or not isinstance(function, dict):
            return f"tool_calls[{index}] must be {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}}"
        if not isinstance(function.get("name"), str) or not isinstance(function.get("arguments"), str):
            return f"tool_calls[{index}].function needs string `name` and `arguments` (a JSON string)"
        try:
            arguments = json.loads(function["arguments"])
        except json.JSONDecodeError as exc:
            return f"tool_calls[{index}].function.arguments is not valid JSON ({exc.msg} at column {exc.colno})"
        except RecursionError:
            return f"tool_calls[{index}].function.arguments is nested deeper than {MAX_JSON_DEPTH} levels"
        if json_depth(arguments) > MAX_JSON_DEPTH:
            return f"tool_calls[{index}].function.arguments is nested deeper than {MAX_JSON_DEPTH} levels"
        if isinstance(arguments, str):
            # OpenAI's arguments are an object encoded once; a string inside the string is an object encoded twice.
            return f"tool_calls[{index}].function.arguments is JSON-encoded twice (a string holding JSON); encode the object once"
        if not isinstance(arguments, dict):
            return f"tool_calls[{index}].function.arguments must encode a JSON object, got {type(arguments).__name__}"
    return None


def _has_tool_calls(example: Example) -> bool:
    return any(m.get("tool_calls") for m in example.messages)


# ---------------------------------------------------------------------------------------------- checks


def check_dataset(
    path: Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_seq_len: int | None = None,
    format: Literal["chat", "preference"] = "chat",
) -> DatasetReport:
    """Validate a JSONL file in `format`; with a tokenizer, also count tokens exactly as training will see them
    (for preference data: prompt + each answer)."""
    path = Path(path)
    preference = format == "preference"
    examples, issues, lines = load_examples(path, parse_preference_line if preference else parse_line)
    report = DatasetReport(path, lines, examples, issues, max_seq_len=max_seq_len, format=format)
    # Several pairs for one prompt are normal preference data, so for it no `conflicting_answers`.
    report.issues.extend(_dataset_warnings(examples, conflicting_answers=not preference))
    if tokenizer is not None and examples:
        _token_checks(report, tokenizer, max_seq_len)
    error_lines = {i.line for i in report.errors}
    report.examples = [e for e in report.examples if e.line not in error_lines]
    report.auto_epochs = auto_epochs(len(report.examples))
    return report


def _dataset_warnings(examples: list[Example] | list[PreferenceExample], conflicting_answers: bool) -> list[Issue]:
    warnings: list[Issue] = []
    n = len(examples)
    if 0 < n < MIN_EXAMPLES:
        low, high = RECOMMENDED_EXAMPLES
        warnings.append(Issue("warning", "too_few_examples", f"only {n} examples; {low}-{high} are recommended"))

    first_line_by_key: dict[str, int] = {}
    for example in examples:
        key = example.key()
        if key in first_line_by_key:
            warnings.append(
                Issue("warning", "duplicate_example", f"exact duplicate of line {first_line_by_key[key]}", example.line)
            )
        else:
            first_line_by_key[key] = example.line

    if conflicting_answers:
        answers_by_prompt: dict[str, dict[str, int]] = defaultdict(dict)
        for example in examples:
            answer = json.dumps(example.final_answer(), sort_keys=True, ensure_ascii=False)
            answers_by_prompt[example.prompt_key()].setdefault(answer, example.line)
        for answers in answers_by_prompt.values():
            if len(answers) > 1:
                lines = sorted(answers.values())
                warnings.append(
                    Issue(
                        "warning",
                        "conflicting_answers",
                        f"the same prompt has {len(answers)} different answers (lines {', '.join(map(str, lines))})",
                        lines[0],
                    )
                )

    without_system = [e.line for e in examples if not any(m["role"] == "system" for m in e.messages)]
    if without_system:
        shown = ", ".join(map(str, without_system[:10])) + (" ..." if len(without_system) > 10 else "")
        warnings.append(
            Issue(
                "warning",
                "no_system_message",
                f"{len(without_system)} of {n} examples have no system message (lines {shown}); "
                "the base model's default system prompt will be used for them",
            )
        )
    return warnings


def _sequences(example: Example | PreferenceExample) -> list[Example]:
    """What training encodes for one example: the chat itself, or a preference pair's prompt + each answer."""
    return [example.chosen(), example.rejected()] if isinstance(example, PreferenceExample) else [example]


def _token_checks(report: DatasetReport, tokenizer: PreTrainedTokenizerBase, max_seq_len: int | None) -> None:
    lengths: list[int] = []
    counted = trained = truncated = cut = 0
    for example in report.examples:
        try:
            encoded = [encode_example(sequence, tokenizer) for sequence in _sequences(example)]
        except TemplateError as exc:
            report.issues.append(Issue("error", exc.code, str(exc), example.line))
            continue
        counted += 1
        sizes = [len(e.input_ids) for e in encoded]
        lengths += sizes
        trained += sum(sum(e.assistant_masks) for e in encoded)
        longest = max(sizes)
        if max_seq_len is not None and longest > max_seq_len:
            truncated += 1
            over = sum(max(0, size - max_seq_len) for size in sizes)
            cut += over
            lost = sum(sum(e.assistant_masks[max_seq_len:]) for e in encoded)
            if len(encoded) == 1:
                message = (f"{longest} tokens, over max_seq_len {max_seq_len}: {over} tokens would be cut "
                           f"({lost} of them trained assistant tokens)")
            else:
                message = (f"{longest} tokens (prompt + the longer answer), over max_seq_len {max_seq_len}: the "
                           f"answers' ends would be cut ({over} tokens, {lost} of them trained)")
            report.issues.append(Issue("warning", "too_long", message, example.line))
    if lengths:
        report.tokens = TokenStats(
            examples=counted,
            total=sum(lengths),
            trained=trained,
            min=min(lengths),
            mean=round(statistics.fmean(lengths), 1),
            median=statistics.median(lengths),
            max=max(lengths),
            truncated_examples=truncated,
            tokens_cut=cut,
        )


def require_valid(report: DatasetReport) -> list[Example]:
    if not report.ok:
        raise DatasetError(report.path, report.issues)
    return report.examples


# ---------------------------------------------------------------------------------------------- split


@dataclass
class Split:
    train: list[Example]
    validation: list[Example]
    test: list[Example]


def split_examples(
    examples: list[Example],
    seed: int,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> Split:
    """Shuffle with `seed` and cut; the same seed and examples always give the same split."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    shuffled = [examples[i] for i in order]
    n_test = round(len(examples) * test_fraction)
    n_validation = round(len(examples) * validation_fraction)
    if len(examples) - n_test - n_validation < 1:
        raise ValueError(f"{len(examples)} examples are too few to keep a training split")
    test = shuffled[:n_test]
    validation = shuffled[n_test : n_test + n_validation]
    train = shuffled[n_test + n_validation :]
    return Split(train, validation, test)


def write_jsonl(path: Path, examples: list[Example]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for example in examples:
            f.write(json.dumps(example.to_json(), ensure_ascii=False) + "\n")


def read_examples(path: Path) -> list[Example]:
    """Load a file that must be valid (e.g. a saved split), failing with all its errors otherwise."""
    examples, issues, _ = load_examples(path)
    if any(i.severity == "error" for i in issues):
        raise DatasetError(path, issues)
    return examples


# ---------------------------------------------------------------------------------------------- preference data

PREFERENCE_KEYS = {"input", "preferred_output", "non_preferred_output"}
PREFERENCE_INPUT_KEYS = {"messages", "tools", "parallel_tool_calls"}
OUTPUT_KEYS = ("preferred_output", "non_preferred_output")


@dataclass
class PreferenceExample:
    """One prompt with a preferred and a non-preferred answer (each one assistant message)."""

    line: int
    messages: list[dict[str, Any]]  # the prompt: the conversation the answers reply to
    preferred: dict[str, Any]
    non_preferred: dict[str, Any]
    tools: list[dict[str, Any]] | None = None

    def to_json(self) -> dict[str, Any]:
        prompt: dict[str, Any] = {"messages": self.messages}
        if self.tools:
            prompt["tools"] = self.tools
        return {"input": prompt, "preferred_output": [self.preferred], "non_preferred_output": [self.non_preferred]}

    def key(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True, ensure_ascii=False)

    def chosen(self) -> Example:
        return Example(self.line, [*self.messages, self.preferred], self.tools)

    def rejected(self) -> Example:
        return Example(self.line, [*self.messages, self.non_preferred], self.tools)


def detect_format(path: Path) -> Literal["chat", "preference"]:
    """The format of a training file, from its first parsable line: OpenAI preference data or chat data."""
    with open(path, "rb") as f:
        for raw in f:
            try:
                row = json.loads(raw)
            except (ValueError, RecursionError):
                continue
            if isinstance(row, dict):
                return "preference" if PREFERENCE_KEYS & set(row) else "chat"
    return "chat"


def parse_preference_line(raw: str, line: int) -> tuple[PreferenceExample | None, list[Issue]]:
    """One preference line. The prompt and each answer are checked as the chat example they make together, so
    messages, tools and tool calls follow exactly the rules of `parse_line`."""

    def error(code: str, message: str) -> tuple[None, list[Issue]]:
        return None, [Issue("error", code, message, line)]

    row = _json_object(raw)
    if isinstance(row, tuple):
        return error(*row)
    if "input" not in row and ("messages" in row or "prompt" in row):
        return error("not_preference_data", "a chat example; preference tuning needs `input`, `preferred_output` "
                     "and `non_preferred_output` on every line")
    missing = [key for key in sorted(PREFERENCE_KEYS) if key not in row]
    if missing:
        return error("missing_key", f"missing {missing}; a preference line has {sorted(PREFERENCE_KEYS)}")
    unknown = sorted(set(row) - PREFERENCE_KEYS)
    if unknown:
        return error("unknown_key", f"unknown key(s) {unknown}; allowed: {sorted(PREFERENCE_KEYS)}")

    prompt = row["input"]
    if not isinstance(prompt, dict) or not isinstance(prompt.get("messages"), list) or not prompt["messages"]:
        return error("invalid_input", "`input` must be an object with a non-empty `messages` list")
    unknown = sorted(set(prompt) - PREFERENCE_INPUT_KEYS)
    if unknown:
        return error("unknown_key", f"`input` has unknown key(s) {unknown}; allowed: {sorted(PREFERENCE_INPUT_KEYS)}")
    messages = prompt["messages"]
    if any(isinstance(m, dict) and "weight" in m for m in messages):
        return error("invalid_weight", "`weight` is for supervised data; a preference prompt is never trained on")
    last = messages[-1]
    if isinstance(last, dict) and last.get("role") == "assistant":
        return error("invalid_input", "`input.messages` must end with the turn the answers reply to (user or tool), "
                     "not with an assistant message")

    answers: dict[str, dict[str, Any]] = {}
    for key in OUTPUT_KEYS:
        output = row[key]
        # OpenAI trains on one-turn answers: exactly one assistant message on each side.
        if not (isinstance(output, list) and len(output) == 1 and isinstance(output[0], dict)
                and output[0].get("role") == "assistant"):
            return error(f"invalid_{key}", f"`{key}` must be a list of exactly one assistant message")
        if "weight" in output[0]:
            return error("invalid_weight", f"`{key}[0]` has `weight`, which is for supervised data")
        as_chat = {"messages": [*messages, output[0]], **({"tools": prompt["tools"]} if "tools" in prompt else {})}
        example, issues = parse_line(json.dumps(as_chat), line)
        if example is None:
            # parse_line numbers the messages of the chat it was given: name them as the caller wrote them.
            def where(match: re.Match[str], key: str = key) -> str:
                index = int(match.group(1))
                return f"{key}[0]" if index == len(messages) else f"input.messages[{index}]"

            return None, [Issue(i.severity, i.code, re.sub(r"\bmessages\[(\d+)\]", where, i.message), line)
                          for i in issues]
        answers[key] = example.messages[-1]
        normalized, tools = example.messages[:-1], example.tools
    if answers["preferred_output"] == answers["non_preferred_output"]:
        return error("identical_outputs", "`preferred_output` and `non_preferred_output` are the same answer")
    return PreferenceExample(line, normalized, answers["preferred_output"], answers["non_preferred_output"], tools), []


def check_preference_dataset(
    path: Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_seq_len: int | None = None,
) -> DatasetReport:
    """`check_dataset` for preference data."""
    return check_dataset(path, tokenizer, max_seq_len, "preference")


def check_training_file(
    path: Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_seq_len: int | None = None,
    format: Literal["auto", "chat", "preference"] = "auto",
) -> DatasetReport:
    """Check a file in the given format, or the one its first line shows."""
    return check_dataset(path, tokenizer, max_seq_len, detect_format(path) if format == "auto" else format)


def read_preference_examples(path: Path) -> list[PreferenceExample]:
    """Load a preference file that must be valid (e.g. a saved split), failing with all its errors otherwise."""
    examples, issues, _ = load_examples(path, parse_preference_line)
    if any(i.severity == "error" for i in issues):
        raise DatasetError(path, issues)
    return examples
