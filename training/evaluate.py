"""Base model vs adapter on a run's held-out test split, both asked through an OpenAI-compatible server, greedy."""

from __future__ import annotations

import difflib
import json
import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quiver.training.data import Example, read_examples
from quiver.training.manifest import read_manifest, update_manifest
from quiver.training.trainer import SPLIT_DIR

DEFAULT_MAX_TOKENS = 256
DEFAULT_SAMPLES = 5
CONCURRENT_REQUESTS = 8  # the server batches concurrent requests; sequential ones would leave it idle


@dataclass
class Answer:
    text: str
    tokens: int


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None


def _context_and_expected(example: Example) -> tuple[list[dict[str, Any]], str]:
    last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
    context = [{k: v for k, v in m.items() if k != "weight"} for m in example.messages[:last]]
    return context, example.messages[last]["content"] or ""


def score(expected: list[str], answers: list[Answer]) -> dict[str, Any]:
    """Exact match and similarity; for JSON-object answers also valid-JSON and same-keys rates; answer length."""
    metrics: dict[str, Any] = {
        "examples": len(expected),
        "exact_match": statistics.fmean(a.text.strip() == e.strip() for e, a in zip(expected, answers)),
        # Credit for near misses, which exact match hides on free-text (style) tasks: 1.0 is identical text.
        "similarity": statistics.fmean(
            difflib.SequenceMatcher(None, e.strip(), a.text.strip(), autojunk=False).ratio()
            for e, a in zip(expected, answers)
        ),
        "mean_answer_tokens": statistics.fmean(a.tokens for a in answers),
    }
    json_pairs = [(_parse_json(e), a) for e, a in zip(expected, answers) if isinstance(_parse_json(e), dict)]
    if json_pairs:
        parsed = [(e, _parse_json(a.text.strip())) for e, a in json_pairs]
        metrics["json_examples"] = len(parsed)
        metrics["valid_json"] = statistics.fmean(isinstance(p, dict) for _, p in parsed)
        metrics["expected_keys"] = statistics.fmean(isinstance(p, dict) and set(p) == set(e) for e, p in parsed)
        metrics["field_accuracy"] = statistics.fmean(
            isinstance(p, dict) and p.get(key) == value for e, p in parsed for key, value in e.items()
        )
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}


@dataclass
class ToolAnswer:
    """The calls a reply made, as the server returned them: (name, arguments JSON text); None: unparsed call text."""

    calls: list[tuple[str, str] | None]


Call = tuple[str, Any]  # an expected call: tool name, decoded arguments


def _decision_turn(example: Example) -> tuple[list[dict[str, Any]], list[Call]] | None:
    """For an example with tools: the context up to the assistant's first reply to the last user message, and the
    calls expected there (none: the question needs no tool). That reply is where the tool choice is made."""
    if not example.tools:
        return None
    messages = example.messages
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is None:
        return None
    reply = next((i for i in range(last_user + 1, len(messages)) if messages[i]["role"] == "assistant"), None)
    if reply is None:
        return None
    context = [{k: v for k, v in m.items() if k != "weight"} for m in messages[:reply]]
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in messages[reply].get("tool_calls") or []]
    return context, calls


def _decoded_arguments(text: str | None) -> dict[str, Any] | None:
    value = _parse_json(text) if isinstance(text, str) else None
    return value if isinstance(value, dict) else None


def score_tool_calls(expected: list[list[Call]], answers: list[ToolAnswer]) -> dict[str, Any]:
    """Tool choice and arguments at the decision turn: called when (and only when) a call was expected, the right
    tool, arguments valid JSON, exactly the expected ones and field by field."""
    pairs = list(zip(expected, answers))
    needed = [(e, a) for e, a in pairs if e]
    not_needed = [a for e, a in pairs if not e]
    made = [a for a in answers if a.calls]
    metrics: dict[str, Any] = {
        "tool_examples": len(pairs),
        "tool_call_decision": statistics.fmean(bool(e) == bool(a.calls) for e, a in pairs),
    }
    if needed:
        def matches(e: list[Call], a: ToolAnswer) -> list[tuple[Call, tuple[str, str] | None]]:
            return [(call, a.calls[i] if i < len(a.calls) else None) for i, call in enumerate(e)]

        metrics["tool_right_tool"] = statistics.fmean(
            all(got is not None and got[0] == want[0] for want, got in matches(e, a)) for e, a in needed)
        metrics["tool_arguments_exact"] = statistics.fmean(
            len(a.calls) == len(e) and all(got is not None and got[0] == want[0] and _decoded_arguments(got[1]) == want[1]
                                           for want, got in matches(e, a)) for e, a in needed)
        fields = [
            got is not None and got[0] == want[0] and (_decoded_arguments(got[1]) or {}).get(key, object()) == value
            for e, a in needed for want, got in matches(e, a) for key, value in want[1].items()
        ]
        if fields:
            metrics["tool_argument_fields"] = statistics.fmean(fields)
    if made:
        metrics["tool_valid_json"] = statistics.fmean(
            all(call is not None and _decoded_arguments(call[1]) is not None for call in a.calls) for a in made)
    if not_needed:
        metrics["tool_no_call_when_none_needed"] = statistics.fmean(not a.calls for a in not_needed)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}


def _describe_calls(calls: list[tuple[str, str] | None] | list[Call]) -> str:
    if not calls:
        return "(no call)"
    return "\n".join("(unparsed call text)" if c is None else f"{c[0]}({c[1] if isinstance(c[1], str) else json.dumps(c[1])})"
                     for c in calls)


def evaluate_run(
    run_dir: Path,
    url: str,
    *,
    api_key: str | None = None,
    base_model: str | None = None,
    adapter_model: str | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    samples: int = DEFAULT_SAMPLES,
) -> dict[str, Any]:
    """Ask the served base model and the served adapter every test prompt; write eval_report.md and .json."""
    from openai import OpenAI

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    base_model = base_model or manifest["base_model"]["name"]
    adapter_model = adapter_model or (manifest.get("registered") or {}).get("id") or manifest["name"]
    examples = [e for e in read_examples(run_dir / SPLIT_DIR / "test.jsonl") if _context_and_expected(e)[1]]
    if not examples:
        raise ValueError(f"{run_dir} has no test examples with a text answer to evaluate")
    client = OpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key or "unused", max_retries=2)

    def ask(model: str, example: Example) -> Answer:
        context, _ = _context_and_expected(example)
        extra = {"tools": example.tools} if example.tools else {}
        completion = client.chat.completions.create(
            model=model, messages=context, temperature=0, max_tokens=max_tokens, **extra
        )
        return Answer(completion.choices[0].message.content or "", completion.usage.completion_tokens)

    def ask_tools(model: str, example: Example) -> ToolAnswer:
        context, _ = _decision_turn(example)
        completion = client.chat.completions.create(
            model=model, messages=context, tools=example.tools, temperature=0, max_tokens=max_tokens
        )
        message = completion.choices[0].message
        calls: list[tuple[str, str] | None] = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
        if not calls and "<tool_call>" in (message.content or ""):
            calls = [None]  # a call the server's tool parser could not read: made, but not valid
        return ToolAnswer(calls)

    tool_examples = [e for e in read_examples(run_dir / SPLIT_DIR / "test.jsonl") if _decision_turn(e)]
    with ThreadPoolExecutor(CONCURRENT_REQUESTS) as pool:
        answers = {
            role: list(pool.map(lambda e, m=model: ask(m, e), examples))
            for role, model in (("base", base_model), ("adapter", adapter_model))
        }
        tool_answers = {
            role: list(pool.map(lambda e, m=model: ask_tools(m, e), tool_examples))
            for role, model in (("base", base_model), ("adapter", adapter_model))
        }
    expected = [_context_and_expected(e)[1] for e in examples]
    expected_calls = [_decision_turn(e)[1] for e in tool_examples]
    report = {
        "url": url,
        "models": {"base": base_model, "adapter": adapter_model},
        "decoding": {"temperature": 0, "max_tokens": max_tokens},
        "metrics": {
            role: score(expected, role_answers)
            | (score_tool_calls(expected_calls, tool_answers[role]) if tool_examples else {})
            for role, role_answers in answers.items()
        },
        "samples": [
            {
                "line": e.line,
                "prompt": _context_and_expected(e)[0][-1]["content"],
                "expected": expected[i],
                "base": answers["base"][i].text,
                "adapter": answers["adapter"][i].text,
            }
            for i, e in enumerate(examples[:samples])
        ],
    }
    if tool_examples:
        report["tool_samples"] = [
            {
                "line": e.line,
                "prompt": _decision_turn(e)[0][-1]["content"],
                "expected": _describe_calls(expected_calls[i]),
                "base": _describe_calls(tool_answers["base"][i].calls),
                "adapter": _describe_calls(tool_answers["adapter"][i].calls),
            }
            for i, e in enumerate(tool_examples[:samples])
        ]
    (run_dir / "eval_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (run_dir / "eval_report.md").write_text(render_markdown(report, manifest["name"]))
    update_manifest(run_dir, eval={"models": report["models"], "metrics": report["metrics"]})
    return report


def render_markdown(report: dict[str, Any], name: str) -> str:
    base, adapter = report["metrics"]["base"], report["metrics"]["adapter"]
    lines = [
        f"# Evaluation of `{name}`",
        "",
        f"Held-out test split, {base['examples']} examples, greedy decoding (temperature 0), served by {report['url']}.",
        "",
        f"| metric | base (`{report['models']['base']}`) | adapter (`{report['models']['adapter']}`) |",
        "|---|---|---|",
    ]
    lines += [f"| {metric} | {base[metric]} | {adapter[metric]} |" for metric in base if metric != "examples"]
    lines += ["", "## Samples", ""]
    for sample in report.get("tool_samples", []):
        lines += [f"### tool choice, test example {sample['line']}", "", "**prompt**", "", _quote(sample["prompt"]), ""]
        lines += [f"**{who}**: `{sample[who]}`\n" for who in ("expected", "base", "adapter")]
    for sample in report["samples"]:
        lines += [
            f"### test example {sample['line']}",
            "",
            "**prompt**",
            "",
            _quote(sample["prompt"]),
            "",
            "**expected**",
            "",
            _quote(sample["expected"]),
            "",
            "**base**",
            "",
            _quote(sample["base"]),
            "",
            "**adapter**",
            "",
            _quote(sample["adapter"]),
            "",
        ]
    return "\n".join(lines)


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in (text or "(empty)").splitlines())


# ---------------------------------------------------------------------------------------------- preference runs

# A DPO run has no single right answer to match: the proxy is the preferred trait. For the concise example that
# is length, so answers are measured against the longest preferred answer of the test split.


def length_metrics(answers: list[Answer], target_tokens: int) -> dict[str, Any]:
    """How long the answers are, and the share no longer than `target_tokens` (end-of-turn token included)."""
    return {
        "median_answer_tokens": statistics.median(a.tokens for a in answers),
        "target_tokens": target_tokens,
        "within_target_length": round(statistics.fmean(a.tokens <= target_tokens for a in answers), 4),
    }


def preferred_target_tokens(run_dir: Path, examples: list[Any]) -> int:
    """The longest preferred answer in tokens, plus the end-of-turn token the server counts in completion_tokens."""
    from quiver.training.trainer import load_tokenizer

    tokenizer = load_tokenizer(Path(read_manifest(run_dir)["base_model"]["path"]))
    return 1 + max(len(tokenizer(e.preferred["content"] or "", add_special_tokens=False)["input_ids"]) for e in examples)


def evaluate_preference_run(
    run_dir: Path,
    url: str,
    *,
    api_key: str | None = None,
    base_model: str | None = None,
    adapter_model: str | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    samples: int = DEFAULT_SAMPLES,
    target_tokens: int | None = None,
) -> dict[str, Any]:
    """Base vs adapter on a DPO run's held-out prompts: similarity to the preferred answer and the length proxy.
    Writes eval_report.md and .json in the same format as `evaluate_run`."""
    from openai import OpenAI

    from quiver.training.data import read_preference_examples

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    base_model = base_model or manifest["base_model"]["name"]
    adapter_model = adapter_model or (manifest.get("registered") or {}).get("id") or manifest["name"]
    examples = read_preference_examples(run_dir / SPLIT_DIR / "test.jsonl")
    if not examples:
        raise ValueError(f"{run_dir} has no test examples to evaluate")
    target_tokens = target_tokens or preferred_target_tokens(run_dir, examples)
    client = OpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key or "unused", max_retries=2)

    def ask(model: str, example: Any) -> Answer:
        extra = {"tools": example.tools} if example.tools else {}
        completion = client.chat.completions.create(
            model=model, messages=example.messages, temperature=0, max_tokens=max_tokens, **extra
        )
        return Answer(completion.choices[0].message.content or "", completion.usage.completion_tokens)

    with ThreadPoolExecutor(CONCURRENT_REQUESTS) as pool:
        answers = {
            role: list(pool.map(lambda e, m=model: ask(m, e), examples))
            for role, model in (("base", base_model), ("adapter", adapter_model))
        }
    expected = [e.preferred["content"] or "" for e in examples]
    report = {
        "url": url,
        "models": {"base": base_model, "adapter": adapter_model},
        "decoding": {"temperature": 0, "max_tokens": max_tokens},
        "metrics": {role: {**score(expected, role_answers), **length_metrics(role_answers, target_tokens)}
                    for role, role_answers in answers.items()},
        "samples": [
            {"line": e.line, "prompt": e.messages[-1]["content"], "expected": expected[i],
             "base": answers["base"][i].text, "adapter": answers["adapter"][i].text}
            for i, e in enumerate(examples[:samples])
        ],
    }
    (run_dir / "eval_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (run_dir / "eval_report.md").write_text(render_markdown(report, manifest["name"]))
    update_manifest(run_dir, eval={"models": report["models"], "metrics": report["metrics"]})
    return report
