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


class CanaryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1, le=2**31 - 1, strict=True, description="the version that gets a share of the traffic")
    weight: float = Field(gt=0, lt=1, strict=True,
                          description="the canary's share of the bare name's traffic, e.g. 0.1 for 90/10")
    rollback: RollbackPolicy = Field(default_factory=RollbackPolicy)


class WindowStats(BaseModel):
    requests: int
    errors: int
    error_rate: float | None


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
class _Outcomes:
    times: deque = field(default_factory=lambda: deque(maxlen=MAX_OUTCOMES))
    errors: deque = field(default_factory=lambda: deque(maxlen=MAX_OUTCOMES))

    def add(self, at: float, error: bool) -> None:
        self.times.append(at)
        self.errors.append(error)

    def trim(self, since: float) -> None:
        while self.times and self.times[0] < since:
            self.times.popleft()
            self.errors.popleft()

    def stats(self) -> WindowStats:
        requests, errors = len(self.times), sum(self.errors)
        return WindowStats(requests=requests, errors=errors, error_rate=errors / requests if requests else None)


class CanaryWatch:
    """One replica's sliding window over the split traffic of one canary (current and canary arms)."""

    def __init__(self, canary: Canary, clock=time.monotonic) -> None:
        self.canary = canary
        self.clock = clock
        self.outcomes: dict[int, _Outcomes] = {}
        self.ending = False  # a rollback was decided: later outcomes don't decide it again

    def record(self, version: int, error: bool) -> None:
        self.outcomes.setdefault(version, _Outcomes()).add(self.clock(), error)

    def stats(self, current: int | None) -> dict[int, WindowStats]:
        since = self.clock() - self.canary.rollback.window_s
        for outcomes in self.outcomes.values():
            outcomes.trim(since)
        versions = {self.canary.version, *([current] if current is not None else [])}
        return {v: (self.outcomes[v].stats() if v in self.outcomes else WindowStats(requests=0, errors=0,
                                                                                  error_rate=None))
                for v in versions}

    def verdict(self, current: int) -> str | None:
        """The reason to roll back now, or None."""
        if self.ending:
            return None
        policy = self.canary.rollback
        stats = self.stats(current)
        canary, baseline = stats[self.canary.version], stats[current]
        if canary.requests < policy.min_requests or baseline.requests < policy.min_requests:
            return None
        assert canary.error_rate is not None and baseline.error_rate is not None
        if canary.error_rate - baseline.error_rate > policy.max_error_rate_margin:
            return (f"rolled_back: error rate {canary.error_rate:.1%} ({canary.errors}/{canary.requests}) against "
                    f"{baseline.error_rate:.1%} ({baseline.errors}/{baseline.requests}) for version {current} over "
                    f"the last {policy.window_s:g}s, more than the allowed margin of "
                    f"{policy.max_error_rate_margin:.1%}")
        return None
