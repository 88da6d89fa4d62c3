"""The two kinds of caller-written matching a suite holds, made safe: regexes run on RE2 (linear time, bounded
memory) and JSON Schemas validate with `jsonschema` without ever fetching a remote `$ref` or running a
Python regex."""

from __future__ import annotations

import functools
from typing import Any, Iterator

import re2
import referencing
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import SchemaError, ValidationError

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a refused pattern is the caller's error, not a log line
_RE2_OPTIONS.max_mem = 8 * 1024 * 1024  # bounds the compiled automaton (e.g. `(a{1000}){1000}`)


@functools.lru_cache(maxsize=256)
def compile_pattern(pattern: str) -> Any:
    """The compiled RE2 pattern; ValueError (a validation error for pydantic) when RE2 refuses it."""
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error:
        raise ValueError("not a regular expression this server accepts (RE2 syntax: no backreferences or "
                         "look-around; bounded size)") from None


def _re2_pattern(validator: Any, pattern: str, instance: Any, schema: dict) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not compile_pattern(pattern).search(instance):
        yield ValidationError(f"the string does not match the pattern {pattern!r}")


# jsonschema's own `pattern` runs Python's backtracking `re` on a schema's pattern: a ReDoS for a hostile
# suite. `pattern` runs on RE2 instead; `patternProperties` (also matched by `re` inside jsonschema's
# `additionalProperties`) is refused when the suite is checked.
_Validator = validators.extend(Draft202012Validator, {"pattern": _re2_pattern})
# Only the metaschemas, should a reference ever get through: jsonschema's default registry fetches http(s)
# URLs.
_REGISTRY: referencing.Registry = referencing.Registry()


# References are refused: a remote one is a request forgery, a local one can loop (`{"$ref": "#"}` recurses
# without end) or fan out exponentially (each definition referring twice to the next). Without them, checking
# an answer costs at most (schema size x answer size).
_REFERENCES = ("$ref", "$dynamicRef", "$recursiveRef")


def _walk(schema: Any) -> Iterator[tuple[str, Any]]:
    stack = [schema]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                yield key, value
                stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)


def check_json_schema(schema: dict[str, Any]) -> None:
    """ValueError with a clear message when the schema is not one this server runs."""
    try:
        _Validator.check_schema(schema)
    except SchemaError as exc:
        raise ValueError(f"not a valid JSON Schema: {exc.message}") from None
    for key, value in _walk(schema):
        if key == "patternProperties":
            raise ValueError("`patternProperties` is not supported in suite schemas (use `properties`)")
        if key == "pattern" and isinstance(value, str):
            compile_pattern(value)
        if key in _REFERENCES:
            raise ValueError(f"`{key}` is not supported in suite schemas (write the definitions inline)")


def schema_errors(schema: dict[str, Any], instance: Any) -> str | None:
    """The first reason `instance` does not conform, or None."""
    try:
        error = next(_Validator(schema, registry=_REGISTRY).iter_errors(instance), None)
    except (referencing.exceptions.Unresolvable, RecursionError):
        return "the schema cannot be evaluated"
    if error is None:
        return None
    where = "/".join(str(part) for part in error.absolute_path)
    return f"{where or 'the answer'}: {error.message}"[:500]
