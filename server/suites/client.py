"""Running a suite against any quiver (or OpenAI-compatible) server over HTTP: `quiver suite run`."""

from __future__ import annotations

from typing import Any

import httpx

from quiver.adapters.model_id import parse_adapter_ref
from quiver.suites.protocol import Report, Suite, SuiteSpec
from quiver.suites.runner import CallFailed, run_suite
from quiver.suites.service import parse_suite

TIMEOUT_S = 300.0  # one answer of at most MAX_CASE_TOKENS tokens on a busy CPU server


class SuiteClientError(RuntimeError):
    """The server could not be asked (unreachable, refused the key, has no such adapter or suite)."""


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:300] or response.reason_phrase


def _headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


async def run_remote(
    ref: str,
    url: str,
    api_key: str | None,
    admin_key: str | None = None,
    suite_file: bytes | None = None,
    base: str | None = None,
    current: str | None = None,
) -> Report:
    """Run `ref`'s name's suite (or `suite_file`) on the server at `url`, on `ref` (`name@N` or `name`).
    Comparisons use `base` / `current` when given, else what the server's registry says (an admin key)."""
    parsed = parse_adapter_ref(ref, "ref")
    admin = _headers(admin_key or api_key)
    async with httpx.AsyncClient(base_url=url.rstrip("/"), timeout=TIMEOUT_S) as client:

        async def get(path: str) -> Any:
            try:
                response = await client.get(path, headers=admin)
            except httpx.HTTPError as exc:
                raise SuiteClientError(f"could not reach {url}: {exc}") from exc
            if response.is_error:
                raise SuiteClientError(f"GET {path}: {response.status_code} {_error_message(response)}")
            return response.json()

        suite_version: int | None = None
        if suite_file is not None:
            suite: SuiteSpec = parse_suite(suite_file)
        else:
            suite = Suite.model_validate(await get(f"/v1/adapters/{parsed.name}/suite"))
            suite_version = suite.version
        needed = suite.references()
        if ("base" in needed and base is None) or ("current" in needed and current is None):
            adapter = await get(f"/v1/adapters/{parsed.name}")
            if base is None and adapter["versions"]:
                base = adapter["versions"][0]["base_model"]
            if current is None and adapter["current_version"] is not None:
                current = f"{parsed.name}@{adapter['current_version']}"

        async def complete(body: dict[str, Any]) -> dict[str, Any]:
            try:
                response = await client.post("/v1/chat/completions", json=body, headers=_headers(api_key))
            except httpx.HTTPError as exc:
                raise SuiteClientError(f"could not reach {url}: {exc}") from exc
            if response.status_code in (401, 403):
                raise SuiteClientError(f"{url} refused the key: {_error_message(response)}")
            if response.is_error:
                raise CallFailed(f"{response.status_code}: {_error_message(response)}")
            return response.json()

        return await run_suite(suite, complete, ref, {"base": base, "current": current}, adapter=parsed.name,
                               version=parsed.version, suite_version=suite_version)
