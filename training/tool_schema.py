"""Tool definitions of a training example and the calls checked against them (JSON Schema, bounded).

A tool's `parameters` is a JSON Schema written by whoever wrote the data, so it is checked like any caller input:
it must be a valid schema, a size and depth the data checks already bound, no remote `$ref`s (jsonschema never
fetches them), and its regexes run on RE2 (linear time), not Python's backtracking `re`.
"""

from __future__ import annotations

from typing import Any

import re2
from jsonschema import Draft202012Validator, ValidationError, validators
from jsonschema.exceptions import SchemaError
from referencing import Registry
from referencing.exceptions import Unresolvable

MAX_TOOLS = 128  # OpenAI's limit on `tools` per request
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.max_mem = 8 << 20  # a pattern needing more is refused, not run


class SchemaProblem(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _compile(pattern: str) -> Any:
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as exc:
        raise SchemaProblem("invalid_tools", f"pattern {pattern!r} is not supported (RE2 syntax, no backreferences or "
                                             f"lookaround): {exc}") from exc


def _pattern(validator: Any, pattern: str, instance: Any, schema: dict[str, Any]) -> Any:
    if validator.is_type(instance, "string") and not _compile(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _refuse_pattern_properties(validator: Any, value: Any, instance: Any, schema: dict[str, Any]) -> Any:
    # jsonschema matches these (and the additionalProperties that depend on them) with Python's `re`.
    raise SchemaProblem("invalid_tools", "`patternProperties` is not supported in tool parameter schemas")


_Validator = validators.extend(
    Draft202012Validator, {"pattern": _pattern, "patternProperties": _refuse_pattern_properties}
)


class ToolSchemas:
    """The example's tools by name, each with a validator for its arguments."""

    def __init__(self, tools: list[dict[str, Any]]) -> None:
        if len(tools) > MAX_TOOLS:
            raise SchemaProblem("invalid_tools", f"{len(tools)} tools; at most {MAX_TOOLS}")
        self.validators: dict[str, Any] = {}
        for index, tool in enumerate(tools):
            function = tool["function"]
            name = function["name"]
            if name in self.validators:
                raise SchemaProblem("invalid_tools", f"tools[{index}]: a second tool named {name!r}")
            parameters = function.get("parameters", {"type": "object", "properties": {}})
            if not isinstance(parameters, dict):
                raise SchemaProblem("invalid_tools", f"tools[{index}].function.parameters must be a JSON Schema object")
            try:
                _Validator.check_schema(parameters)
            except SchemaError as exc:
                raise SchemaProblem(
                    "invalid_tools", f"tools[{index}].function.parameters is not a valid JSON Schema: {exc.message}"
                ) from exc
            # An empty registry that retrieves nothing: local `#/$defs/...` refs resolve, remote ones are refused
            # (jsonschema's default would fetch them over the network).
            self.validators[name] = _Validator(parameters, registry=Registry())

    def check_call(self, name: str, arguments: Any) -> None:
        validator = self.validators.get(name)
        if validator is None:
            raise SchemaProblem("unknown_tool", f"calls {name!r}, which is not among the example's tools "
                                                f"{sorted(self.validators)}")
        try:
            error = next(iter(validator.iter_errors(arguments)), None)
        except RecursionError as exc:  # a self-referencing schema on deeply nested arguments
            raise SchemaProblem("invalid_arguments", f"{name!r} arguments nest too deeply for its schema") from exc
        except Unresolvable as exc:  # what jsonschema's wrapped referencing error also is
            raise SchemaProblem("invalid_tools", f"the parameters of {name!r} have a `$ref` that cannot be resolved "
                                                 f"locally ({exc.ref}); remote references are not fetched") from exc
        if error is not None:
            where = "".join(f"[{p!r}]" for p in error.absolute_path) or " (top level)"
            message = error.message if len(error.message) <= 200 else error.message[:200] + "..."
            raise SchemaProblem("invalid_arguments", f"arguments of {name!r} do not match its parameters at "
                                                     f"arguments{where}: {message}")
