"""A suite's shape (what a caller writes) and a report's (what a run produces).

Everything a caller sends is bounded here: counts, lengths, patterns, schemas; the checks' logic is in
`checks.py`, running them in `runner.py`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from quiver.suites.patterns import compile_pattern, check_json_schema

MAX_CASES = 50
MAX_CHECKS_PER_CASE = 16
MAX_MESSAGES = 32
MAX_MESSAGE_CHARS = 16_000
MAX_TOOLS = 16
MAX_EXPECTED_CHARS = 4_096
MAX_PATTERN_CHARS = 512
MAX_CASE_TOKENS = 512  # per answer; a suite runs up to 3 answers per case (candidate, base, current)
MAX_SUITE_BYTES = 256 * 1024  # the suite as JSON
CASE_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_MESSAGE_CHARS)


class FunctionSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = Field(None, max_length=MAX_EXPECTED_CHARS)
    parameters: dict[str, Any] | None = None


class Tool(_Strict):
    type: Literal["function"] = "function"
    function: FunctionSpec


class ChatRequest(_Strict):
    """One chat request, sampled deterministically: temperature 0 and a fixed seed."""

    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | None = None
    max_tokens: int = Field(64, ge=1, le=MAX_CASE_TOKENS)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    temperature: Literal[0] = 0

    def body(self, model: str) -> dict[str, Any]:
        """The OpenAI chat-completions body for `model`."""
        body = self.model_dump(mode="json", exclude_none=True)
        return {"model": model, "stream": False, **body}


# --- checks -----------------------------------------------------------------------------------------


class ExactCheck(_Strict):
    type: Literal["exact"]
    value: str = Field(max_length=MAX_EXPECTED_CHARS)
    strip: bool = Field(True, description="compare without leading/trailing whitespace")


class ContainsCheck(_Strict):
    type: Literal["contains"]
    value: str = Field(min_length=1, max_length=MAX_EXPECTED_CHARS)
    ignore_case: bool = False


class RegexCheck(_Strict):
    type: Literal["regex"]
    pattern: str = Field(min_length=1, max_length=MAX_PATTERN_CHARS,
                         description="RE2 syntax (no backreferences or look-around), searched anywhere in the answer")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        compile_pattern(pattern)
        return pattern


class JsonCheck(_Strict):
    type: Literal["json"]


class JsonSchemaCheck(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: Literal["json_schema"]
    json_schema: dict[str, Any] = Field(alias="schema", description="JSON Schema (draft 2020-12); patterns in RE2; no `$ref`, no `patternProperties`")

    @field_validator("json_schema")
    @classmethod
    def _valid_schema(cls, schema: dict[str, Any]) -> dict[str, Any]:
        check_json_schema(schema)
        return schema


class ToolCallCheck(_Strict):
    type: Literal["tool_call"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    arguments: dict[str, Any] | None = Field(
        None, description="each key given must have this value in the call's arguments (others may be present)")


class MaxTokensCheck(_Strict):
    type: Literal["max_tokens"]
    value: int = Field(ge=1, le=MAX_CASE_TOKENS)


class NotWorseThanCheck(_Strict):
    """The case's score (the share of its other checks passed) is at least the reference's minus `margin`."""

    type: Literal["not_worse_than"]
    reference: Literal["base", "current"]
    margin: float = Field(0.0, ge=0.0, le=1.0)


Check = Annotated[
    Union[ExactCheck, ContainsCheck, RegexCheck, JsonCheck, JsonSchemaCheck, ToolCallCheck, MaxTokensCheck,
          NotWorseThanCheck],
    Field(discriminator="type"),
]


# The checks that judge any answer, whatever its prompt: a canary's live checks score sampled live traffic.
LiveCheck = Annotated[
    Union[ContainsCheck, RegexCheck, JsonCheck, JsonSchemaCheck, MaxTokensCheck],
    Field(discriminator="type"),
]


class Case(_Strict):
    id: str = Field(pattern=CASE_ID)
    request: ChatRequest
    checks: list[Check] = Field(min_length=1, max_length=MAX_CHECKS_PER_CASE)

    @model_validator(mode="after")
    def _coherent(self) -> Case:
        scored = [check for check in self.checks if not isinstance(check, NotWorseThanCheck)]
        if len(scored) < len(self.checks) and not scored:
            raise ValueError("a `not_worse_than` check compares the case's score, so the case needs another check")
        if any(isinstance(check, ToolCallCheck) for check in self.checks) and not self.request.tools:
            raise ValueError("a `tool_call` check needs `request.tools`")
        return self


class SuiteSpec(_Strict):
    """What a caller writes (PUT /v1/adapters/{name}/suite, or `suite.json` uploaded with a version)."""

    description: str | None = Field(None, max_length=MAX_EXPECTED_CHARS)
    min_pass_rate: float = Field(1.0, ge=0.0, le=1.0, description="share of cases that must pass for the gate")
    cases: list[Case] = Field(min_length=1, max_length=MAX_CASES)
    live_checks: list[LiveCheck] = Field(
        default_factory=list, max_length=MAX_CHECKS_PER_CASE,
        description="checks any answer of this name should pass (contains, regex, json, json_schema, max_tokens): "
                    "a canary with rollback.live_sample_rate scores sampled live traffic of both versions with them")

    @field_validator("cases")
    @classmethod
    def _unique_ids(cls, cases: list[Case]) -> list[Case]:
        seen: set[str] = set()
        for case in cases:
            if case.id in seen:
                raise ValueError(f"case id `{case.id}` appears more than once")
            seen.add(case.id)
        return cases

    def references(self) -> set[str]:
        return {check.reference for case in self.cases for check in case.checks if isinstance(check, NotWorseThanCheck)}


class Suite(SuiteSpec):
    """A stored suite: the name's suite number `version` (1, 2, ... each PUT or upload a new one)."""

    object: Literal["adapter.suite"] = "adapter.suite"
    name: str
    version: int
    created_at: int


# --- reports ----------------------------------------------------------------------------------------


class ToolCallSeen(BaseModel):
    name: str
    arguments: str


class Answer(BaseModel):
    """One model's answer to a case (or the error it gave instead)."""

    model: str
    text: str | None = None
    tool_calls: list[ToolCallSeen] = Field(default_factory=list)
    completion_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    score: float | None = Field(None, description="share of the case's non-comparison checks this answer passes")


class CheckResult(BaseModel):
    type: str
    passed: bool
    detail: str


class CaseResult(BaseModel):
    id: str
    passed: bool
    checks: list[CheckResult]
    answers: dict[str, Answer] = Field(description="`candidate`, and `base` / `current` when a check compares")


class Override(BaseModel):
    by: str
    at: int
    reason: str | None = None


class Report(BaseModel):
    object: Literal["adapter.suite_report"] = "adapter.suite_report"
    adapter: str
    version: int | None = Field(description="the version run; null when a suite ran against another model")
    model: str = Field(description="the model id the candidate answers came from")
    suite_version: int | None
    created_at: int
    passed: bool
    passed_cases: int
    total_cases: int
    min_pass_rate: float
    references: dict[str, str] = Field(default_factory=dict, description="`base`/`current` -> the model id used")
    cases: list[CaseResult]
    override: Override | None = Field(None, description="an admin promoted this version although it failed")
