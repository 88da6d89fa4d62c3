"""Limits on what callers send: request body sizes, enforced while the body streams in (a Content-Length can
lie or be absent), and the depth of any JSON a caller sends."""

from __future__ import annotations

import json
from typing import Any, Callable, Coroutine

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# The HTTP layer: it answers with the envelope itself, or raises HTTP exceptions (services raise domain errors).
from quiver.errors import error_response


def _too_large(limit: int) -> "RefusedBody":
    # An HTTP exception, because it is raised from `receive` while a route reads the body: FastAPI re-raises
    # those, and turns any other exception there into a vague "error parsing the body" 400.
    return RefusedBody(f"the request body is larger than this server's limit of {limit} bytes",
                       "request_too_large", status=413)


class BodySizeLimit:
    def __init__(self, app: ASGIApp, default_limit: int, limits_by_path: dict[str, int]) -> None:
        self.app = app
        self.default_limit = default_limit
        self.limits_by_path = limits_by_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits_by_path.get(scope["path"], self.default_limit)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            error = _too_large(limit)
            await error_response(error.status_code, error.detail, error.error_code)(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _too_large(limit)
            return message

        await self.app(scope, counting_receive, send)


# --- caller JSON ----------------------------------------------------------------------------------------

# Deeper than any OpenAI request, PEFT config or safetensors header needs; deep nesting only costs stack
# (json's C parser recurses, and so do pydantic and json.dumps on the way to the engine).
MAX_JSON_DEPTH = 64


class JSONTooDeep(ValueError):
    pass


def json_depth_exceeds(value: object, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether `value` nests containers deeper than `limit`; iterative, so it cannot itself overflow."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def loads_bounded(raw: str | bytes, limit: int = MAX_JSON_DEPTH) -> Any:
    """`json.loads` for anything a caller sent: raises JSONTooDeep (a ValueError) beyond `limit` levels,
    json.JSONDecodeError (also a ValueError) for malformed JSON. The one JSON loader for caller input."""
    try:
        value = json.loads(raw)
    except RecursionError:  # the C parser's own guard: far deeper than `limit`
        raise JSONTooDeep(f"the JSON nests deeper than {limit} levels") from None
    if json_depth_exceeds(value, limit):
        raise JSONTooDeep(f"the JSON nests deeper than {limit} levels")
    return value


class RefusedBody(HTTPException):
    """Raised while FastAPI reads a body (it lets only HTTP exceptions through there); `error_code` is the
    envelope's `code`."""

    def __init__(self, message: str, error_code: str, status: int = 400) -> None:
        super().__init__(status, message)
        self.error_code = error_code


class _BoundedJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                self._json = loads_bounded(await self.body())
            except JSONTooDeep as exc:
                raise RefusedBody(str(exc), "json_too_deep") from None
        return self._json


def bounded_request(request: Request) -> Request:
    """`request`, its JSON parsed by `loads_bounded`; one already bounded is returned as is (it caches the body)."""
    if isinstance(request, _BoundedJSONRequest):
        return request
    return _BoundedJSONRequest(request.scope, request.receive)


class BoundedJSONRoute(APIRoute):
    """A route whose JSON body is parsed by `loads_bounded` (every router that takes a JSON body uses it)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def bounded(request: Request) -> Response:
            return await handler(bounded_request(request))

        return bounded
