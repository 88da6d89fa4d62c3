"""Suites per adapter name (stored beside its versions) and the gate they put on a new version.

Layout, in the adapter store (local folder or S3), next to the name's version folders:

    <name>/suite.json              the name's suite now (with its number, `version`)
    <name>/suites/<n>.json         every suite the name had, kept for the reports that name them
    <name>/reports/<version>.json  the gate's report on that version (and an admin's override of it)
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, BinaryIO

from pydantic import ValidationError

from quiver.adapters.protocol import GateResult
from quiver.adapters.service import AdapterRegistry, Target, engine_name, version_not_found
from quiver.adapters.store import AdapterStore
from quiver.adapters.validation import check_adapter_name
from quiver.engine_client import EngineClient, EngineUnavailable, parse_engine_error
from quiver.errors import InvalidRequest, NotFound, PayloadTooLarge, Unavailable
from quiver.limits import loads_bounded
from quiver.suites.protocol import MAX_SUITE_BYTES, Override, Report, Suite, SuiteSpec
from quiver.suites.runner import CallFailed, run_suite

log = logging.getLogger(__name__)

SUITE = "suite.json"


def _report_key(version: int) -> str:
    return f"reports/{version}.json"


def report_path(name: str, version: int) -> str:
    return f"/v1/adapters/{engine_name(name, version)}/report"


def describe_validation_error(exc: ValidationError) -> tuple[str, str]:
    """The first problem, located (`cases.2.checks.0.pattern: ...`), without echoing the caller's input."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"] if not str(part).startswith("function-"))
    message = first["msg"].removeprefix("Value error, ")
    return (f"{where}: {message}" if where else message), where or "suite"


def parse_suite(raw: bytes | str | dict[str, Any]) -> SuiteSpec:
    """A suite from a caller (a file's bytes or parsed JSON); InvalidRequest (`invalid_suite`) says what is wrong."""
    if isinstance(raw, (bytes, str)):
        if len(raw) > MAX_SUITE_BYTES:
            raise PayloadTooLarge(f"a suite may be at most {MAX_SUITE_BYTES} bytes", code="suite_too_large",
                                  param="suite")
        try:
            raw = loads_bounded(raw)
        except ValueError as exc:
            raise InvalidRequest(f"the suite is not valid JSON: {str(exc)[:200]}", code="invalid_suite",
                                 param="suite") from None
    elif len(json.dumps(raw)) > MAX_SUITE_BYTES:
        raise PayloadTooLarge(f"a suite may be at most {MAX_SUITE_BYTES} bytes", code="suite_too_large", param="suite")
    try:
        return SuiteSpec.model_validate(raw)
    except ValidationError as exc:
        message, where = describe_validation_error(exc)
        raise InvalidRequest(f"invalid suite: {message}", code="invalid_suite", param=where) from None


def suite_not_found(name: str) -> NotFound:
    return NotFound(f"`{name}` has no suite", code="suite_not_found", param="name")


class SuiteService:
    """The suites' store and runner inside the server; the registry calls `gate` (see `AdapterRegistry.gate`)."""

    def __init__(self, store: AdapterStore, engine: EngineClient, registry: AdapterRegistry) -> None:
        self.store = store
        self.engine = engine
        self.registry = registry
        self._lock = asyncio.Lock()  # suite numbers and report overrides: read, then write

    # --- suites -------------------------------------------------------------------------------------

    async def get_suite(self, name: str) -> Suite:
        check_adapter_name(name)
        raw = await asyncio.to_thread(self.store.read_document, name, SUITE)
        if raw is None:
            raise suite_not_found(name)
        return Suite.model_validate_json(raw)

    async def current_suite(self, name: str) -> Suite | None:
        try:
            return await self.get_suite(name)
        except NotFound:
            return None

    async def suite_version(self, name: str, number: int) -> Suite | None:
        """The name's suite number `number` (kept for the reports and canaries that name it)."""
        raw = await asyncio.to_thread(self.store.read_document, name, f"suites/{number}.json")
        return None if raw is None else Suite.model_validate_json(raw)

    async def put_suite(self, name: str, spec: SuiteSpec) -> Suite:
        """Store `spec` as the name's next suite (a name may have a suite before its first version)."""
        check_adapter_name(name)
        if name == self.registry.base_model_name:
            raise InvalidRequest(f"`{name}` is the base model's name", code="name_conflict", param="name")
        async with self._lock:
            previous = await self.current_suite(name)
            suite = Suite(name=name, version=(previous.version if previous else 0) + 1, created_at=int(time.time()),
                          **spec.model_dump(by_alias=True))
            data = suite.model_dump_json(by_alias=True, indent=1).encode()
            try:
                await asyncio.to_thread(self.store.write_document, name, f"suites/{suite.version}.json", data)
                await asyncio.to_thread(self.store.write_document, name, SUITE, data)
            except OSError as exc:
                log.warning("could not store the suite of %s: %s", name, exc)
                raise Unavailable("the adapter store cannot be written: the suite was not stored",
                                  code="store_unavailable") from None
        log.info("suite %d of %s stored (%d cases)", suite.version, name, len(suite.cases))
        return suite

    @staticmethod
    def parse_upload(source: BinaryIO) -> SuiteSpec:
        """A `suite.json` uploaded with a version; read one byte past the limit, never a huge part whole."""
        return parse_suite(source.read(MAX_SUITE_BYTES + 1))

    # --- the gate -----------------------------------------------------------------------------------

    async def gate(self, name: str, version: int, uploaded: SuiteSpec | None) -> GateResult | None:
        """Run the name's suite (`uploaded` first becomes it) on `name@version`, already loaded in the engine
        and not yet committed; store the report. None when the name has no suite. Called by the registry
        under the name's lock, so its current version cannot change or disappear meanwhile (other names'
        registrations go on)."""
        suite = await self.put_suite(name, uploaded) if uploaded is not None else await self.current_suite(name)
        if suite is None:
            return None
        return (await self._judge(suite, name, version, self._current_version(name)))[1]

    async def rerun(self, name: str, version: int) -> Report:
        """Run the name's suite again on one of its versions (after the suite changed, say): the report is
        replaced and the version's gate result updated, so a version that passes now promotes without override."""
        async with self.registry.name_lock(name):  # its current version (a reference) stays put meanwhile
            self.registry.version(name, version)  # 404s for an unknown name or version
            suite = await self.current_suite(name)
            if suite is None:
                raise suite_not_found(name)
            current = self._current_version(name)
            async with self.registry.lease(Target(engine_model=engine_name(name, version), adapter=name,
                                                  version=version)):
                # the current version compared with itself proves nothing: no `current` reference then
                report, result = await self._judge(suite, name, version, None if current == version else current)
            await self.registry.set_gate(name, version, result)
        return report

    async def _judge(self, suite: Suite, name: str, version: int, current: int | None) -> tuple[Report, GateResult]:
        """Run `suite` on `name@version` (loaded), store its report; under the name's lock."""
        references = {"base": self.registry.base_model_name,
                      "current": engine_name(name, current) if current is not None else None}
        started = time.monotonic()
        if current is not None and "current" in suite.references():
            async with self.registry.lease(Target(engine_model=references["current"], adapter=name, version=current)):
                report = await self._run(suite, name, version, references)
        else:
            report = await self._run(suite, name, version, references)
        await self._write_report(report)
        log.info("gate on %s@%d: %d/%d cases passed (%s) in %.1f s", name, version, report.passed_cases,
                 report.total_cases, "passed" if report.passed else "failed", time.monotonic() - started)
        return report, GateResult(passed=report.passed, passed_cases=report.passed_cases,
                                  total_cases=report.total_cases, suite_version=suite.version,
                                  report=report_path(name, version))

    def _current_version(self, name: str) -> int | None:
        try:
            return self.registry.get(name).current_version
        except NotFound:
            return None  # the name's first version

    async def _run(self, suite: Suite, name: str, version: int, references: dict[str, str | None]) -> Report:
        return await run_suite(suite, self.complete, engine_name(name, version), references,
                               adapter=name, version=version, suite_version=suite.version)

    async def complete(self, body: dict[str, Any], endpoint: str = "chat/completions") -> dict[str, Any]:
        """One request straight to the engine (a suite's case, or a canary's replayed sample)."""
        try:
            response = await self.engine.generate(endpoint, body)
            content = await response.read()
        except EngineUnavailable:
            # Not the version's fault: the registration fails (503) rather than record a failing report.
            raise Unavailable("the engine is not reachable; the suite could not run (nothing was registered)",
                              code="engine_unavailable") from None
        if response.status != 200:
            raise CallFailed(f"the engine refused the request ({response.status}): "
                             f"{parse_engine_error(response.status, content).message}")
        try:
            return loads_bounded(content)
        except ValueError:
            raise CallFailed("the engine's answer is not JSON") from None

    # --- reports ------------------------------------------------------------------------------------

    async def _write_report(self, report: Report) -> None:
        data = report.model_dump_json(indent=1).encode()
        await asyncio.to_thread(self.store.write_document, report.adapter, _report_key(report.version), data)

    async def report(self, name: str, version: int) -> Report:
        if all(record.version != version for record in self.registry.get(name).versions):
            raise version_not_found(name, version)
        raw = await asyncio.to_thread(self.store.read_document, name, _report_key(version))
        if raw is None:
            raise NotFound(f"`{name}@{version}` has no suite report (its name had no suite when it was registered)",
                           code="report_not_found", param="version")
        return Report.model_validate_json(raw)

    async def record_override(self, name: str, version: int, by: str, reason: str | None) -> None:
        """An admin promoted a version that failed its suite: who and when go into its report."""
        async with self._lock:
            report = await self.report(name, version)
            report.override = Override(by=by, at=int(time.time()), reason=reason)
            await self._write_report(report)
        log.warning("%s@%d promoted by %s although it failed its suite (%d/%d)%s", name, version, by,
                    report.passed_cases, report.total_cases, f": {reason}" if reason else "")
