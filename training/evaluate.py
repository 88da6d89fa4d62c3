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


class _Served:
    """A run's base model and adapter as served, asked greedily through the official client; writes the report.
    What the supervised and the preference evaluation share."""

    ROLES = ("base", "adapter")

    def __init__(self, run_dir: Path, url: str, api_key: str | None, base_model: str | None,
                 adapter_model: str | None, max_tokens: int) -> None:
        from openai import OpenAI

        self.run_dir = Path(run_dir)
        self.manifest = read_manifest(self.run_dir)
        self.url, self.max_tokens = url, max_tokens
        self.models = {
            "base": base_model or self.manifest["base_model"]["name"],
            "adapter": adapter_model or (self.manifest.get("registered") or {}).get("id") or self.manifest["name"],
        }
        self.client = OpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key or "unused", max_retries=2)

    @property
    def test_file(self) -> Path:
        return self.run_dir / SPLIT_DIR / "test.jsonl"

    def complete(self, model: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> Any:
        extra = {"tools": tools} if tools else {}
        return self.client.chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=self.max_tokens, **extra)

    def answer(self, model: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> Answer:
        completion = self.complete(model, messages, tools)
        return Answer(completion.choices[0].message.content or "", completion.usage.completion_tokens)

    def ask_both(self, ask: Any, items: list[Any]) -> dict[str, list[Any]]:
        """`ask(model, item)` for every item, of the base and of the adapter."""
        with ThreadPoolExecutor(CONCURRENT_REQUESTS) as pool:
            return {role: list(pool.map(lambda item, m=self.models[role]: ask(m, item), items)) for role in self.ROLES}

    def save(self, metrics: dict[str, dict[str, Any]], samples: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        report = {
            "url": self.url,
            "models": self.models,
            "decoding": {"temperature": 0, "max_tokens": self.max_tokens},
            "metrics": metrics,
            "samples": samples,
            **extra,
        }
        (self.run_dir / "eval_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        (self.run_dir / "eval_report.md").write_text(render_markdown(report, self.manifest["name"]))
        update_manifest(self.run_dir, eval={"models": report["models"], "metrics": report["metrics"]})
        return report


def evaluate_run(
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
    """Ask the served base model and the served adapter every held-out test prompt; write eval_report.md and .json.
    A supervised run is scored against its expected answers (and tool calls); a DPO run by the preferred trait
    (`target_tokens`: the length proxy's bound, default the longest preferred answer)."""
    served = _Served(run_dir, url, api_key, base_model, adapter_model, max_tokens)
    if served.manifest["hyperparameters"].get("method") == "dpo":
        return _evaluate_preference(served, samples, target_tokens)
    return _evaluate_supervised(served, samples)


def _evaluate_supervised(served: _Served, samples: int) -> dict[str, Any]:
    test = read_examples(served.test_file)
    examples = [e for e in test if _context_and_expected(e)[1]]
    if not examples:
        raise ValueError(f"{served.run_dir} has no test examples with a text answer to evaluate")

    def ask_tools(model: str, example: Example) -> ToolAnswer:
        message = served.complete(model, _decision_turn(example)[0], example.tools).choices[0].message
        calls: list[tuple[str, str] | None] = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
        if not calls and "<tool_call>" in (message.content or ""):
            calls = [None]  # a call the server's tool parser could not read: made, but not valid
        return ToolAnswer(calls)

    tool_examples = [e for e in test if _decision_turn(e)]
    answers = served.ask_both(lambda m, e: served.answer(m, _context_and_expected(e)[0], e.tools), examples)
    tool_answers = served.ask_both(ask_tools, tool_examples)
    expected = [_context_and_expected(e)[1] for e in examples]
    expected_calls = [_decision_turn(e)[1] for e in tool_examples]
    metrics = {
        role: score(expected, role_answers)
        | (score_tool_calls(expected_calls, tool_answers[role]) if tool_examples else {})
        for role, role_answers in answers.items()
    }
    extra: dict[str, Any] = {}
    if tool_examples:
        extra["tool_samples"] = [
            {
                "line": e.line,
                "prompt": _decision_turn(e)[0][-1]["content"],
                "expected": _describe_calls(expected_calls[i]),
                "base": _describe_calls(tool_answers["base"][i].calls),
                "adapter": _describe_calls(tool_answers["adapter"][i].calls),
            }
            for i, e in enumerate(tool_examples[:samples])
        ]
    prompts = [_context_and_expected(e)[0][-1]["content"] for e in examples]
    return served.save(metrics, _samples([e.line for e in examples], prompts, expected, answers, samples), **extra)


def _samples(lines: list[int], prompts: list[str], expected: list[str], answers: dict[str, list[Answer]],
             count: int, **more: list[str]) -> list[dict[str, Any]]:
    """The first `count` test examples side by side; `more` adds other texts per example (e.g. the rejected answer)."""
    return [
        {"line": line, "prompt": prompts[i], "expected": expected[i], **{key: texts[i] for key, texts in more.items()},
         "base": answers["base"][i].text, "adapter": answers["adapter"][i].text}
        for i, line in enumerate(lines[:count])
    ]


def render_markdown(report: dict[str, Any], name: str) -> str:
    base, adapter = report["metrics"]["base"], report["metrics"]["adapter"]
    preference = report.get("method") == "dpo"
    split = "Held-out prompts of a preference (DPO) run" if preference else "Held-out test split"
    lines = [
        f"# Evaluation of `{name}`",
        "",
        f"{split}, {base['examples']} examples, greedy decoding (temperature 0), served by {report['url']}.",
        "",
    ]
    if preference:
        lines += [
            "A preference run has no single right answer: *preferred* is the answer the data preferred (what "
            "`exact_match` and `similarity` compare with), *non-preferred* the one it rejected. The trait is read "
            "from `mean_answer_tokens` / `median_answer_tokens` and `within_target_length` (the share of answers no "
            "longer than `target_tokens`, the longest preferred answer); `contains_preferred` is the share of "
            "answers that still say the preferred answer.",
            "",
        ]
    lines += [
        f"| metric | base (`{report['models']['base']}`) | adapter (`{report['models']['adapter']}`) |",
        "|---|---|---|",
    ]
    lines += [f"| {metric} | {base[metric]} | {adapter[metric]} |" for metric in base if metric != "examples"]
    lines += ["", "## Samples", ""]
    for sample in report.get("tool_samples", []):
        lines += [f"### tool choice, test example {sample['line']}", "", "**prompt**", "", _quote(sample["prompt"]), ""]
        lines += [f"**{who}**: `{sample[who]}`\n" for who in ("expected", "base", "adapter")]
    labels = {"expected": "preferred", "non_preferred": "non-preferred"} if preference else {}
    for sample in report["samples"]:
        lines += [f"### test example {sample['line']}", ""]
        for key in ("prompt", "expected", "non_preferred", "base", "adapter"):
            if key in sample:
                lines += [f"**{labels.get(key, key)}**", "", _quote(sample[key]), ""]
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


def contains_preferred(expected: list[str], answers: list[Answer]) -> float:
    """The share of answers that still say the preferred answer (case and a final full stop aside): a shorter
    answer is only better if it kept the content."""
    def norm(text: str) -> str:
        return " ".join(text.lower().split()).rstrip(".")

    return round(statistics.fmean(norm(e) in norm(a.text) for e, a in zip(expected, answers)), 4)


def _evaluate_preference(served: _Served, samples: int, target_tokens: int | None) -> dict[str, Any]:
    """Base vs adapter on a DPO run's held-out prompts: similarity to the preferred answer, whether the answer
    still holds it, and the length proxy."""
    from quiver.training.data import read_preference_examples

    examples = read_preference_examples(served.test_file)
    if not examples:
        raise ValueError(f"{served.run_dir} has no test examples to evaluate")
    target_tokens = target_tokens or preferred_target_tokens(served.run_dir, examples)
    answers = served.ask_both(lambda m, e: served.answer(m, e.messages, e.tools), examples)
    expected = [e.preferred["content"] or "" for e in examples]
    metrics = {
        role: {**score(expected, role_answers), "contains_preferred": contains_preferred(expected, role_answers),
               **length_metrics(role_answers, target_tokens)}
        for role, role_answers in answers.items()
    }
    samples_ = _samples([e.line for e in examples], [e.messages[-1]["content"] for e in examples], expected, answers,
                        samples, non_preferred=[e.non_preferred["content"] or "" for e in examples])
    return served.save(metrics, samples_, method="dpo")
