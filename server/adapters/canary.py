"""Canary traffic between an adapter's current version and one other version, and its automatic rollback.

A canary is part of the adapter's record in the store (`<name>/canary.json`), so every replica sharing the
store splits the same way. Only requests for the bare name are split; `name@N` is never split.

Which version a request gets: with a caller id (the `x-quiver-session` header, else OpenAI's `user` field)
a stable hash of (name, id) decides, so a caller keeps its version for the whole canary, and raising the
weight only moves more callers onto the canary, never any back; without an id, a weighted random draw.

Rollback: each replica watches the requests it split itself, per version, over a sliding window. Once both
versions have `min_requests` in the window and the canary's error rate exceeds the current version's by more
than `max_error_rate_margin`, the canary ends by itself; the record keeps why (`ended_reason`).
An error is an answer the version is to blame for: a 5xx (the engine failed, or could not load the version)
or the engine refusing to load it; the caller's own 4xx and clients hanging up are not.

The second trigger, quality: with `live_sample_rate` > 0, that share of the split requests is replayed in the
background on both versions with fixed sampling and each answer scored with the live checks of the name's
suite (`quiver.suites.live`); the window keeps those scores per version too, and once both versions have
`min_scored` of them, a canary whose mean score is below the current version's by more than
`max_score_margin` ends the same way.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

CANARY_DOCUMENT = "canary.json"  # the record's key among the name's store documents (beside index.json)
# Outcomes kept per version and canary: bounds memory whatever the traffic (then the window is shorter).
MAX_OUTCOMES = 10_000


class RollbackPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    window_s: float = Field(300.0, ge=1, le=86_400, strict=True,
                            description="the sliding window the error rates are measured over, in seconds")
    min_requests: int = Field(20, ge=1, le=MAX_OUTCOMES, strict=True,
                              description="requests each version needs in the window before they are compared")
    max_error_rate_margin: float = Field(
        0.05, ge=0, le=1, strict=True,
        description="how much higher than the current version's the canary's error rate may be (0.05: 5 points)")
    live_sample_rate: float = Field(
        0.0, ge=0, le=1, strict=True,
        description="share of the split requests replayed on both versions (temperature 0, seed 0) in the "
                    "background and scored with the live checks of the name's suite; 0: no quality trigger")
    min_scored: int = Field(10, ge=1, le=MAX_OUTCOMES, strict=True,
                            description="scored samples each version needs in the window before they are compared")
    max_score_margin: float = Field(
        0.1, ge=0, le=1, strict=True,
        description="how much lower than the current version's the canary's mean live score may be (0 to 1)")


class CanaryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1, le=2**31 - 1, strict=True, description="the version that gets a share of the traffic")
    weight: float = Field(gt=0, lt=1, strict=True,
                          description="the canary's share of the bare name's traffic, e.g. 0.1 for 90/10")
    rollback: RollbackPolicy = Field(default_factory=RollbackPolicy)
    override_gate: bool = Field(False, strict=True,
                                description="start it although the version failed its suite (recorded)")
    reason: str | None = Field(None, max_length=1000, description="why, with override_gate")


class WindowStats(BaseModel):
    requests: int
    errors: int
    error_rate: float | None
    scored: int = Field(0, description="sampled requests replayed on this version and scored, in the window")
    score: float | None = Field(None, description="their mean live score (share of the live checks passed)")


class GateOverride(BaseModel):
    """A canary started on a version that failed its suite: who, when, why."""

    by: str
    at: int
    reason: str | None = None


class Canary(BaseModel):
    """The record persisted as `<name>/canary.json`; an ended canary stays as the last record, with why."""

    object: Literal["adapter.canary"] = "adapter.canary"
    name: str
    version: int
    weight: float
    rollback: RollbackPolicy
    started_at: int
    active: bool = True
    ended_at: int | None = None
    ended_reason: str | None = Field(None, description="`rolled_back: ...`, `ended`, `promoted`, `version_deleted`")
    live_suite_version: int | None = Field(
        None, description="the suite whose live checks score sampled traffic (with rollback.live_sample_rate > 0)")
    gate_override: GateOverride | None = None
    # Filled in only in answers: this replica's view of the sliding window, per version (`name@N`).
    window: dict[str, WindowStats] | None = None


def sticky_point(name: str, caller: str) -> float:
    """A stable point in [0, 1) for (adapter, caller): the same on every replica and every restart."""
    digest = hashlib.sha256(f"{name}\0{caller}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def choose_version(canary: Canary, current: int, caller: str | None, rng: random.Random) -> int:
    point = sticky_point(canary.name, caller) if caller else rng.random()
    return canary.version if point < canary.weight else current


@dataclass
class _Series:
    """Timed values in a sliding window (bounded: the oldest go first)."""

    times: deque = field(default_factory=lambda: deque(maxlen=MAX_OUTCOMES))
    values: deque = field(default_factory=lambda: deque(maxlen=MAX_OUTCOMES))

    def add(self, at: float, value: float) -> None:
        self.times.append(at)
        self.values.append(value)

    def trim(self, since: float) -> None:
        while self.times and self.times[0] < since:
            self.times.popleft()
            self.values.popleft()

    def summary(self) -> tuple[int, float, float | None]:
        """Count, sum, mean."""
        count, total = len(self.values), float(sum(self.values))
        return count, total, total / count if count else None


@dataclass
class _Outcomes:
    errors: _Series = field(default_factory=_Series)  # 1 per request the version is to blame for, else 0
    scores: _Series = field(default_factory=_Series)  # live scores of replayed samples, 0 to 1

    def trim(self, since: float) -> None:
        self.errors.trim(since)
        self.scores.trim(since)

    def stats(self) -> WindowStats:
        requests, errors, error_rate = self.errors.summary()
        scored, _, score = self.scores.summary()
        return WindowStats(requests=requests, errors=int(errors), error_rate=error_rate, scored=scored, score=score)


class CanaryWatch:
    """One replica's sliding window over the split traffic of one canary (current and canary arms)."""

    def __init__(self, canary: Canary, clock=time.monotonic) -> None:
        self.canary = canary
        self.clock = clock
        self.outcomes: dict[int, _Outcomes] = {}
        self.ending = False  # a rollback was decided: later outcomes don't decide it again

    def record(self, version: int, error: bool) -> None:
        self.outcomes.setdefault(version, _Outcomes()).errors.add(self.clock(), float(error))

    def record_score(self, version: int, score: float) -> None:
        self.outcomes.setdefault(version, _Outcomes()).scores.add(self.clock(), score)

    def stats(self, current: int | None) -> dict[int, WindowStats]:
        since = self.clock() - self.canary.rollback.window_s
        for outcomes in self.outcomes.values():
            outcomes.trim(since)
        versions = {self.canary.version, *([current] if current is not None else [])}
        return {v: (self.outcomes[v] if v in self.outcomes else _Outcomes()).stats() for v in versions}

    def verdict(self, current: int) -> str | None:
        """The reason to roll back now, or None."""
        if self.ending:
            return None
        policy = self.canary.rollback
        stats = self.stats(current)
        canary, baseline = stats[self.canary.version], stats[current]
        if (canary.requests >= policy.min_requests and baseline.requests >= policy.min_requests
                and canary.error_rate - baseline.error_rate > policy.max_error_rate_margin):  # type: ignore[operator]
            return (f"rolled_back: error rate {canary.error_rate:.1%} ({canary.errors}/{canary.requests}) against "
                    f"{baseline.error_rate:.1%} ({baseline.errors}/{baseline.requests}) for version {current} over "
                    f"the last {policy.window_s:g}s, more than the allowed margin of "
                    f"{policy.max_error_rate_margin:.1%}")
        if (canary.scored >= policy.min_scored and baseline.scored >= policy.min_scored
                and baseline.score - canary.score > policy.max_score_margin + 1e-9):  # type: ignore[operator]
            return (f"rolled_back: live suite score {canary.score:.2f} ({canary.scored} sampled) against "
                    f"{baseline.score:.2f} ({baseline.scored}) for version {current} over the last "
                    f"{policy.window_s:g}s, lower by more than the allowed margin of {policy.max_score_margin:.2f}")
        return None
