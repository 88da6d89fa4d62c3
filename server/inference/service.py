"""Forward generation requests to the engine, stream chunks through as they come, count what they cost."""

from __future__ import annotations

import asyncio
import json
import re
import time
from contextlib import AsyncExitStack
from typing import Any, AsyncIterator, Callable

import anyio
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from quiver.adapters.service import AdapterRegistry, Target
from quiver.auth import ANONYMOUS, EVERY_MODEL, ModelScope
from quiver.engine_client import Engine, EngineError, EngineResponse, parse_engine_error
from quiver.errors import DomainError, InvalidRequest, Unavailable, error_body
from quiver.inference.limiter import RequestLimiter
from quiver.inference.protocol import _GenerationRequest
from quiver.metrics import UNKNOWN_MODEL, Metrics
from quiver.usage.service import UsageLedger

# Whitespace allowed: vLLM writes compact JSON, other servers (and the fake engine) `": "`; a miss here would
# leave a stream's tokens uncounted.
_USAGE_MARK = re.compile(rb'"usage"\s*:\s*\{')
_EMPTY_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')
_DONE = b"data: [DONE]"
_CLIENT_GONE = "499"
# A failure the version is to blame for although it is a 4xx: the engine refused to load it.
_VERSION_FAILURES = ("engine_rejected",)


def engine_unavailable() -> Unavailable:
    return Unavailable("the engine is not ready; try again shortly", code="engine_unavailable",
                       headers={"Retry-After": "5"})


class InferenceService:
    def __init__(self, engine: Engine, registry: AdapterRegistry, metrics: Metrics,
                 limiter: RequestLimiter, max_completion_tokens: int, max_n: int,
                 usage: UsageLedger | None = None) -> None:
        self.engine = engine
        self.registry = registry
        self.metrics = metrics
        self.limiter = limiter
        self.max_completion_tokens = max_completion_tokens
        self.max_n = max_n
        self.usage = usage
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
        # The fields are strict integers (protocol.py): what is checked here is exactly what reaches the engine.
        for field in ("max_tokens", "max_completion_tokens"):
            value = getattr(request, field)
            if value is not None and value > self.max_completion_tokens:
                raise InvalidRequest(f"`{field}` is {value}; this server allows at most {self.max_completion_tokens}",
                                     code="max_tokens_too_large", param=field)
        if request.n is not None and request.n > self.max_n:
            raise InvalidRequest(f"`n` is {request.n}; this server allows at most {self.max_n}", code="n_too_large",
                                 param="n")

    async def forward(self, endpoint: str, request: _GenerationRequest, scope: ModelScope = EVERY_MODEL,
                      session: str | None = None, key: str = ANONYMOUS) -> Response:
        """`session` (else the request's `user`) keeps a caller on one side of a canary; `key` is the caller's
        key fingerprint, for usage."""
        started = time.perf_counter()
        target: Target | None = None
        try:
            if self.draining:
                self.metrics.rejected_requests.labels(reason="draining").inc()
                raise Unavailable("the server is shutting down", code="server_draining")
            if not self.engine.ready:
                raise engine_unavailable()
            target = self.registry.resolve(request.model, scope, session or request.caller_id)
            self._check_caps(request)
            body = request.engine_body(target.engine_model)
            # Held until the response is complete (for a stream, until its last chunk).
            stack = AsyncExitStack()
            try:
                await stack.enter_async_context(self.limiter.slot())
                await stack.enter_async_context(self.registry.lease(target))
                upstream = await self._send(endpoint, body)
                self.registry.sample(target, endpoint, body)  # a canary's quality trigger; queued, never awaited
            except BaseException:
                await stack.aclose()
                raise
        except DomainError as exc:
            self._count(request.model, target, endpoint, exc.status, key, blamed=exc.code in _VERSION_FAILURES)
            raise
        if upstream.status != 200 or not request.stream:
            try:
                content = await upstream.read()
            except EngineError:  # unreachable, broken, or silent past the read timeout (hung)
                self._count(request.model, target, endpoint, 503, key)
                raise engine_unavailable() from None
            finally:
                upstream.close()
                await stack.aclose()
            return self._finish(request.model, target, endpoint, upstream.status, content, started, key)
        release = _Release(upstream, stack,
                           lambda status: self._record(request.model, target, endpoint, status, started, key))
        return _RelayResponse(
            self._relay(upstream, release, request, target, started, key),
            release,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _send(self, endpoint: str, body: dict[str, Any]) -> EngineResponse:
        try:
            return await self.engine.generate(endpoint, body)
        except EngineError:
            raise engine_unavailable() from None

    def _finish(self, model: str, target: Target, endpoint: str, status: int, content: bytes, started: float,
                key: str) -> Response:
        if status != 200:
            response = _engine_error(status, content)
            self._record(model, target, endpoint, response.status_code, started, key)
            return response
        self._record(model, target, endpoint, status, started, key)
        try:
            usage = json.loads(content).get("usage")
        except ValueError:
            usage = None
        self._count_tokens(target, usage, key)
        return Response(content, media_type="application/json")

    async def _relay(
        self,
        upstream: EngineResponse,
        release: "_Release",
        request: _GenerationRequest,
        target: Target,
        started: float,
        key: str,
    ) -> AsyncIterator[bytes]:
        status = "200"
        pending = b""
        first = True
        done = False
        try:
            async for chunk in upstream.chunks():
                if first:
                    self.metrics.time_to_first_token.labels(adapter=target.label).observe(time.perf_counter() - started)
                    first = False
                # Hand-written on purpose: the relay only frames events on blank lines and passes their bytes
                # through untouched; none of our pinned libraries (aiohttp, httpx, starlette) parses SSE anyway.
                pending += chunk
                *events, pending = pending.split(b"\n\n")
                done = done or any(event.strip() == _DONE for event in events)
                out = [event + b"\n\n" for event in events if self._keep_event(event, request, target, key)]
                if out:
                    yield b"".join(out)
            if release.client_gone and not done:
                status = _CLIENT_GONE  # the stream was closed because the client hung up
            elif pending.strip():
                yield pending
        except (asyncio.CancelledError, GeneratorExit):
            # Clients may hang up right after [DONE]; before it, closing upstream makes the engine abort.
            status = "200" if done else _CLIENT_GONE
            raise
        except EngineError:  # the engine broke, or stayed silent past the read timeout (hung)
            if done:
                # [DONE] has reached the client, which may hang up before the engine's stream ends (the openai
                # client does, at once); closing that stream then fails the read: the answer was whole, a 200.
                return
            if release.client_gone:  # or the response closed the engine's stream: the client hung up
                status = _CLIENT_GONE
                return
            # The 200 is already sent: the failure is the stream's last event, the envelope of a 503.
            status = "503"
            yield b"data: " + json.dumps(error_body(503, "the engine connection broke mid-stream",
                                                    "engine_unavailable")).encode() + b"\n\n"
        finally:
            await release(status)

    def _keep_event(self, event: bytes, request: _GenerationRequest, target: Target, key: str) -> bool:
        # Only the usage chunk is parsed; every other chunk passes through untouched.
        if not _USAGE_MARK.search(event):
            return True
        try:
            payload = json.loads(event.partition(b"data:")[2])
        except ValueError:
            return True
        self._count_tokens(target, payload.get("usage"), key)
        return request.wants_usage or not _EMPTY_CHOICES.search(event)

    def _record(self, model: str, target: Target, endpoint: str, status: int | str, started: float,
                key: str) -> None:
        duration = time.perf_counter() - started
        self._count(model, target, endpoint, status, key, duration_s=duration)
        self.metrics.request_duration.labels(adapter=target.label).observe(duration)

    def _count(self, model: str, target: Target | None, endpoint: str, status: int | str, key: str,
               blamed: bool = False, duration_s: float | None = None) -> None:
        """Every finished request, once: metrics per adapter and per version, usage, the canary's window."""
        # Labels come from the registry (what `model` resolved to, spelled canonically), never the caller's
        # string: `name@01`, `name@001`... would each open a series. Anything unresolved is UNKNOWN_MODEL.
        self.metrics.requests.labels(target.model_label if target else UNKNOWN_MODEL,
                                     target.label if target else UNKNOWN_MODEL, endpoint, str(status)).inc()
        if target is None:
            return
        # The version's fault: the engine failed (5xx; a client that hung up, 499, is not) or refused to load it.
        error = blamed or int(status) >= 500
        self.metrics.count_version_request(target.engine_model, str(status), error, duration_s)
        if self.usage is not None:
            self.usage.add(key, target.label, target.engine_model, requests=1, errors=int(error))
        self.registry.record_outcome(target, error)

    def _count_tokens(self, target: Target, usage: Any, key: str) -> None:
        if not isinstance(usage, dict):
            return
        prompt, completion = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
        self.metrics.prompt_tokens.labels(adapter=target.label).inc(prompt)
        self.metrics.completion_tokens.labels(adapter=target.label).inc(completion)
        self.metrics.version_prompt_tokens.labels(target.engine_model).inc(prompt)
        self.metrics.version_completion_tokens.labels(target.engine_model).inc(completion)
        if self.usage is not None:
            self.usage.add(key, target.label, target.engine_model, prompt_tokens=prompt, completion_tokens=completion)


class _Release:
    """Gives back what one stream holds (the engine response, the slot, the adapter lease) exactly once,
    from whichever path gets there first: the relay's own end, or the response's."""

    def __init__(self, upstream: EngineResponse, stack: AsyncExitStack, count: Callable[[str], None]) -> None:
        self._upstream = upstream
        self._stack = stack
        self._count = count
        self._done = False
        self.client_gone = False

    def client_left(self) -> None:
        """The client hung up: closing the engine's stream ends the relay's wait for the next chunk at once
        (the relay then counts a 499) and makes the engine abort the request."""
        self.client_gone = True
        if not self._done:
            self._upstream.close()

    async def __call__(self, status: str) -> None:
        if self._done:
            return
        self._done = True
        # Shielded: this often runs inside a cancelled scope (the client left), where any await would be
        # cancelled again and skip the rest.
        with anyio.CancelScope(shield=True):
            try:
                self._upstream.close()  # before its last chunk, closing makes the engine abort the request
            finally:
                await self._stack.aclose()
                self._count(status)


class _RelayResponse(StreamingResponse):
    """The relay's stream, which releases its resources however it ends (the slot, the lease and the engine
    request must never leak), and which notices a client that hangs up, even before the first token.

    Starlette's own streaming runs the body and a disconnect listener as two tasks of an anyio task group (for
    servers of ASGI spec < 2.4, uvicorn's included, whose `send` stays silent after a disconnect). On cold
    caches that took ~0.3 ms of CPU per request, spent while the engine computes the first token on the same
    cores. Here one plain task listens, and a disconnect closes the engine's stream: the relay stops at once,
    counts a 499, and the engine aborts the request, as with Starlette's cancellation."""

    def __init__(self, content: AsyncIterator[bytes], release: _Release, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        listener = asyncio.create_task(self._listen(receive))
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # a server of ASGI spec >= 2.4 reports a gone client so (as Starlette maps it)
            raise ClientDisconnect() from None
        finally:
            listener.cancel()
            with anyio.CancelScope(shield=True):
                # A relay left suspended mid-stream ends now, not whenever it is garbage-collected.
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
                await self._release(_CLIENT_GONE)

    async def _listen(self, receive: Receive) -> None:
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except Exception:  # noqa: BLE001 -- a receive that fails has nothing more to tell: stop listening
            return
        self._release.client_left()


def _engine_error(status: int, content: bytes) -> JSONResponse:
    """The engine's error, re-wrapped in the envelope quiver uses everywhere. A 4xx is the caller's (vLLM's own
    validation) and passes through; a 5xx is the engine failing (e.g. its core died and the supervisor is
    restarting it): the caller gets the same retryable 503 as for an unreachable engine, never a 500, and none
    of the engine's internals."""
    if status >= 500:
        unavailable = engine_unavailable()
        return JSONResponse(error_body(unavailable.status, unavailable.message, unavailable.code),
                            status_code=unavailable.status, headers=unavailable.headers)
    error = parse_engine_error(status, content)
    return JSONResponse(error_body(status, error.message, None, error.param), status_code=status)
