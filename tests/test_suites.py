"""Suites and the gate on the fake engine (fast): the checks' logic, a suite's validation (clear 400s for every
bound), the gate's flow through the registry (staged failures, reports, overrides), the CLI runner and the
trainer's display. What crosses the real engine is in test_suites_engine.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from quiver.errors import InvalidRequest, PayloadTooLarge
from quiver.fake_engine import FakeEngine, fake_text
from quiver.settings import Settings
from quiver.suites.checks import check_answer, judge_case
from quiver.suites.protocol import MAX_CASES, Answer, Case, ToolCallSeen
from quiver.suites.runner import parse_answer, render_markdown
from quiver.suites.service import parse_suite
from quiver.testing import ADMIN_KEY, API_KEY, InProcessGateway
from s3_fixtures import moto_s3  # noqa: F401  (the S3 backend's server)
from test_adapter_stores import Backend, backend  # noqa: F401  (the fixture: both store backends)

BASE = "SmolLM2-135M-Instruct"
ASK = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def case(*checks: dict, request: dict | None = None, case_id: str = "c1") -> dict:
    return {"id": case_id, "request": request or ASK, "checks": list(checks)}


def suite(*cases: dict, **extra) -> dict:
    return {"cases": list(cases), **extra}


def answer(text: str | None = "", **fields) -> Answer:
    return Answer(model="m", text=text, **fields)


def verdict(check: dict, got: Answer, request: dict | None = None) -> tuple[bool, str]:
    parsed = Case.model_validate(case(check, request=request))
    result = check_answer(parsed.checks[0], got)
    return result.passed, result.detail


# --- the checks -------------------------------------------------------------------------------------

TOOLS = [{"type": "function", "function": {"name": "get_weather",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.mark.parametrize("check, text, passed", [
    ({"type": "exact", "value": "Arr, matey"}, "  Arr, matey\n", True),
    ({"type": "exact", "value": "Arr, matey", "strip": False}, "Arr, matey\n", False),
    ({"type": "exact", "value": "Arr"}, "Arr!", False),
    ({"type": "contains", "value": "treasure"}, "where be the treasure?", True),
    ({"type": "contains", "value": "TREASURE"}, "where be the treasure?", False),
    ({"type": "contains", "value": "TREASURE", "ignore_case": True}, "where be the treasure?", True),
    ({"type": "regex", "pattern": r"^Arr\b"}, "Arr, matey", True),
    ({"type": "regex", "pattern": r"\d{3}-\d{4}"}, "call 555-1234 now", True),
    ({"type": "regex", "pattern": r"^\d+$"}, "12a", False),
    ({"type": "json"}, '{"a": [1, 2]}', True),
    ({"type": "json"}, "{'a': 1}", False),
    ({"type": "json_schema", "schema": {"type": "object", "required": ["name"],
                                         "properties": {"name": {"type": "string", "pattern": "^[A-Z]"}}}},
     '{"name": "Ann"}', True),
    ({"type": "json_schema", "schema": {"type": "object", "required": ["name"]}}, '{"nom": "Ann"}', False),
    ({"type": "json_schema", "schema": {"type": "object", "properties": {"name": {"pattern": "^[A-Z]"}}}},
     '{"name": "ann"}', False),
    ({"type": "json_schema", "schema": {"type": "array"}}, "not json", False),
])
def test_text_checks(check: dict, text: str, passed: bool) -> None:
    ok, detail = verdict(check, answer(text))
    assert ok is passed
    assert (detail == "") is passed or check["type"] == "json" and passed  # a failure always says why


def test_failures_say_what_was_expected_and_what_came() -> None:
    assert verdict({"type": "exact", "value": "yes"}, answer("no")) == (False, "expected 'yes', got 'no'")
    ok, detail = verdict({"type": "json_schema", "schema": {"type": "object", "required": ["name"]}}, answer("{}"))
    assert not ok and "'name' is a required property" in detail
    ok, detail = verdict({"type": "max_tokens", "value": 4}, answer("x", completion_tokens=9))
    assert (ok, detail) == (False, "9 tokens, at most 4 allowed")
    assert verdict({"type": "max_tokens", "value": 4}, answer("x", completion_tokens=4)) == (True, "")
    assert verdict({"type": "max_tokens", "value": 4}, answer("x"))[0] is False  # no usage: not a pass
    # no answer at all (the engine refused the request): every check fails, saying so
    ok, detail = verdict({"type": "contains", "value": "x"}, answer(None, error="400: bad"))
    assert (ok, detail) == (False, "no answer: 400: bad")


def test_tool_call_checks() -> None:
    request = {**ASK, "tools": TOOLS}
    called = answer(None, tool_calls=[ToolCallSeen(name="get_weather", arguments='{"city": "Paris", "unit": "C"}')])
    assert verdict({"type": "tool_call", "name": "get_weather"}, called, request) == (True, "")
    assert verdict({"type": "tool_call", "name": "get_weather", "arguments": {"city": "Paris"}}, called, request)[0]
    ok, detail = verdict({"type": "tool_call", "name": "get_weather", "arguments": {"city": "Rome"}}, called, request)
    assert not ok and "argument `city`" in detail
    ok, detail = verdict({"type": "tool_call", "name": "get_time"}, called, request)
    assert (ok, detail) == (False, "no call of `get_time` (calls: get_weather)")
    garbled = answer(None, tool_calls=[ToolCallSeen(name="get_weather", arguments="{city: Paris")])
    ok, detail = verdict({"type": "tool_call", "name": "get_weather", "arguments": {"city": "Paris"}}, garbled, request)
    assert not ok and "not valid JSON" in detail


def test_parse_answer_reads_text_tool_calls_and_usage() -> None:
    completion = {"choices": [{"finish_reason": "tool_calls", "message": {
        "content": None, "tool_calls": [{"id": "1", "type": "function",
                                         "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}}],
        "usage": {"completion_tokens": 7}}
    parsed = parse_answer("bot@1", completion)
    assert parsed.tool_calls == [ToolCallSeen(name="get_weather", arguments='{"city": "Oslo"}')]
    assert (parsed.text, parsed.completion_tokens, parsed.finish_reason) == (None, 7, "tool_calls")
    assert parse_answer("bot@1", {"nonsense": 1}).error == "the answer is not a chat completion"


def test_comparisons_score_the_other_checks_against_the_reference() -> None:
    spec = Case.model_validate(case({"type": "contains", "value": "arr"}, {"type": "regex", "pattern": "^A"},
                                    {"type": "not_worse_than", "reference": "base"},
                                    {"type": "not_worse_than", "reference": "current", "margin": 0.25}))
    # candidate 1/2 (no "arr"), base 1/2 ("Arr" is not "arr"), current 2/2
    answers = {"candidate": answer("Aye"), "base": answer("Arr"), "current": answer("Ahoy arr")}
    results = judge_case(spec, answers)
    assert (answers["candidate"].score, answers["base"].score, answers["current"].score) == (0.5, 0.5, 1.0)
    assert [r.passed for r in results] == [False, True, True, False]
    assert results[2].detail == "score 0.50 vs base 0.50"
    assert results[3].detail == "score 0.50 vs current 1.00 (margin 0.25)"
    relaxed = Case.model_validate(case({"type": "contains", "value": "arr"}, {"type": "regex", "pattern": "^A"},
                                       {"type": "not_worse_than", "reference": "current", "margin": 0.5}))
    assert judge_case(relaxed, {"candidate": answer("Aye"), "current": answer("Ahoy arr")})[2].passed
    # no current version yet (a name's first version): the comparison passes and says why
    first = judge_case(spec, {"candidate": answer("Arr"), "base": answer("Arr")})
    assert first[3].passed and first[3].detail == "no current version to compare with"
    # a reference that gave no answer cannot vouch for the candidate
    broken = judge_case(spec, {"candidate": answer("Arr"), "base": answer(None, error="boom"), "current": answer("x")})
    assert not broken[2].passed and "boom" in broken[2].detail


def test_hostile_patterns_run_in_linear_time() -> None:
    evil = "(a+)+$"  # catastrophic backtracking for Python's `re`
    text = "a" * 50_000 + "!"
    started = time.monotonic()
    assert verdict({"type": "regex", "pattern": evil}, answer(text))[0] is False
    schema = {"type": "object", "properties": {"s": {"type": "string", "pattern": evil}}}
    assert verdict({"type": "json_schema", "schema": schema}, answer(json.dumps({"s": text})))[0] is False
    assert time.monotonic() - started < 2


# --- validation --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, where, says", [
    (suite(case({"type": "regex", "pattern": r"(a)\1"})), "cases.0.checks.0.regex.pattern", "RE2"),
    (suite(case({"type": "regex", "pattern": "(?=a)"})), "cases.0.checks.0.regex.pattern", "look-around"),
    (suite(case({"type": "regex", "pattern": "a" * 513})), "cases.0.checks.0.regex.pattern", "at most 512"),
    (suite(case({"type": "regex", "pattern": "(a{1000}){1000}"})), "cases.0.checks.0.regex.pattern", "bounded"),
    (suite(case({"type": "json_schema", "schema": {"type": "nope"}})), "cases.0.checks.0.json_schema.schema",
     "not a valid JSON Schema"),
    (suite(case({"type": "json_schema", "schema": {"$ref": "http://169.254.169.254/latest"}})),
     "cases.0.checks.0.json_schema.schema", "`$ref` is not supported"),
    (suite(case({"type": "json_schema", "schema": {"$ref": "#"}})),  # would recurse without end
     "cases.0.checks.0.json_schema.schema", "`$ref` is not supported"),
    (suite(case({"type": "json_schema", "schema": {"$defs": {"a": {"$dynamicRef": "#a"}}}})),
     "cases.0.checks.0.json_schema.schema", "`$dynamicRef` is not supported"),
    (suite(case({"type": "json_schema", "schema": {"patternProperties": {"^a": {}}}})),
     "cases.0.checks.0.json_schema.schema", "patternProperties"),
    (suite(case({"type": "json_schema", "schema": {"properties": {"a": {"pattern": "(?<=x)"}}}})),
     "cases.0.checks.0.json_schema.schema", "RE2"),
    (suite(case({"type": "not_worse_than", "reference": "base"})), "cases.0", "needs another check"),
    (suite(case({"type": "not_worse_than", "reference": "yesterday"})), "cases.0.checks.0.not_worse_than.reference",
     "'base' or 'current'"),
    (suite(case({"type": "tool_call", "name": "f"})), "cases.0", "needs `request.tools`"),
    (suite(case({"type": "sounds_good"})), "cases.0.checks.0", "does not match any of the expected tags"),
    (suite(case({"type": "contains", "value": ""})), "cases.0.checks.0.contains.value", "at least 1"),
    (suite(case({"type": "max_tokens", "value": 10_000})), "cases.0.checks.0.max_tokens.value", "less than or equal"),
    (suite(case({"type": "json"}, request={**ASK, "temperature": 0.7})), "cases.0.request.temperature", "0"),
    (suite(case({"type": "json"}, request={**ASK, "max_tokens": 100_000})), "cases.0.request.max_tokens",
     "less than or equal"),
    (suite(case({"type": "json"}, request={"messages": []})), "cases.0.request.messages", "at least 1"),
    (suite(case({"type": "json"}, request={"messages": [{"role": "user", "content": "x" * 16_001}]})),
     "cases.0.request.messages.0.content", "at most 16000"),
    (suite(case({"type": "json"}), case({"type": "json"})), "cases", "appears more than once"),
    (suite(case({"type": "json"}, case_id="no spaces")), "cases.0.id", "should match pattern"),
    (suite(*[case({"type": "json"}, case_id=f"c{i}") for i in range(MAX_CASES + 1)]), "cases", f"at most {MAX_CASES}"),
    (suite(case(*[{"type": "json"}] * 17)), "cases.0.checks", "at most 16"),
    (suite(), "cases", "at least 1"),
    (suite(case({"type": "json"}), min_pass_rate=1.5), "min_pass_rate", "less than or equal"),
    (suite(case({"type": "json"}), extra_field=1), "extra_field", "Extra inputs"),
])
def test_invalid_suites_are_refused_with_the_place_and_the_reason(bad: dict, where: str, says: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse_suite(json.dumps(bad).encode())
    assert refused.value.code == "invalid_suite" and refused.value.param == where, refused.value.message
    assert says in refused.value.message


def test_malformed_oversized_and_deep_suites_are_refused() -> None:
    for raw in (b"{", b"\xff", b"[" * 100 + b"]" * 100):
        with pytest.raises(InvalidRequest, match="not valid JSON|deeper than"):
            parse_suite(raw)
    huge = suite(*[case({"type": "contains", "value": "x" * 4000}, request={"messages": [
        {"role": "user", "content": "y" * 15_000}]}, case_id=f"c{i}") for i in range(20)])
    with pytest.raises(PayloadTooLarge):
        parse_suite(json.dumps(huge).encode())


# --- the gate, through the API ---------------------------------------------------------------------------


@pytest.fixture
def gateway(model_dir: Path, tmp_path: Path):
    settings = Settings(model_cache_dir=model_dir.parent, store_dir=tmp_path / "store", state_dir=tmp_path / "state",
                        finetuning_dir=tmp_path / "ft", admin_keys=[ADMIN_KEY], api_keys=[API_KEY], store_poll_s=0)
    gateway = InProcessGateway(settings, FakeEngine(BASE)).start()
    yield gateway
    gateway.stop()


# The fake engine answers `model` with "model#0 model#1 ...": a check can tell versions apart.
def only_version(n: int) -> dict:
    return suite(case({"type": "regex", "pattern": f"^bot@{n}#0 "}, {"type": "max_tokens", "value": 3}))


def test_a_failing_version_stays_staged_with_its_report(gateway: InProcessGateway, fake_adapter: Path) -> None:
    admin = gateway.admin()
    stored = admin.put("/v1/adapters/bot/suite", json=only_version(1))  # a suite before the name's first version
    assert stored.status_code == 200 and stored.json()["version"] == 1
    assert admin.get("/v1/adapters/bot/suite").json()["cases"] == stored.json()["cases"]

    first = gateway.register("bot", fake_adapter).json()
    assert first["current"] and first["gate"] == {"passed": True, "passed_cases": 1, "total_cases": 1,
                                                  "suite_version": 1, "report": "/v1/adapters/bot@1/report"}
    second = gateway.register("bot", fake_adapter)
    assert second.status_code == 201
    assert not second.json()["current"] and second.json()["gate"]["passed"] is False
    assert admin.get("/v1/adapters/bot").json()["current_version"] == 1
    client = gateway.openai()
    assert client.chat.completions.create(model="bot", messages=ASK["messages"],
                                          max_tokens=3).choices[0].message.content == fake_text("bot@1", 3)
    # the staged version still serves when pinned (to look at it), never under the bare name
    assert client.chat.completions.create(model="bot@2", messages=ASK["messages"],
                                          max_tokens=3).choices[0].message.content == fake_text("bot@2", 3)

    report = admin.get("/v1/adapters/bot@2/report").json()
    assert (report["passed"], report["passed_cases"], report["total_cases"], report["suite_version"]) == (False, 0, 1, 1)
    [result] = report["cases"]
    assert [(c["type"], c["passed"]) for c in result["checks"]] == [("regex", False), ("max_tokens", True)]
    assert result["answers"]["candidate"]["text"] == fake_text("bot@2", 3)
    page = admin.get("/v1/adapters/bot@2/report.md")
    assert page.headers["content-type"].startswith("text/markdown")
    assert "**FAILED**: 0/1" in page.text and "| regex | **FAIL** | no match for /^bot@1#0 /" in page.text
    assert fake_text("bot@2", 3).strip() in page.text

    # promote refuses a failed version unless overridden, and records who and when
    refused = admin.post("/v1/adapters/bot/promote", json={"version": 2})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "gate_failed"
    assert "/v1/adapters/bot@2/report" in refused.json()["error"]["message"]
    assert admin.get("/v1/adapters/bot").json()["current_version"] == 1
    before = int(time.time())
    promoted = admin.post("/v1/adapters/bot/promote", json={"version": 2, "override_gate": True, "reason": "hotfix"})
    assert promoted.status_code == 200 and promoted.json()["current_version"] == 2
    override = admin.get("/v1/adapters/bot@2/report").json()["override"]
    assert override["by"].startswith("key sha256:") and ADMIN_KEY not in override["by"]
    assert override["at"] >= before and override["reason"] == "hotfix"
    assert "**Promoted anyway** by key sha256:" in admin.get("/v1/adapters/bot@2/report.md").text
    # a passing version promotes as before, no override needed
    assert admin.post("/v1/adapters/bot/promote", json={"version": 1}).status_code == 200


def test_comparisons_run_the_base_and_the_current_version(gateway: InProcessGateway, fake_adapter: Path) -> None:
    admin = gateway.admin()
    assert gateway.register("bot", fake_adapter).json()["gate"] is None  # no suite: no gate, current at once
    compare = suite(case({"type": "regex", "pattern": "#2 $"}, {"type": "not_worse_than", "reference": "current"},
                         {"type": "not_worse_than", "reference": "base"}))
    admin.put("/v1/adapters/bot/suite", json=compare)
    record = gateway.register("bot", fake_adapter).json()
    assert record["gate"]["passed"] and record["current"]
    report = admin.get("/v1/adapters/bot@2/report").json()
    assert report["references"] == {"base": BASE, "current": "bot@1"}
    answers = report["cases"][0]["answers"]
    assert {role: a["text"] for role, a in answers.items()} == {
        "candidate": fake_text("bot@2", 3), "current": fake_text("bot@1", 3), "base": fake_text(BASE, 3)}
    assert "| candidate (`bot@2`) | base (`SmolLM2-135M-Instruct`) | current (`bot@1`) |" in \
        admin.get("/v1/adapters/bot@2/report.md").text


def test_a_suite_uploaded_with_a_version_gates_it(gateway: InProcessGateway, fake_adapter: Path, tmp_path: Path) -> None:
    folder = tmp_path / "with-suite"
    folder.mkdir()
    for path in fake_adapter.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "suite.json").write_text(json.dumps(only_version(7)))
    record = gateway.register("bot", folder).json()
    assert record["gate"]["passed"] is False and record["current"] is False
    assert "suite.json" not in {f["name"] for f in record["files"]}
    assert gateway.admin().get("/v1/adapters/bot/suite").json()["cases"][0]["checks"][0]["pattern"] == "^bot@7#0 "
    assert gateway.admin().get("/v1/adapters/bot").json()["current_version"] is None

    # a broken suite.json refuses the registration before anything is stored
    (folder / "suite.json").write_text(json.dumps(suite(case({"type": "regex", "pattern": "(a)\\1"}))))
    refused = gateway.register("bot", folder)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_suite"
    assert refused.json()["error"]["param"] == "cases.0.checks.0.regex.pattern"
    assert [v["version"] for v in gateway.admin().get("/v1/adapters/bot").json()["versions"]] == [1]
    assert gateway.admin().get("/v1/adapters/bot/suite").json()["version"] == 1


def test_make_current_false_stays_staged_even_when_passing(gateway: InProcessGateway, fake_adapter: Path) -> None:
    gateway.admin().put("/v1/adapters/bot/suite", json=only_version(1))
    record = gateway.register("bot", fake_adapter, make_current="false").json()
    assert record["gate"]["passed"] and not record["current"]


def test_suite_routes_refuse_bad_input_in_the_envelope(gateway: InProcessGateway, fake_adapter: Path) -> None:
    admin = gateway.admin()
    bad = admin.put("/v1/adapters/bot/suite", json=suite(case({"type": "regex", "pattern": "(?=x)"})))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "cases.0.checks.0.regex.pattern"
    assert admin.put("/v1/adapters/bot/suite", content=b"[" * 200 + b"]" * 200,
                     headers={"content-type": "application/json"}).json()["error"]["code"] == "json_too_deep"
    assert admin.put(f"/v1/adapters/{BASE}/suite", json=only_version(1)).status_code == 400
    assert admin.put("/v1/adapters/bot@2/suite", json=only_version(1)).status_code == 400
    missing = admin.get("/v1/adapters/bot/suite")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "suite_not_found"
    assert gateway.register("bot", fake_adapter).status_code == 201
    assert admin.get("/v1/adapters/bot@1/report").json()["error"]["code"] == "report_not_found"
    assert admin.get("/v1/adapters/bot@9/report").json()["error"]["code"] == "version_not_found"
    assert admin.get("/v1/adapters/bot/report").status_code == 400
    assert admin.get("/v1/adapters/nobody@1/report").status_code == 404
    # admin routes: an inference key may not read or set suites
    as_user = httpx.put(f"{gateway.base_url}/v1/adapters/bot/suite", json=only_version(1),
                        headers={"Authorization": f"Bearer {API_KEY}"})
    assert as_user.status_code == 403


def test_the_cli_runs_a_suite_against_a_server(gateway: InProcessGateway, fake_adapter: Path, tmp_path: Path) -> None:
    from quiver.cli import app

    admin = gateway.admin()
    admin.put("/v1/adapters/bot/suite", json=only_version(1))
    gateway.register("bot", fake_adapter)
    gateway.register("bot", fake_adapter)
    runner = CliRunner()
    common = ["--url", gateway.base_url, "--api-key", API_KEY, "--admin-key", ADMIN_KEY]
    passed = runner.invoke(app, ["suite", "run", "bot@1", *common, "--json", str(tmp_path / "r.json")])
    assert passed.exit_code == 0, passed.output
    assert "**PASSED**: 1/1" in passed.stdout
    assert json.loads((tmp_path / "r.json").read_text())["model"] == "bot@1"
    failed = runner.invoke(app, ["suite", "run", "bot@2", *common])
    assert failed.exit_code == 1 and "**FAILED**: 0/1" in failed.stdout
    # a local suite file, run on the base model's name through the same runner
    (tmp_path / "s.json").write_text(json.dumps(suite(case({"type": "contains", "value": f"{BASE}#0"}))))
    local = runner.invoke(app, ["suite", "run", "bot", *common, "--suite", str(tmp_path / "s.json")])
    assert local.exit_code == 1 and "no match" not in local.stdout and "not found" in local.stdout
    wrong_key = runner.invoke(app, ["suite", "run", "bot@1", "--url", gateway.base_url, "--api-key", "nope"])
    assert wrong_key.exit_code == 2 and "incorrect API key" in wrong_key.output
    (tmp_path / "bad.json").write_text(json.dumps(suite(case({"type": "regex", "pattern": "(a)\\1"}))))
    checked = runner.invoke(app, ["suite", "check", str(tmp_path / "bad.json")])
    assert checked.exit_code == 2 and "cases.0.checks.0.regex.pattern" in checked.output


def test_the_trainers_registration_shows_the_gate(gateway: InProcessGateway, fake_adapter: Path, tmp_path: Path) -> None:
    from quiver.training.register import SUITE_REPORT_FILE, describe_registration, register_adapter

    gateway.admin().put("/v1/adapters/bot/suite", json=only_version(1))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for path in fake_adapter.iterdir():
        (run_dir / path.name).write_bytes(path.read_bytes())
    first = register_adapter(run_dir, gateway.base_url, "bot", ADMIN_KEY)
    assert describe_registration(first) == "registered as bot@1: suite passed 1/1 (current)"
    second = register_adapter(run_dir, gateway.base_url, "bot", ADMIN_KEY)
    assert describe_registration(second) == "gated: 0/1 passed, staged as bot@2"
    assert "# Suite report: bot@2" in (run_dir / SUITE_REPORT_FILE).read_text()


def test_markdown_escapes_answers_into_one_table_row() -> None:
    from quiver.suites.protocol import CaseResult, CheckResult, Report

    report = Report(adapter="bot", version=3, model="bot@3", suite_version=2, created_at=0, passed=False,
                    passed_cases=0, total_cases=1, min_pass_rate=1.0, cases=[CaseResult(
                        id="pipes", passed=False, checks=[CheckResult(type="exact", passed=False, detail="a|b")],
                        answers={"candidate": answer("line one\nline | two")})])
    page = render_markdown(report)
    assert "| line one<br>line \\| two |" in page and "| exact | **FAIL** | a\\|b |" in page


# --- the store keeps suites and reports beside the versions, on both backends --------------------------------


def test_documents_live_beside_versions_and_do_not_disturb_scans(backend: Backend) -> None:  # noqa: F811
    from test_adapter_stores import register

    store = backend.replica()
    register(store, "bot")
    assert store.read_document("bot", "suite.json") is None
    store.write_document("bot", "suite.json", b'{"v": 1}')
    store.write_document("bot", "reports/1.json", b"{}")
    store.write_document("bot", "suite.json", b'{"v": 2}')
    other = backend.replica()
    assert other.read_document("bot", "suite.json") == b'{"v": 2}'
    assert other.read_document("bot", "reports/1.json") == b"{}"
    assert list(other.scan()["bot"].versions) == [1]
    assert register(other, "bot").version == 2  # numbering is not confused by the documents


def test_a_fine_tuning_job_respects_the_gate_and_says_so(gateway: InProcessGateway, fake_adapter: Path) -> None:
    """The job's registration (what `_run` does once the worker has trained) through the gate; read back with the
    official client's fine-tuning API."""
    from quiver.common.jobs import JobResult
    from quiver.finetuning.protocol import FineTuningJob, Hyperparameters

    gateway.admin().put("/v1/adapters/bot/suite", json=only_version(1))
    jobs = gateway.state.jobs

    def finished_job(job_id: str) -> str:
        workspace = jobs.records.workspace(job_id)
        jobs._update(FineTuningJob(id=job_id, created_at=int(time.time()), model=BASE, status="running",
                                   training_file="file-x", hyperparameters=Hyperparameters(), seed=1), "Training")
        gateway.engine.threadsafe(jobs._register, job_id, "bot",
                                  JobResult(status="succeeded", trained_tokens=10, run_dir=fake_adapter), workspace)
        return job_id

    client = gateway.openai(ADMIN_KEY)
    passed = client.fine_tuning.jobs.retrieve(finished_job("ftjob-" + "a" * 24))
    assert (passed.status, passed.fine_tuned_model) == ("succeeded", "bot")
    assert client.fine_tuning.jobs.list_events(passed.id).data[0].message == \
        "New fine-tuned model created: bot (bot@1); suite passed 1/1"
    gated = client.fine_tuning.jobs.retrieve(finished_job("ftjob-" + "b" * 24))
    assert (gated.status, gated.fine_tuned_model) == ("succeeded", "bot@2")
    event = client.fine_tuning.jobs.list_events(gated.id).data[0]
    assert event.level == "warn"
    assert event.message == "gated: 0/1 passed, staged as bot@2 (report: /v1/adapters/bot@2/report.md)"
    assert gateway.admin().get("/v1/adapters/bot").json()["current_version"] == 1


# --- running a suite again, suites in archives, suites outside the registry's write lock ------------------------


def test_a_suite_run_again_replaces_the_report_and_the_gate(gateway: InProcessGateway, fake_adapter: Path) -> None:
    admin = gateway.admin()
    admin.put("/v1/adapters/bot/suite", json=only_version(1))
    gateway.register("bot", fake_adapter)
    assert gateway.register("bot", fake_adapter).json()["gate"]["passed"] is False
    assert admin.post("/v1/adapters/bot/promote", json={"version": 2}).status_code == 409
    # the suite was wrong: fixed, run again on version 2, which now passes and promotes without an override
    assert admin.put("/v1/adapters/bot/suite", json=only_version(2)).json()["version"] == 2
    rerun = admin.post("/v1/adapters/bot@2/suite/run")
    assert rerun.status_code == 200, rerun.text
    assert (rerun.json()["passed"], rerun.json()["suite_version"]) == (True, 2)
    assert admin.get("/v1/adapters/bot@2/report").json() == rerun.json()
    gate = admin.get("/v1/adapters/bot").json()["versions"][1]["gate"]
    assert gate == {"passed": True, "passed_cases": 1, "total_cases": 1, "suite_version": 2,
                    "report": "/v1/adapters/bot@2/report"}
    promoted = admin.post("/v1/adapters/bot/promote", json={"version": 2})
    assert promoted.status_code == 200 and promoted.json()["current_version"] == 2
    # ...and version 1, which fails the new suite, loses its pass the same way (the current version: no comparison)
    assert admin.post("/v1/adapters/bot@1/suite/run").json()["passed"] is False
    assert admin.post("/v1/adapters/bot/promote", json={"version": 1}).status_code == 409
    # a restart reads the gate back from the store
    reread = gateway.state.registry.store.scan()["bot"].versions
    assert (reread[1].gate.passed, reread[2].gate.passed) == (False, True)
    for ref, code in (("bot", 400), ("bot@9", 404), ("nobody@1", 404)):
        answer = admin.post(f"/v1/adapters/{ref}/suite/run")
        assert answer.status_code == code and "error" in answer.json(), (ref, answer.text)


def test_a_suite_run_again_needs_a_suite(gateway: InProcessGateway, fake_adapter: Path) -> None:
    gateway.register("bot", fake_adapter)
    answer = gateway.admin().post("/v1/adapters/bot@1/suite/run")
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "suite_not_found"


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_a_suite_inside_an_archive_counts_like_a_loose_one(gateway: InProcessGateway, fake_adapter: Path,
                                                          tmp_path: Path, kind: str) -> None:
    import io
    import tarfile
    import zipfile

    members = {path.name: path.read_bytes() for path in fake_adapter.iterdir()}
    members["suite.json"] = json.dumps(only_version(7)).encode()
    buffer = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buffer, "w") as bundle:
            for name, data in members.items():
                bundle.writestr(f"bot/{name}", data)
    else:
        with tarfile.open(fileobj=buffer, mode="w:gz") as bundle:
            for name, data in members.items():
                info = tarfile.TarInfo(f"bot/{name}")
                info.size = len(data)
                bundle.addfile(info, io.BytesIO(data))
    upload = [("files", (f"bot.{kind}", buffer.getvalue()))]
    with gateway.admin() as admin:
        record = admin.post("/v1/adapters", data={"name": "bot"}, files=upload).json()
        assert record["gate"]["passed"] is False and record["current"] is False, record
        assert "suite.json" not in {f["name"] for f in record["files"]}
        assert admin.get("/v1/adapters/bot/suite").json()["cases"][0]["checks"][0]["pattern"] == "^bot@7#0 "
        members["suite.json"] = b'{"cases": []}'
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as bundle:
            for name, data in members.items():
                bundle.writestr(name, data)
        refused = admin.post("/v1/adapters", data={"name": "bot"}, files=[("files", ("bot.zip", buffer.getvalue()))])
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_suite", refused.text
        assert [v["version"] for v in admin.get("/v1/adapters/bot").json()["versions"]] == [1]


def test_other_names_do_not_wait_for_a_suite(gateway: InProcessGateway, fake_adapter: Path) -> None:
    """A suite runs under its name's lock only: while one name's gate waits on the engine, another name registers
    and promotes; the same name's promote waits for the gate."""
    from concurrent.futures import ThreadPoolExecutor

    admin = gateway.admin()
    admin.put("/v1/adapters/slow/suite", json=suite(case({"type": "contains", "value": "slow"})))
    assert gateway.register("slow", fake_adapter).status_code == 201
    gateway.engine.hold()  # every generation (the suite's cases) waits until released
    try:
        with ThreadPoolExecutor(2) as pool:
            gated = pool.submit(gateway.register, "slow", fake_adapter)
            deadline = time.monotonic() + 30
            while not any(body.get("model") == "slow@2" for body in gateway.engine.requests):
                assert time.monotonic() < deadline and not gated.done()
                time.sleep(0.05)
            same_name = pool.submit(admin.post, "/v1/adapters/slow/promote", json={"version": 1})
            started = time.monotonic()
            other = gateway.register("fast", fake_adapter)
            assert other.status_code == 201 and other.json()["current"]
            assert admin.post("/v1/adapters/fast/promote", json={"version": 1}).status_code == 200
            assert time.monotonic() - started < 10
            assert not gated.done() and not same_name.done()  # the same name waits for its suite
            gateway.engine.release()
            assert gated.result(timeout=30).json()["gate"]["passed"] is True
            assert same_name.result(timeout=30).status_code == 200
    finally:
        gateway.engine.release()
