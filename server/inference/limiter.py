"""Backpressure: a bounded number of generation requests run, a bounded number wait, the rest get 429."""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict, deque
from contextlib import asynccontextmanager
from typing import AsyncIterator

from quiver.errors import RateLimited
from quiver.metrics import Metrics


class RequestLimiter:
    def __init__(self, max_running: int, max_waiting: int, metrics: Metrics) -> None:
        self.max_waiting = max_waiting
        self.metrics = metrics
        self.running = 0
        self.waiting = 0
        self._slots = asyncio.Semaphore(max_running)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._slots.locked() and self.waiting >= self.max_waiting:
            self.metrics.rejected_requests.labels(reason="overloaded").inc()
            raise RateLimited("the server is at capacity; retry shortly", code="server_overloaded",
                              headers={"Retry-After": "1"})
        self.waiting += 1
        self.metrics.queue_depth.set(self.waiting)
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
            self.metrics.queue_depth.set(self.waiting)
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._slots.release()


class KeyLimited(Exception):
    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class KeyLimiter:
    """Per-key limits for generation: requests per minute (a sliding 60 s window) and requests at once.
    A key over its limit gets 429 with `Retry-After`; other keys are not affected. Keys are their digests."""

    def __init__(self, requests_per_minute: int | None, max_concurrent: int | None, metrics: Metrics) -> None:
        self.requests_per_minute = requests_per_minute
        self.max_concurrent = max_concurrent
        self.metrics = metrics
        self._recent: dict[bytes, deque[float]] = defaultdict(deque)
        self._running: dict[bytes, int] = defaultdict(int)

    @property
    def enabled(self) -> bool:
        return bool(self.requests_per_minute or self.max_concurrent)

    def _admit(self, key: bytes) -> None:
        now = time.monotonic()
        if self.max_concurrent and self._running[key] >= self.max_concurrent:
            self.metrics.rejected_requests.labels(reason="key_concurrency").inc()
            raise KeyLimited(f"this key already has {self.max_concurrent} requests in flight", 1)
        if self.requests_per_minute:
            recent = self._recent[key]
            while recent and recent[0] <= now - 60:
                recent.popleft()
            if len(recent) >= self.requests_per_minute:
                self.metrics.rejected_requests.labels(reason="key_rate").inc()
                raise KeyLimited(f"this key is limited to {self.requests_per_minute} requests per minute",
                                 max(1, math.ceil(recent[0] + 60 - now)))
            recent.append(now)

    @asynccontextmanager
    async def hold(self, key: bytes) -> AsyncIterator[None]:
        self._admit(key)  # no await between the check and the count: one event loop, no race
        self._running[key] += 1
        try:
            yield
        finally:
            self._running[key] -= 1
            if not self._running[key]:
                del self._running[key]
            if not self._recent.get(key, True):
                del self._recent[key]
