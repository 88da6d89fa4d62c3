"""schemathesis against the live server's own OpenAPI schema: every route, with a key, valid and invalid
inputs. No 5xx, and every answer (status, content type, body) must be what the schema says.

Bounded to stay quick on a busy 2-core machine: a few examples per route, no shrinking, and generation
requests capped at a few tokens (their bodies let through any OpenAI field, so max_tokens is not in the schema
for schemathesis to choose).
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from conftest import QuiverServer

EXAMPLES = {GenerationMode.POSITIVE: int(os.environ.get("QUIVER_FUZZ_EXAMPLES", "20")),
            GenerationMode.NEGATIVE: int(os.environ.get("QUIVER_FUZZ_NEGATIVE_EXAMPLES", "10"))}
CHECKS = {
    GenerationMode.POSITIVE: [not_a_server_error, status_code_conformance, content_type_conformance,
                              response_schema_conformance],
    # Invalid input must be refused with a 4xx that the schema documents, never a 5xx.
    GenerationMode.NEGATIVE: [not_a_server_error, status_code_conformance, content_type_conformance,
                              response_schema_conformance, negative_data_rejection],
}
GENERATING = {"/v1/chat/completions", "/v1/completions"}
# schemathesis 4.32's statuses for refused invalid input, plus 413: a body over the server's size limit is
# refused before it is parsed, the right answer to an oversized invalid body (a string far past its maxLength).
# A 5xx still fails `not_a_server_error`.
CONFIG = SchemathesisConfig.from_dict({"checks": {"negative_data_rejection": {"expected-statuses": [
    "400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]}}})
MAX_TOKENS = 8


def fuzz(base_url: str, key: str) -> tuple[Counter, Counter, list[str]]:
    """Every operation in both modes; returns cases per route, answers per status, and the failures."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", config=CONFIG)
    headers = {"Authorization": f"Bearer {key}"}
    cases: Counter = Counter()
    statuses: Counter = Counter()
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        route = f"{operation.method.upper()} {operation.path}"
        for mode, examples in EXAMPLES.items():
            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case) -> None:
                if operation.path in GENERATING and isinstance(case.body, dict):
                    case.body["max_tokens"] = MAX_TOKENS  # a bound on cost, not a fix-up: any value is valid
                response = case.call_and_validate(base_url=base_url, headers=headers, checks=CHECKS[mode],
                                                  timeout=120)
                cases[route] += 1
                statuses[response.status_code] += 1

            try:
                run()
            except Unsatisfiable:
                # Only strings in its path, or no input at all: there is no invalid request to make.
                assert mode is GenerationMode.NEGATIVE, route
            except Exception as failure:  # noqa: BLE001 - collected, so one route's failure hides no other's
                failures.append(f"{route} ({mode.value}): {failure}")
    return cases, statuses, failures


def test_every_route_conforms_to_the_schema_and_never_answers_5xx(quiver_server: QuiverServer) -> None:
    cases, statuses, failures = fuzz(quiver_server.base_url, quiver_server.admin_key)
    print(f"\nschemathesis: {sum(cases.values())} cases over {len(cases)} operations; statuses {dict(statuses)}")
    assert not failures, "\n\n".join(failures)
    assert len(cases) >= 20, cases  # every route was reached
    assert not [status for status in statuses if status >= 500]
    assert statuses[200] > 0, "no valid request succeeded: the fuzzing never got past validation"
