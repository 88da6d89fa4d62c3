"""Each check's verdict on one answer. Pure functions: no engine, no I/O."""

from __future__ import annotations

from typing import Any

from quiver.limits import loads_bounded
from quiver.suites.patterns import compile_pattern, schema_errors
from quiver.suites.protocol import (
    Answer,
    Case,
    CheckResult,
    ContainsCheck,
    ExactCheck,
    JsonCheck,
    JsonSchemaCheck,
    MaxTokensCheck,
    NotWorseThanCheck,
    RegexCheck,
    ToolCallCheck,
)

_SHOWN = 120  # characters of an answer quoted in a failure's detail


def _quote(text: str) -> str:
    return repr(text if len(text) <= _SHOWN else text[:_SHOWN] + "…")


def _parse_json(text: str) -> tuple[bool, Any, str]:
    try:
        return True, loads_bounded(text), ""
    except ValueError as exc:
        return False, None, f"not valid JSON ({str(exc)[:100]})"


def _arguments_match(expected: dict[str, Any], raw: str) -> tuple[bool, str]:
    ok, arguments, why = _parse_json(raw)
    if not ok:
        return False, f"its arguments are {why}"
    if not isinstance(arguments, dict):
        return False, "its arguments are not a JSON object"
    for key, value in expected.items():
        if key not in arguments:
            return False, f"its arguments lack `{key}`"
        if arguments[key] != value:
            return False, f"argument `{key}` is {_quote(repr(arguments[key]))}, expected {_quote(repr(value))}"
    return True, ""


def check_answer(check: Any, answer: Answer) -> CheckResult:
    """The verdict of one non-comparison check."""
    kind = check.type
    if answer.error is not None:
        return CheckResult(type=kind, passed=False, detail=f"no answer: {answer.error}")
    text = answer.text or ""
    if isinstance(check, ExactCheck):
        got, want = (text.strip(), check.value.strip()) if check.strip else (text, check.value)
        passed = got == want
        return CheckResult(type=kind, passed=passed, detail="" if passed else f"expected {_quote(want)}, got {_quote(got)}")
    if isinstance(check, ContainsCheck):
        haystack, needle = (text.casefold(), check.value.casefold()) if check.ignore_case else (text, check.value)
        passed = needle in haystack
        return CheckResult(type=kind, passed=passed, detail="" if passed else f"{_quote(check.value)} not found")
    if isinstance(check, RegexCheck):
        passed = compile_pattern(check.pattern).search(text) is not None
        return CheckResult(type=kind, passed=passed, detail="" if passed else f"no match for /{check.pattern}/")
    if isinstance(check, JsonCheck):
        passed, _, why = _parse_json(text)
        return CheckResult(type=kind, passed=passed, detail=why)
    if isinstance(check, JsonSchemaCheck):
        parsed, value, why = _parse_json(text)
        if not parsed:
            return CheckResult(type=kind, passed=False, detail=why)
        error = schema_errors(check.json_schema, value)
        return CheckResult(type=kind, passed=error is None, detail=error or "")
    if isinstance(check, ToolCallCheck):
        calls = [call for call in answer.tool_calls if call.name == check.name]
        if not calls:
            seen = ", ".join(call.name for call in answer.tool_calls) or "none"
            return CheckResult(type=kind, passed=False, detail=f"no call of `{check.name}` (calls: {seen})")
        if check.arguments is None:
            return CheckResult(type=kind, passed=True, detail="")
        reasons = []
        for call in calls:
            matched, why = _arguments_match(check.arguments, call.arguments)
            if matched:
                return CheckResult(type=kind, passed=True, detail="")
            reasons.append(why)
        return CheckResult(type=kind, passed=False, detail=f"`{check.name}` was called but {reasons[0]}")
    if isinstance(check, MaxTokensCheck):
        if answer.completion_tokens is None:
            return CheckResult(type=kind, passed=False, detail="the server reported no token usage")
        passed = answer.completion_tokens <= check.value
        return CheckResult(type=kind, passed=passed,
                           detail="" if passed else f"{answer.completion_tokens} tokens, at most {check.value} allowed")
    raise TypeError(f"not an absolute check: {kind}")  # NotWorseThanCheck goes through `score_case`


def score(case: Case, answer: Answer) -> tuple[float, list[CheckResult]]:
    """The share of the case's non-comparison checks `answer` passes, and their verdicts."""
    results = [check_answer(check, answer) for check in case.checks if not isinstance(check, NotWorseThanCheck)]
    return sum(result.passed for result in results) / len(results), results


def judge_case(case: Case, answers: dict[str, Answer]) -> list[CheckResult]:
    """Every check's verdict, in the case's order; `answers` holds `candidate` and the references it compares to
    (a reference missing from it, e.g. no current version yet, makes its comparison pass, saying so)."""
    candidate = answers["candidate"]
    candidate.score, absolute = score(case, candidate)
    for role, answer in answers.items():
        if role != "candidate":
            answer.score, _ = score(case, answer)
    verdicts = iter(absolute)
    results: list[CheckResult] = []
    for check in case.checks:
        if not isinstance(check, NotWorseThanCheck):
            results.append(next(verdicts))
            continue
        reference = answers.get(check.reference)
        if reference is None:
            results.append(CheckResult(type=check.type, passed=True,
                                       detail=f"no {check.reference} version to compare with"))
        elif reference.error is not None:
            results.append(CheckResult(type=check.type, passed=False,
                                       detail=f"the {check.reference} model gave no answer: {reference.error}"))
        else:
            passed = candidate.score + 1e-9 >= reference.score - check.margin  # type: ignore[operator]
            results.append(CheckResult(
                type=check.type, passed=passed,
                detail=f"score {candidate.score:.2f} vs {check.reference} {reference.score:.2f}"
                       + (f" (margin {check.margin:.2f})" if check.margin else "")))
    return results
