"""An in-process engine for fast tests of the gateway's logic: the same `quiver.engine_client.Engine`
protocol as the supervised vLLM engine, no process, no model.

- Deterministic tokens per adapter: completion token i of model m is `"<m>#<i> "`, so a test can tell which
  adapter (or version: the engine name is `name@version`) answered.
- Controllable latency: `first_token_delay_s`, `token_delay_s`; `gate` (an `asyncio.Event`) holds every
  generation before its first token until the test sets it.
- Injectable failures: `fail("unavailable")` (connections refused), `fail("hang")` (nothing answers: calls
  wait for the read/health timeout, then raise `EngineTimeout`, as `HttpEngineClient` does),
  `refuse_loads = True` (the engine rejects adapter loads), `fail(None)` to heal; `restart()` is a new engine
  process: nothing loaded, listeners told.
- Observable: `loaded`, `load_calls`, `unload_calls`, `requests` (bodies received), `aborted` (responses
  closed before their end), `completed`.

Errors for unknown models come back as vLLM's own 404 envelope, so they cross the seam as with vLLM.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from quiver.engine_client import (
    AdapterAlreadyLoaded,
    AdapterNotFound,
    EngineRejected,
    EngineResponse,
    EngineTimeout,
    EngineUnavailable,
    RestartListener,
)

Failure = Literal["unavailable", "hang"] | None
DEFAULT_MAX_TOKENS = 8


def fake_token(model: str, index: int) -> str:
    return f"{model}#{index} "


def fake_text(model: str, tokens: int) -> str:
    """What the fake engine answers `model` with `tokens` completion tokens."""
    return "".join(fake_token(model, i) for i in range(tokens))


class _FakeResponse:
    def __init__(self, engine: "FakeEngine", status: int, events: AsyncIterator[bytes] | None, body: bytes = b"") -> None:
        self._engine = engine
        self.status = status
        self._events = events
        self._body = body
        self._finished = events is None
        self._closed = False
        self._counted = status == 200  # only answers that reached generation count as running

    async def read(self) -> bytes:
        if self._events is None:
            return self._body
        parts = [part async for part in self.chunks()]
        return b"".join(parts)

    async def chunks(self) -> AsyncIterator[bytes]:
        if self._events is None:
            yield self._body
            return
        async for part in self._events:
            if self._closed:
                return
            yield part
        self._finished = True
        self._engine.completed += 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._counted:
            return
        if not self._finished:
            self._engine.aborted += 1
        self._engine.running -= 1


class FakeEngine:
    def __init__(self, base_model_name: str, *, first_token_delay_s: float = 0.0, token_delay_s: float = 0.0,
                 read_timeout_s: float = 2.0, health_timeout_s: float = 1.0) -> None:
        self.base_model_name = base_model_name
        self.first_token_delay_s = first_token_delay_s
        self.token_delay_s = token_delay_s
        self.read_timeout_s = read_timeout_s
        self.health_timeout_s = health_timeout_s
        self.gate: asyncio.Event | None = None
        self.ready = False
        self.restarts = 0
        self.failure: Failure = None
        self.refuse_loads = False
        self.loaded: dict[str, Path] = {}
        self.load_calls: list[str] = []
        self.unload_calls: list[str] = []
        # Like vLLM's worker: an unload drops the name but not a pin, which holds its slot until unpinned.
        self.pinned: set[str] = set()
        self.pin_calls: list[tuple[str, bool]] = []
        self.requests: list[dict[str, Any]] = []
        self.running = 0  # responses not yet closed
        self.aborted = 0
        self.completed = 0
        self._listeners: list[RestartListener] = []
        self._heal = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None  # the gateway's, once started

    def threadsafe(self, function, *args):
        """Run `function(*args)` (or await it, if it is a coroutine function) on the gateway's event loop from
        another thread (a test's) and return its result: the fake's state belongs to that loop."""
        assert self.loop is not None, "the fake engine has not been started"

        async def call():
            result = function(*args)
            return await result if asyncio.iscoroutine(result) else result

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(timeout=60)

    def hold(self) -> None:
        """From now on generations wait before their first token until `release()`."""
        self.threadsafe(self._set_gate, asyncio.Event)

    def release(self) -> None:
        self.threadsafe(lambda: self.gate.set() if self.gate else None)

    def _set_gate(self, make) -> None:
        self.gate = make()

    # --- lifecycle ----------------------------------------------------------------------------------

    def on_restart(self, listener: RestartListener) -> None:
        self._listeners.append(listener)

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False

    async def aclose(self) -> None:
        pass

    async def restart(self) -> None:
        """A new engine process: it knows no adapters."""
        self.loaded.clear()
        self.pinned.clear()
        self.failure = None
        self._heal.set()
        self.restarts += 1
        self.ready = True
        for listener in self._listeners:
            await listener()

    # --- failure injection --------------------------------------------------------------------------

    def fail(self, failure: Failure) -> None:
        self.failure = failure
        if failure is None:
            self._heal.set()
        else:
            self._heal = asyncio.Event()

    async def _check(self, timeout_s: float) -> None:
        """What a call meets before the engine does anything: a refused connection, or silence."""
        if self.failure == "unavailable":
            raise EngineUnavailable("the engine connection failed (fake: refused)")
        if self.failure == "hang":
            try:
                await asyncio.wait_for(self._heal.wait(), timeout_s)
            except asyncio.TimeoutError:
                raise EngineTimeout("the engine did not answer in time (fake: hung)") from None
            if self.failure == "unavailable":
                raise EngineUnavailable("the engine connection failed (fake: refused)")

    # --- the calls ----------------------------------------------------------------------------------

    async def health(self) -> None:
        await self._check(self.health_timeout_s)

    async def metrics_text(self) -> str:
        await self._check(self.health_timeout_s)
        return (
            "# HELP vllm:fake_requests_total Requests the fake engine received.\n"
            "# TYPE vllm:fake_requests_total counter\n"
            f"vllm:fake_requests_total {len(self.requests)}\n"
        )

    async def loaded_models(self) -> set[str]:
        await self._check(self.health_timeout_s)
        return {self.base_model_name, *self.loaded}

    async def load_adapter(self, name: str, path: Path) -> None:
        await self._check(self.read_timeout_s)
        self.load_calls.append(name)
        if self.refuse_loads:
            raise EngineRejected(500, f"fake: the engine refused to load {name}", None, "InternalServerError")
        if name in self.loaded:
            raise AdapterAlreadyLoaded(name)
        if not Path(path).is_dir():
            raise AdapterNotFound(f"fake: no adapter at {path}")
        self.loaded[name] = Path(path)

    async def unload_adapter(self, name: str) -> None:
        await self._check(self.read_timeout_s)
        self.unload_calls.append(name)
        if self.loaded.pop(name, None) is None:
            raise AdapterNotFound(name)

    async def set_pinned(self, name: str, pinned: bool) -> None:
        await self._check(self.read_timeout_s)
        self.pin_calls.append((name, pinned))
        if name not in self.loaded:
            raise AdapterNotFound(name)
        if pinned:
            self.pinned.add(name)
        else:
            self.pinned.discard(name)

    async def generate(self, endpoint: str, body: dict[str, Any]) -> EngineResponse:
        await self._check(self.read_timeout_s)
        self.requests.append(body)
        model = body.get("model")
        if model != self.base_model_name and model not in self.loaded:
            error = {"error": {"message": f"The model `{model}` does not exist.", "type": "NotFoundError",
                               "param": "model", "code": 404}}
            return _FakeResponse(self, 404, None, json.dumps(error).encode())
        self.running += 1
        tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS)
        n = int(body.get("n") or 1)
        chat = endpoint == "chat/completions"
        if body.get("stream"):
            return _FakeResponse(self, 200, self._stream(model, chat, tokens, n, body))
        await self._wait_first_token()
        await asyncio.sleep(self.token_delay_s * tokens)
        text = fake_text(model, tokens)
        choices = [
            {"index": i, "finish_reason": "length",
             **({"message": {"role": "assistant", "content": text}} if chat else {"text": text})}
            for i in range(n)
        ]
        answer = {"id": "fake-1", "object": "chat.completion" if chat else "text_completion",
                  "created": int(time.time()), "model": model, "choices": choices,
                  "usage": {"prompt_tokens": 5, "completion_tokens": tokens * n, "total_tokens": 5 + tokens * n}}
        response = _FakeResponse(self, 200, None, json.dumps(answer).encode())
        response._finished = True
        self.completed += 1
        return response

    async def _wait_first_token(self) -> None:
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(self.first_token_delay_s)

    async def _stream(self, model: str, chat: bool, tokens: int, n: int, body: dict[str, Any]) -> AsyncIterator[bytes]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        created = int(time.time())

        def event(payload: dict[str, Any]) -> bytes:
            return b"data: " + json.dumps({"id": "fake-1", "object": obj, "created": created, "model": model,
                                          **payload}).encode() + b"\n\n"

        await self._wait_first_token()
        for i in range(tokens):
            if i:
                await asyncio.sleep(self.token_delay_s)
            if self.failure is not None:  # the engine broke or hung mid-stream
                await self._check(self.read_timeout_s)
            piece = fake_token(model, i)
            choices = [{"index": c, "finish_reason": None,
                        **({"delta": {"content": piece}} if chat else {"text": piece})} for c in range(n)]
            yield event({"choices": choices})
        if (body.get("stream_options") or {}).get("include_usage"):
            yield event({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": tokens * n,
                                                  "total_tokens": 5 + tokens * n}})
        yield b"data: [DONE]\n\n"
