"""Request body size limits, enforced while the body streams in (a Content-Length can lie or be absent)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from quiver.errors import APIError, error_response


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than this server's limit of {limit} bytes",
                    code="request_too_large")


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
            await error_response(error.status, error.message, error.code)(scope, receive, send)
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
