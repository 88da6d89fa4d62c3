"""Forward generation requests to the engine, stream chunks through as they come, count what they cost."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import AsyncExitStack
from typing import Any, AsyncIterator, Callable

import aiohttp
import anyio
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from quiver.adapters.service import AdapterRegistry, Target
from quiver.auth import EVERY_MODEL, ModelScope
from quiver.engine import EngineSupervisor
from quiver.errors import APIError, error_body
from quiver.inference.limiter import RequestLimiter
from quiver.inference.protocol import _GenerationRequest
from quiver.metrics import Metrics
from quiver.observability import engine_headers

_USAGE_MARK = b'"usage":{'
_EMPTY_CHOICES = b'"choices":[]'
_DONE = b"data: [DONE]"
_CLIENT_GONE = "499"
# The engine connection failed or broke (a refused connect, a reset, a connect timeout).
_ENGINE_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


def engine_unavailable() -> APIError:
    return APIError(503, "the engine is not ready; try again shortly", code="engine_unavailable",
                    headers={"Retry-After": "5"})


class InferenceService:
    def __init__(self, engine: EngineSupervisor, registry: AdapterRegistry, metrics: Metrics,
                 limiter: RequestLimiter, max_completion_tokens: int, max_n: int) -> None:
        self.engine = engine
        self.registry = registry
        self.metrics = metrics
        self.limiter = limiter
        self.max_completion_tokens = max_completion_tokens
        self.max_n = max_n
        self.draining = False

    @property
    def in_flight(self) -> int:
        return self.limiter.running + self.limiter.waiting

    async def drain(self, timeout_s: float) -> None:
        """Turn new requests away and give those in flight (streams included) up to `timeout_s` to finish."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.1)

    def _check_caps(self, request: _GenerationRequest) -> None:
        extra = request.model_extra or {}
        for field in ("max_tokens", "max_completion_tokens"):
            value = extra.get(field)
            if isinstance(value, int) and value > self.max_completion_tokens:
                raise APIError(400, f"`{field}` is {value}; this server allows at most {self.max_completion_tokens}",
                               code="max_tokens_too_large", param=field)
        n = extra.get("n")
        if isinstance(n, int) and n > self.max_n:
            raise APIError(400, f"`n` is {n}; this server allows at most {self.max_n}", code="n_too_large", param="n")

    async def forward(self, endpoint: str, request: _GenerationRequest, scope: ModelScope = EVERY_MODEL) -> Response:
        started = time.perf_counter()
        target: Target | None = None
        try:
            if self.draining:
                self.metrics.rejected_requests.labels(reason="draining").inc()
                raise APIError(503, "the server is shutting down", code="server_draining")
            if not self.engine.ready:
                raise engine_unavailable()
            target = self.registry.resolve(request.model, scope)
            self._check_caps(request)
            body = request.engine_body(target.engine_model)
            # Held until the response is complete (for a stream, until its last chunk).
            stack = AsyncExitStack()
            try:
                await stack.enter_async_context(self.limiter.slot())
                await stack.enter_async_context(self.registry.lease(target))
                upstream = await self._send(endpoint, body)
            except BaseException:
                await stack.aclose()
                raise
        except APIError as exc:
            self._count(request.model if target else "", target, endpoint, exc.status)
            raise
        if upstream.status != 200 or not request.stream:
            try:
                content = await upstream.read()
            except _ENGINE_ERRORS:
                self._count(request.model, target, endpoint, 503)
                raise engine_unavailable() from None
            finally:
                upstream.release()
                await stack.aclose()
            return self._finish(request.model, target, endpoint, upstream.status, content, started)
        release = _Release(upstream, stack,
                           lambda status: self._record(request.model, target, endpoint, status, started))
        return _RelayResponse(
            self._relay(upstream, release, request, target, started),
            release,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _send(self, endpoint: str, body: dict[str, Any]) -> aiohttp.ClientResponse:
        try:
            # The engine takes the gateway's request id as its own (and joins the trace when tracing is on).
            return await self.engine.generation.post(f"/v1/{endpoint}", json=body, headers=engine_headers())
        except _ENGINE_ERRORS:
            raise engine_unavailable() from None

    def _finish(self, model: str, target: Target, endpoint: str, status: int, content: bytes, started: float) -> Response:
        self._record(model, target, endpoint, status, started)
        if status != 200:
            return _engine_error(status, content)
        try:
            usage = json.loads(content).get("usage")
        except ValueError:
            usage = None
        self._count_tokens(target, usage)
        return Response(content, media_type="application/json")

    async def _relay(
        self,
        upstream: aiohttp.ClientResponse,
        release: "_Release",
        request: _GenerationRequest,
        target: Target,
        started: float,
    ) -> AsyncIterator[bytes]:
        status = "200"
        pending = b""
        first = True
        done = False
        try:
            async for chunk in upstream.content.iter_any():
                if first:
                    self.metrics.time_to_first_token.labels(adapter=target.label).observe(time.perf_counter() - started)
                    first = False
                pending += chunk
                *events, pending = pending.split(b"\n\n")
                done = done or any(event.strip() == _DONE for event in events)
                out = [event + b"\n\n" for event in events if self._keep_event(event, request, target)]
                if out:
                    yield b"".join(out)
            if pending.strip():
                yield pending
        except (asyncio.CancelledError, GeneratorExit):
            # Clients may hang up right after [DONE]; before it, closing upstream makes the engine abort.
            status = "200" if done else _CLIENT_GONE
            raise
        except _ENGINE_ERRORS:
            status = "502"
            yield b"data: " + json.dumps(error_body(502, "the engine connection broke mid-stream",
                                                    "engine_unavailable")).encode() + b"\n\n"
        finally:
            await release(status)

    def _keep_event(self, event: bytes, request: _GenerationRequest, target: Target) -> bool:
        # Only the usage chunk is parsed; every other chunk passes through untouched.
        if _USAGE_MARK not in event:
            return True
        try:
            payload = json.loads(event.partition(b"data:")[2])
        except ValueError:
            return True
        self._count_tokens(target, payload.get("usage"))
        return request.wants_usage or _EMPTY_CHOICES not in event

    def _record(self, model: str, target: Target, endpoint: str, status: int | str, started: float) -> None:
        self._count(model, target, endpoint, status)
        self.metrics.request_duration.labels(adapter=target.label).observe(time.perf_counter() - started)

    def _count(self, model: str, target: Target | None, endpoint: str, status: int | str) -> None:
        # Unknown model names are not used as label values: they would let clients grow the series without bound.
        self.metrics.requests.labels(model if target else "", target.label if target else "", endpoint, str(status)).inc()

    def _count_tokens(self, target: Target, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        self.metrics.prompt_tokens.labels(adapter=target.label).inc(usage.get("prompt_tokens") or 0)
        self.metrics.completion_tokens.labels(adapter=target.label).inc(usage.get("completion_tokens") or 0)


class _Release:
    """Gives back what one stream holds (the engine response, the slot, the adapter lease) exactly once,
    from whichever path gets there first: the relay's own end, or the response's."""

    def __init__(self, upstream: aiohttp.ClientResponse, stack: AsyncExitStack, count: Callable[[str], None]) -> None:
        self._upstream = upstream
        self._stack = stack
        self._count = count
        self._done = False

    async def __call__(self, status: str) -> None:
        if self._done:
            return
        self._done = True
        # Shielded: this often runs inside a cancelled scope (the client left), where any await would be
        # cancelled again and skip the rest.
        with anyio.CancelScope(shield=True):
            try:
                if self._upstream.content.at_eof():
                    self._upstream.release()  # read to the end: the connection goes back to the pool
                else:
                    self._upstream.close()  # before its last chunk, closing makes the engine abort the request
            finally:
                await self._stack.aclose()
                self._count(status)


class _RelayResponse(StreamingResponse):
    """A stream that releases its resources even when its body never starts: Starlette does not start the
    body iterator at all when the client is gone before the response begins, so the relay's own `finally`
    would never run and the slot, the lease and the engine request would leak."""

    def __init__(self, content: AsyncIterator[bytes], release: _Release, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                # A relay left suspended mid-stream ends now, not whenever it is garbage-collected.
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
                await self._release(_CLIENT_GONE)


def _engine_error(status: int, content: bytes) -> JSONResponse:
    """The engine's error, re-wrapped in the envelope quiver uses everywhere."""
    message, param = "the engine could not serve this request", None
    try:
        error = json.loads(content)["error"]
        message, param = str(error.get("message") or message), error.get("param")
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    code = "engine_error" if status >= 500 else None
    return JSONResponse(error_body(status, message, code, param if isinstance(param, str) else None), status_code=status)
