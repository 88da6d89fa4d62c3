"""Running a suite: the same code inside the server (the gate) and from the CLI (`quiver suite run`).

The only thing that differs is how a chat request is sent: a `Complete` callable takes an OpenAI
chat-completions body and returns the parsed answer, or raises `CallFailed` (recorded as that model's answer).
"""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable

from quiver.suites.checks import judge_case
from quiver.suites.protocol import Answer, CaseResult, Report, SuiteSpec, ToolCallSeen

Complete = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
_KEPT_CHARS = 8_000  # of an answer, in the report


class CallFailed(Exception):
    """A model refused or failed one case's request; the case fails, the run goes on."""


def parse_answer(model: str, completion: Any) -> Answer:
    try:
        choice = completion["choices"][0]
        message = choice.get("message") or {}
        # A chat answer's message, or a completion's text (a canary's sampled traffic may be either).
        text = message.get("content") if "message" in choice else choice.get("text")
        calls = [
            ToolCallSeen(name=str(call["function"]["name"]), arguments=str(call["function"].get("arguments") or ""))
            for call in message.get("tool_calls") or ()
        ]
        usage = completion.get("usage") or {}
        tokens = usage.get("completion_tokens")
        return Answer(model=model, text=text[:_KEPT_CHARS] if isinstance(text, str) else None, tool_calls=calls,
                      completion_tokens=tokens if isinstance(tokens, int) else None,
                      finish_reason=choice.get("finish_reason"))
    except (KeyError, IndexError, TypeError, AttributeError):
        return Answer(model=model, error="the answer is not a chat completion")


async def _answer(complete: Complete, model: str, body: dict[str, Any]) -> Answer:
    try:
        return parse_answer(model, await complete(body))
    except CallFailed as exc:
        return Answer(model=model, error=str(exc)[:500])


async def run_suite(
    suite: SuiteSpec,
    complete: Complete,
    candidate: str,
    references: dict[str, str | None],
    *,
    adapter: str,
    version: int | None,
    suite_version: int | None,
) -> Report:
    """Run every case on `candidate` (and on `references[r]` for the cases comparing to `r`; None: nothing to
    compare with). Cases run one after another: a suite must not crowd out live traffic."""
    used = {role: model for role, model in references.items() if model is not None and role in suite.references()}
    results: list[CaseResult] = []
    for case in suite.cases:
        answers = {"candidate": await _answer(complete, candidate, case.request.body(candidate))}
        for role in sorted({check.reference for check in case.checks if getattr(check, "reference", None)}):
            if role in used:
                answers[role] = await _answer(complete, used[role], case.request.body(used[role]))
        checks = judge_case(case, answers)
        results.append(CaseResult(id=case.id, passed=all(check.passed for check in checks), checks=checks,
                                  answers=answers))
    passed_cases = sum(result.passed for result in results)
    return Report(
        adapter=adapter, version=version, model=candidate, suite_version=suite_version, created_at=int(time.time()),
        passed=passed_cases >= suite.min_pass_rate * len(results) - 1e-9, passed_cases=passed_cases,
        total_cases=len(results), min_pass_rate=suite.min_pass_rate, references=used, cases=results,
    )


def _cell(answer: Answer | None) -> str:
    if answer is None:
        return ""
    if answer.error is not None:
        text = f"*error: {answer.error}*"
    else:
        text = answer.text or ""
        if answer.tool_calls:
            text += "".join(f" `{call.name}({call.arguments})`" for call in answer.tool_calls)
        text = text or "*(empty)*"
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")
    extra = [f"{answer.completion_tokens} tokens"] if answer.completion_tokens is not None else []
    if answer.score is not None:
        extra.append(f"score {answer.score:.2f}")
    return text + (f"<br>*({', '.join(extra)})*" if extra else "")


def render_markdown(report: Report) -> str:
    """The report as a page for people: the verdict, then each case with its checks and its answers side by side."""
    title = f"{report.adapter}@{report.version}" if report.version is not None else report.model
    verdict = "PASSED" if report.passed else "FAILED"
    lines = [
        f"# Suite report: {title}",
        "",
        f"**{verdict}**: {report.passed_cases}/{report.total_cases} cases passed "
        f"(needs {report.min_pass_rate:.0%}); suite version {report.suite_version or 'local'}; "
        f"run at {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(report.created_at))}.",
    ]
    if report.references:
        lines += ["", "Compared with: " + ", ".join(f"{role} = `{model}`" for role, model in report.references.items())]
    if report.override is not None:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(report.override.at))
        lines += ["", f"**Promoted anyway** by {report.override.by} at {when}"
                  + (f": {report.override.reason}" if report.override.reason else "")]
    for case in report.cases:
        lines += ["", f"## {'✅' if case.passed else '❌'} {case.id}", "", "| check | result | detail |", "|---|---|---|"]
        for check in case.checks:
            detail = check.detail.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {check.type} | {'pass' if check.passed else '**FAIL**'} | {detail} |")
        roles = list(case.answers)
        lines += ["", "| " + " | ".join(f"{role} (`{case.answers[role].model}`)" for role in roles) + " |",
                  "|" + "---|" * len(roles), "| " + " | ".join(_cell(case.answers[role]) for role in roles) + " |"]
    return "\n".join(lines) + "\n"
