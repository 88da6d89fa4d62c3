"""Backpressure: a bounded number of generation requests run, a bounded number wait, the rest get 429."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import AsyncIterator

from quiver.errors import APIError
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
            raise APIError(429, "the server is at capacity; retry shortly", code="server_overloaded",
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
