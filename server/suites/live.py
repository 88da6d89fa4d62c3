"""A canary's quality trigger: a sample of its live traffic, replayed on both versions and scored with the live
checks of the name's suite (`SuiteSpec.live_checks`).

Each sampled request (drawn by the registry at `rollback.live_sample_rate`, see `AdapterRegistry.sample`) is
replayed in the background on the current version and on the canary, with the same messages and fixed sampling
(temperature 0, seed 0, at most `MAX_CASE_TOKENS` tokens), and each answer gets the share of the live checks it
passes. Replaying both, rather than scoring the caller's own answer against a replay on the other version,
makes each sample a like-for-like pair: the caller's temperature does not decide which version looks better, and
the caller's answer (streamed or not) is never held, copied or parsed on its way out. The scores go to the
canary's window (`CanaryWatch`), which rolls the canary back when its mean is below the current version's by more
than `rollback.max_score_margin` once both have `rollback.min_scored` samples.

Bounded: a queue of `QUIVER_CANARY_SAMPLE_QUEUE` requests (a full queue drops the sample: the caller never
waits), `QUIVER_CANARY_SAMPLE_CONCURRENCY` replays at once. Replays are quiver's own traffic: not in usage or
the per-version request metrics, and they take no caller's slot.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from quiver.adapters.canary import Canary
from quiver.adapters.service import AdapterRegistry, Target, engine_name
from quiver.errors import Conflict, DomainError, InvalidRequest, NotFound
from quiver.suites.checks import check_answer
from quiver.suites.protocol import MAX_CASE_TOKENS, Answer, LiveCheck
from quiver.suites.runner import CallFailed, parse_answer
from quiver.suites.service import SuiteService

log = logging.getLogger(__name__)

DEFAULT_REPLAY_TOKENS = 128  # when the caller set no max_tokens
# What makes the request the same request; everything about sampling is replaced by fixed values.
_REPLAYED_FIELDS = ("messages", "prompt", "tools", "tool_choice", "response_format", "stop")
_CACHED_SUITES = 256


def replay_body(body: dict[str, Any], model: str) -> dict[str, Any]:
    kept = {field: body[field] for field in _REPLAYED_FIELDS if field in body}
    asked = body.get("max_completion_tokens") or body.get("max_tokens")
    max_tokens = min(asked, MAX_CASE_TOKENS) if isinstance(asked, int) and asked > 0 else DEFAULT_REPLAY_TOKENS
    return {**kept, "model": model, "stream": False, "n": 1, "temperature": 0, "seed": 0, "max_tokens": max_tokens}


def live_score(checks: list[LiveCheck], answer: Answer) -> float:
    """The share of the live checks the answer passes (an answer that is an error passes none)."""
    return sum(check_answer(check, answer).passed for check in checks) / len(checks)


class LiveScorer:
    """The registry's `LiveSampler`: queue, workers, scoring."""

    def __init__(self, registry: AdapterRegistry, suites: SuiteService, queue_size: int, concurrency: int) -> None:
        self.registry = registry
        self.suites = suites
        self.concurrency = concurrency
        self._queue: asyncio.Queue[tuple[Canary, int, str, dict[str, Any]]] = asyncio.Queue(maxsize=queue_size)
        self._workers: list[asyncio.Task] = []
        self._checks: dict[tuple[str, int], list[LiveCheck]] = {}  # (name, suite version) -> its live checks
        self.dropped = 0  # samples turned away by a full queue
        self.scored = 0  # samples scored on both versions

    def start(self) -> None:
        self._workers = [asyncio.create_task(self._work()) for _ in range(self.concurrency)]

    async def stop(self) -> None:
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []

    async def idle(self) -> None:
        """Wait until every queued sample has been scored (tests)."""
        await self._queue.join()

    # --- the registry's side -------------------------------------------------------------------------

    async def live_suite_version(self, name: str) -> int:
        suite = await self.suites.current_suite(name)
        if suite is None or not suite.live_checks:
            raise Conflict(f"`{name}`'s suite has no live_checks to score live traffic with: add some (contains, "
                           "regex, json, json_schema, max_tokens) or set rollback.live_sample_rate to 0",
                           code="no_live_checks", param="rollback.live_sample_rate")
        self._remember(name, suite.version, suite.live_checks)
        return suite.version

    def offer(self, canary: Canary, current: int, endpoint: str, body: dict[str, Any]) -> bool:
        try:
            self._queue.put_nowait((canary, current, endpoint, body))
            return True
        except asyncio.QueueFull:
            self.dropped += 1
            return False

    # --- the workers ---------------------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            canary, current, endpoint, body = await self._queue.get()
            try:
                await self._score(canary, current, endpoint, body)
            except Exception:  # one bad sample must not stop the worker
                log.exception("scoring a sample of the canary %s@%d failed", canary.name, canary.version)
            finally:
                self._queue.task_done()

    async def _score(self, canary: Canary, current: int, endpoint: str, body: dict[str, Any]) -> None:
        checks = await self._live_checks(canary.name, canary.live_suite_version)  # type: ignore[arg-type]
        if not checks:
            return
        scores: dict[int, float] = {}
        for version in (current, canary.version):
            answer = await self._answer(canary.name, version, endpoint, body)
            if answer is None:
                return  # nobody's fault (the engine is away, the version was deleted): no sample
            scores[version] = live_score(checks, answer)
        self.scored += 1
        self.registry.record_scores(canary, scores)

    async def _answer(self, name: str, version: int, endpoint: str, body: dict[str, Any]) -> Answer | None:
        model = engine_name(name, version)
        try:
            async with self.registry.lease(Target(engine_model=model, adapter=name, version=version)):
                completion = await self.suites.complete(replay_body(body, model), endpoint)
        except CallFailed as exc:  # the engine refused or failed this version's answer: it scores nothing
            return Answer(model=model, error=str(exc)[:500])
        except InvalidRequest as exc:  # the engine refused to load the version: its fault too
            return Answer(model=model, error=exc.message[:500])
        except (NotFound, DomainError):
            return None
        return parse_answer(model, completion)

    async def _live_checks(self, name: str, suite_version: int) -> list[LiveCheck]:
        checks = self._checks.get((name, suite_version))
        if checks is None:
            suite = await self.suites.suite_version(name, suite_version)
            checks = suite.live_checks if suite is not None else []
            self._remember(name, suite_version, checks)
        return checks

    def _remember(self, name: str, suite_version: int, checks: list[LiveCheck]) -> None:
        if len(self._checks) >= _CACHED_SUITES:
            self._checks.clear()
        self._checks[(name, suite_version)] = checks
