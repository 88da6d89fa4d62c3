"""Dataset validation, warnings, token summary, the split, hyperparameter config, and `quiver data check`."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from quiver.training.config import TrainConfig
from quiver.training.data import auto_epochs, check_dataset, read_examples, split_examples, write_jsonl
from training_fixtures import REPO, base_model_dir, chat, tokenizer, write_lines  # noqa: F401

CALL = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
# A tool with a real parameter schema: calls are checked against it.
SCHEMA_TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Z][a-z]+$"}}, "required": ["city"],
    "additionalProperties": False}}}]
USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}

ERROR_CASES = {
    "invalid_json": '{"messages": [',
    "invalid_example": "[1, 2]",
    "missing_messages": {"input": "hi"},
    "invalid_messages": {"messages": []},
    "invalid_message": {"messages": ["hi"]},
    "unknown_key": {"messages": [USER, ASSISTANT], "metadata": {}},
    "unknown_role": {"messages": [{"role": "robot", "content": "hi"}, ASSISTANT]},
    "invalid_content": {"messages": [{"role": "user", "content": 42}, ASSISTANT]},
    "missing_content": {"messages": [{"role": "user"}, ASSISTANT]},
    "no_assistant_message": {"messages": [{"role": "system", "content": "x"}, USER]},
    "no_trained_assistant_message": {"messages": [USER, {**ASSISTANT, "weight": 0}]},
    "invalid_weight": {"messages": [USER, {**ASSISTANT, "weight": 0.5}]},
    "invalid_tools": {"messages": [USER, ASSISTANT], "tools": [{"name": "weather"}]},
    "invalid_tool_calls": {"messages": [USER, {"role": "assistant", "tool_calls": [{"id": "c"}]}]},
    "missing_tool_call_id": {
        "messages": [USER, {"role": "assistant", "tool_calls": [CALL]}, {"role": "tool", "content": "3C"}, ASSISTANT]
    },
    "unknown_tool_call_id": {
        "messages": [
            USER,
            {"role": "assistant", "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call_9", "content": "3C"},
            ASSISTANT,
        ]
    },
    "invalid_arguments": {"messages": [USER, {"role": "assistant", "tool_calls": [
        {**CALL, "function": {"name": "weather", "arguments": '{"city": 7}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3C"}, ASSISTANT], "tools": SCHEMA_TOOLS},
    "unknown_tool": {"messages": [USER, {"role": "assistant", "tool_calls": [
        {**CALL, "function": {"name": "stocks", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3C"}, ASSISTANT], "tools": SCHEMA_TOOLS},
    "missing_tool_result": {"messages": [USER, {"role": "assistant", "tool_calls": [CALL]}, ASSISTANT], "tools": SCHEMA_TOOLS},
    "duplicate_tool_call_id": {"messages": [USER, {"role": "assistant", "tool_calls": [CALL, CALL]},
                                            {"role": "tool", "tool_call_id": "call_1", "content": "3C"}, ASSISTANT],
                               "tools": SCHEMA_TOOLS},
    "duplicate_tool_result": {"messages": [USER, {"role": "assistant", "tool_calls": [CALL]},
                                           {"role": "tool", "tool_call_id": "call_1", "content": "3C"},
                                           {"role": "tool", "tool_call_id": "call_1", "content": "4C"}, ASSISTANT],
                              "tools": SCHEMA_TOOLS},
    "missing_response": {"prompt": "hi"},
    "ambiguous_response": {"prompt": "hi", "response": "a", "completion": "b"},
}


@pytest.mark.parametrize("code", sorted(ERROR_CASES))
def test_each_error_code_names_its_line(tmp_path, code):
    good = chat("What is 2+2?", "4")
    path = write_lines(tmp_path / "data.jsonl", [good, ERROR_CASES[code], good])
    report = check_dataset(path)
    assert [(i.code, i.line) for i in report.errors] == [(code, 2)]
    assert [e.line for e in report.examples] == [1, 3]


def test_empty_file_is_an_error(tmp_path):
    report = check_dataset(write_lines(tmp_path / "empty.jsonl", ["", "  "]))
    assert [i.code for i in report.errors] == ["empty_file"]


def test_valid_tool_conversation_and_text_parts_parse(tmp_path):
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Oslo?"}]},
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call_1", "content": "3C"},
            {"role": "assistant", "content": "3 degrees."},
        ],
        "tools": TOOLS,
    }
    report = check_dataset(write_lines(tmp_path / "tools.jsonl", [row]))
    assert report.ok
    assert report.examples[0].messages[0]["content"] == "Weather in Oslo?"


def test_tools_the_template_cannot_render_are_an_error_with_the_tokenizer(tmp_path, base_model_dir):
    from transformers import AutoTokenizer

    # The model folder's own template (SmolLM2's, without tools), as any other base model without tool support has;
    # quiver's default model gets the tools template (tests/test_tools.py).
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    row = {"messages": [USER, {"role": "assistant", "tool_calls": [CALL]}, {"role": "tool", "tool_call_id": "call_1", "content": "3C"}, ASSISTANT]}
    report = check_dataset(write_lines(tmp_path / "tools.jsonl", [row]), tokenizer, 512)
    assert [(i.code, i.line) for i in report.errors] == [("tools_unsupported", 1)]


def test_prompt_response_pairs_become_chats(tmp_path):
    path = write_lines(tmp_path / "pairs.jsonl", [{"prompt": "2+2?", "response": "4"}, {"prompt": "3+3?", "completion": "6"}])
    report = check_dataset(path)
    assert report.ok
    assert report.examples[1].messages == [{"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]


def test_warnings(tmp_path, tokenizer):
    rows = [
        chat("What is 2+2?", "4"),
        chat("What is 2+2?", "4"),  # exact duplicate
        chat("Capital of France?", "Paris"),
        chat("Capital of France?", "Lyon"),  # same prompt, different answer
        chat("Say hi", "hi", system=None),
        chat("Write a long answer", "word " * 80),
    ]
    report = check_dataset(write_lines(tmp_path / "w.jsonl", rows), tokenizer, max_seq_len=48)
    assert report.ok
    by_code = {}
    for issue in report.warnings:
        by_code.setdefault(issue.code, []).append(issue)
    assert set(by_code) == {"too_few_examples", "duplicate_example", "conflicting_answers", "no_system_message", "too_long"}
    assert by_code["duplicate_example"][0].line == 2
    assert "lines 3, 4" in by_code["conflicting_answers"][0].message
    assert "1 of 6" in by_code["no_system_message"][0].message
    [too_long] = by_code["too_long"]
    assert too_long.line == 6
    full = len(tokenizer.apply_chat_template(rows[5]["messages"], tokenize=True)["input_ids"])
    assert f"{full} tokens" in too_long.message and f"{full - 48} tokens would be cut" in too_long.message


def test_summary_counts_tokens_and_auto_epochs(tokenizer):
    report = check_dataset(REPO / "examples" / "json-extract.jsonl", tokenizer, max_seq_len=1024)
    assert report.ok and not report.warnings
    summary = report.summary()
    assert summary["examples"] == 200 and summary["with_system_message"] == 200
    tokens = report.tokens
    assert tokens.examples == 200 and tokens.min <= tokens.median <= tokens.max
    assert 0 < tokens.trained < tokens.total and tokens.truncated_examples == 0
    assert summary["auto_epochs"] == 3 and summary["auto_training_tokens"] == 3 * tokens.total


def test_auto_epochs_follow_dataset_size():
    assert auto_epochs(10) == 10  # small sets are repeated up to ~100 examples seen
    assert auto_epochs(200) == 3
    assert auto_epochs(20_000) == 1
    assert auto_epochs(2) == 25  # capped


def test_split_is_deterministic_disjoint_and_80_10_10(tmp_path):
    examples = read_examples(REPO / "examples" / "pirate.jsonl")
    first, again = split_examples(examples, seed=7), split_examples(examples, seed=7)
    other = split_examples(examples, seed=8)
    lines = lambda part: [e.line for e in part]  # noqa: E731
    assert (len(first.train), len(first.validation), len(first.test)) == (160, 20, 20)
    assert lines(first.test) == lines(again.test) and lines(first.train) == lines(again.train)
    assert lines(first.test) != lines(other.test)
    assert sorted(lines(first.train) + lines(first.validation) + lines(first.test)) == list(range(1, 201))
    write_jsonl(tmp_path / "test.jsonl", first.test)
    assert [e.messages for e in read_examples(tmp_path / "test.jsonl")] == [e.messages for e in first.test]


def test_config_defaults_yaml_and_validation(tmp_path):
    assert TrainConfig().epochs == "auto" and TrainConfig().resolved_epochs(200) == 3
    path = tmp_path / "hp.yaml"
    path.write_text("rank: 16\nlearning_rate: 0.0005\nepochs: 2\ntarget_modules: all-linear\n")
    config = TrainConfig.from_yaml(path, seed=3)
    assert (config.rank, config.learning_rate, config.resolved_epochs(200), config.seed) == (16, 5e-4, 2, 3)
    assert config.target_modules == "all-linear"
    path.write_text("rnak: 16\n")
    with pytest.raises(ValueError, match="rnak"):
        TrainConfig.from_yaml(path)


def test_cli_data_check_reports_and_exits_nonzero_on_errors(tmp_path):
    from quiver.training.cli import register_commands

    app = typer.Typer()
    register_commands(app)
    path = write_lines(tmp_path / "d.jsonl", [chat("hi", "hello"), "{oops"])
    result = CliRunner().invoke(app, ["data", "check", str(path), "--no-tokens", "--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["summary"]["examples"] == 1
    assert {"severity": "error", "code": "invalid_json", "line": 2} == {
        k: v for k, v in report["issues"][0].items() if k != "message"
    }


def _tool_row(arguments: str, tools: list = SCHEMA_TOOLS) -> dict:
    call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": arguments}}
    return {"messages": [USER, {"role": "assistant", "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": "call_1", "content": "3C"}, ASSISTANT], "tools": tools}


@pytest.mark.parametrize("arguments, code, says", [
    ('{"city": "Oslo"}', None, None),
    ('"{\\"city\\": \\"Oslo\\"}"', "invalid_tool_calls", "encoded twice"),
    ('{"city": "Oslo", "unit": "c"}', "invalid_arguments", "'unit' was unexpected"),
    ("{}", "invalid_arguments", "'city' is a required property"),
    ('{"city": "oslo"}', "invalid_arguments", "does not match"),
    ("[1, 2]", "invalid_tool_calls", "must encode a JSON object"),
    ("{'city': 'Oslo'}", "invalid_tool_calls", "not valid JSON"),
    ("[" * 5000 + "]" * 5000, "invalid_tool_calls", "nested deeper"),
])
def test_tool_call_arguments_are_checked_against_the_tools_schema(tmp_path, arguments, code, says):
    report = check_dataset(write_lines(tmp_path / "tools.jsonl", [_tool_row(arguments)]))
    if code is None:
        assert report.ok, [str(i) for i in report.issues]
        return
    assert [(i.code, i.line) for i in report.errors] == [(code, 1)]
    assert says in report.errors[0].message


@pytest.mark.parametrize("parameters, says", [
    ({"type": "no-such-type"}, "not a valid JSON Schema"),
    ({"$ref": "https://example.com/schema.json"}, "remote references are not fetched"),
    ({"type": "object", "patternProperties": {"^a": {}}}, "patternProperties"),
    ({"type": "object", "properties": {"city": {"pattern": "(?=x)"}}}, "RE2"),
])
def test_hostile_or_broken_tool_schemas_are_refused_without_network_or_backtracking(tmp_path, parameters, says):
    tools = [{"type": "function", "function": {"name": "weather", "parameters": parameters}}]
    report = check_dataset(write_lines(tmp_path / "tools.jsonl", [_tool_row('{"city": "Oslo"}', tools)]))
    assert [(i.code, i.line) for i in report.errors] == [("invalid_tools", 1)]
    assert says in report.errors[0].message


def test_a_catastrophic_pattern_runs_in_linear_time(tmp_path):
    import time

    tools = [{"type": "function", "function": {"name": "weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "pattern": "^(a+)+$"}}}}}]
    started = time.monotonic()
    report = check_dataset(write_lines(tmp_path / "tools.jsonl", [_tool_row(json.dumps({"city": "a" * 5000 + "!"}), tools)]))
    assert time.monotonic() - started < 5  # Python's `re` would not finish
    assert [i.code for i in report.errors] == ["invalid_arguments"]


def test_calls_without_declared_tools_are_a_warning(tmp_path):
    row = _tool_row('{"city": "Oslo"}')
    del row["tools"]
    report = check_dataset(write_lines(tmp_path / "tools.jsonl", [row]))
    assert report.ok and [(i.code, i.line) for i in report.warnings if i.code == "undeclared_tool"] == [("undeclared_tool", 1)]


# ---------------------------------------------------------------------------------------------- preference data


def pair(question="What is 2+2?", preferred="4", non_preferred="Well, let me think. It is 4. Hope that helps!",
         system="Be brief."):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return {"input": {"messages": messages}, "preferred_output": [{"role": "assistant", "content": preferred}],
            "non_preferred_output": [{"role": "assistant", "content": non_preferred}]}


PREFERENCE_ERRORS = {
    "invalid_json": ('{"input": ', None),
    "invalid_example": ("[1]", None),
    "not_preference_data": (chat("hi", "hello"), "chat example"),
    "missing_key": ({k: v for k, v in pair().items() if k != "non_preferred_output"}, "non_preferred_output"),
    "unknown_key": ({**pair(), "metadata": {}}, "metadata"),
    "invalid_input": ({**pair(), "input": {"messages": [USER, ASSISTANT]}}, "must end with"),
    "invalid_preferred_output": ({**pair(), "preferred_output": [ASSISTANT, ASSISTANT]}, "exactly one"),
    "invalid_non_preferred_output": ({**pair(), "non_preferred_output": [USER]}, "exactly one assistant"),
    "identical_outputs": (pair(preferred="4", non_preferred="4"), "same answer"),
    "invalid_weight": ({**pair(), "preferred_output": [{**ASSISTANT, "weight": 1}]}, "supervised"),
    "unknown_role": ({**pair(), "input": {"messages": [{"role": "robot", "content": "x"}, USER]}}, "input.messages[0]"),
    "invalid_content": ({**pair(), "non_preferred_output": [{"role": "assistant", "content": 7}]},
                        "non_preferred_output[0]"),
    "too_deeply_nested": ('{"input": {"messages": [], "tools": ' + "[" * 70 + "]" * 70 + "}}", None),
}


@pytest.mark.parametrize("code", sorted(PREFERENCE_ERRORS))
def test_each_preference_error_names_its_line_and_where(tmp_path, code):
    from quiver.training.data import check_preference_dataset

    row, where = PREFERENCE_ERRORS[code]
    path = write_lines(tmp_path / "prefs.jsonl", [pair(), row, pair("What is 3+3?", "6", "Let me see... 6!")])
    report = check_preference_dataset(path)
    assert [(i.code, i.line) for i in report.errors] == [(code, 2)]
    if where:
        assert where in report.errors[0].message
    assert [e.line for e in report.examples] == [1, 3]


def test_preference_data_parses_detects_splits_and_round_trips(tmp_path, tokenizer):
    from quiver.training.data import (
        check_training_file,
        detect_format,
        read_preference_examples,
    )

    rows = [pair(f"What is {i}+{i}?", str(2 * i), f"Great question! {i} plus {i} makes {2 * i}. Anything else?")
            for i in range(20)]
    rows[3]["input"]["tools"] = TOOLS
    path = write_lines(tmp_path / "prefs.jsonl", rows)
    assert detect_format(path) == "preference"
    assert detect_format(REPO / "examples" / "pirate.jsonl") == "chat"
    report = check_training_file(path)  # without a tokenizer: the default model's template cannot render tools
    assert report.ok and report.format == "preference"
    assert report.summary()["format"] == "preference" and report.summary()["with_tools"] == 1
    example = report.examples[3]
    assert example.messages[-1] == {"role": "user", "content": "What is 3+3?"} and example.tools == TOOLS
    assert (example.preferred["content"], example.non_preferred["content"]) == ("6", rows[3]["non_preferred_output"][0]["content"])

    del rows[3]["input"]["tools"]
    report = check_training_file(write_lines(tmp_path / "prefs.jsonl", rows), tokenizer, max_seq_len=1024)
    assert report.ok
    # Tokens over prompt + each answer, as training sees them; answer tokens (and end-of-turn) are the trained ones.
    chosen = tokenizer.apply_chat_template([*example.messages, example.preferred], tokenize=True)["input_ids"]
    assert report.tokens.examples == 20 and report.tokens.max >= len(chosen)
    assert 0 < report.tokens.trained < report.tokens.total

    split = split_examples(report.examples, seed=3)
    assert (len(split.train), len(split.validation), len(split.test)) == (16, 2, 2)
    write_jsonl(tmp_path / "test.jsonl", split.test)
    assert [e.to_json() for e in read_preference_examples(tmp_path / "test.jsonl")] == [e.to_json() for e in split.test]


def test_preference_answers_cut_by_max_seq_len_warn(tmp_path, tokenizer):
    from quiver.training.data import check_preference_dataset

    path = write_lines(tmp_path / "long.jsonl", [pair(non_preferred="word " * 100)])
    report = check_preference_dataset(path, tokenizer, max_seq_len=64)
    assert report.ok
    [too_long] = [i for i in report.warnings if i.code == "too_long"]
    assert too_long.line == 1 and "answers' ends would be cut" in too_long.message
    assert report.tokens.truncated_examples == 1 and report.tokens.tokens_cut > 0


def test_example_preference_dataset_is_clean_and_concise_is_shorter(tokenizer):
    from quiver.training.data import check_preference_dataset

    report = check_preference_dataset(REPO / "examples" / "concise.jsonl", tokenizer, max_seq_len=1024)
    assert report.ok and not report.warnings and len(report.examples) == 200
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert all(count(e.preferred["content"]) * 3 < count(e.non_preferred["content"]) for e in report.examples)
    # Every rambling answer still holds the preferred (correct) one: only the length differs.
    assert all(e.preferred["content"] in e.non_preferred["content"] for e in report.examples)


def test_preference_rows_end_each_answer_with_its_end_of_turn_token(tokenizer):
    from quiver.training.data import PreferenceExample
    from quiver.training.preference import chosen_label_rows, preference_rows

    example = PreferenceExample(1, [{"role": "user", "content": "2+2?"}], {"role": "assistant", "content": "4"},
                                {"role": "assistant", "content": "It is 4."})
    [row] = preference_rows([example], tokenizer)
    assert row["prompt"].endswith("<|im_start|>assistant\n")
    assert (row["chosen"], row["rejected"]) == ("4<|im_end|>", "It is 4.<|im_end|>")
    # What DPO trains on once prompt + answer are cut to max_length: the answer's end goes first.
    tokenized = {"prompt_ids": [[1, 2, 3]], "chosen_ids": [[4, 5, 6]]}
    assert chosen_label_rows(tokenized, None) == [[4, 5, 6]]
    assert chosen_label_rows(tokenized, 5) == [[4, 5]]
    assert chosen_label_rows(tokenized, 3) == [[]]


def test_config_method_beta_and_init_adapter(tmp_path):
    config = TrainConfig(method="dpo", beta=0.5, init_adapter=tmp_path)
    assert (config.method, config.beta, config.init_adapter) == ("dpo", 0.5, tmp_path)
    assert TrainConfig().method == "supervised" and TrainConfig().beta == 0.1 and TrainConfig().init_adapter is None
    for bad in ({"beta": 0}, {"beta": 2.5}, {"method": "ppo"}):
        with pytest.raises(ValueError):
            TrainConfig(**bad)


def test_cli_data_check_detects_or_is_told_the_format(tmp_path):
    from quiver.training.cli import register_commands

    app = typer.Typer()
    register_commands(app)
    prefs = write_lines(tmp_path / "p.jsonl", [pair(), pair("3+3?", "6", "Hmm, 6 I think.")])
    result = CliRunner().invoke(app, ["data", "check", str(prefs), "--no-tokens", "--json"])
    assert result.exit_code == 0, result.stdout
    summary = json.loads(result.stdout)["summary"]
    assert (summary["format"], summary["examples"], summary["errors"]) == ("preference", 2, 0)
    chats = write_lines(tmp_path / "c.jsonl", [chat("hi", "hello")])
    result = CliRunner().invoke(app, ["data", "check", str(chats), "--no-tokens", "--json", "--format", "preference"])
    assert result.exit_code == 1
    assert [i["code"] for i in json.loads(result.stdout)["issues"]] == ["not_preference_data"]
    result = CliRunner().invoke(app, ["data", "check", str(chats), "--no-tokens", "--format", "yaml"])
    assert result.exit_code == 2
