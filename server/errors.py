"""The OpenAI error envelope, `{"error": {"message", "type", "param", "code"}}`, on every error path."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    507: "server_error",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorEnvelope(BaseModel):
    """Every error quiver answers with, whatever the route and status."""

    error: ErrorDetail


_ERROR_DESCRIPTIONS = {
    400: "Invalid request (including failed validation, which FastAPI would answer with 422)",
    401: "Missing or incorrect API key",
    403: "The key may not use this route (an admin key is needed)",
    404: "No such model, adapter, file or job (or not visible to this key)",
    409: "Conflicts with the current state",
    413: "The request body or upload is too large",
    429: "The server is at capacity; retry after `Retry-After` seconds",
    503: "The engine or the store is not available, or the server is shutting down",
    507: "The store is full: nothing was written",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the errors a route can answer with, all in the envelope."""
    return {status: {"model": ErrorEnvelope, "description": _ERROR_DESCRIPTIONS[status]} for status in statuses}


def document_errors(app: FastAPI) -> None:
    """Make the OpenAPI schema tell the truth about errors: validation failures are 400s in the envelope
    (see `_validation_error`), never FastAPI's 422 `HTTPValidationError`; and an error is JSON even where the
    route's own answer is not (FastAPI files the envelope under the route's media type, e.g. text/markdown)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            for operation in (op for path in schema.get("paths", {}).values() for op in path.values()):
                operation.get("responses", {}).pop("422", None)
                for status, response in operation.get("responses", {}).items():
                    envelope = next((media["schema"] for media in response.get("content", {}).values()
                                     if media.get("schema", {}).get("$ref", "").endswith("/ErrorEnvelope")), None)
                    if status.isdigit() and int(status) >= 400 and envelope is not None:
                        response["content"] = {"application/json": {"schema": envelope}}
            for unused in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(unused, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def error_type(status: int) -> str:
    return _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")


class APIError(Exception):
    """Raised by the HTTP layer (auth, middleware, routers); rendered as the OpenAI envelope with `status`.
    Services and stores raise a `DomainError` instead."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers


# --- domain errors --------------------------------------------------------------------------------------
# Services and stores raise these (they know nothing of HTTP); `_HTTP_BY_DOMAIN_ERROR` below is the one place
# that says which status each one is.


class DomainError(Exception):
    """Something a service or store refuses or cannot do; `code` (for clients) defaults per class."""

    code: str = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers
        if code is not None:
            self.code = code

    @property
    def status(self) -> int:
        """The HTTP status it is answered with (from the one table below)."""
        return status_of(self)


class InvalidRequest(DomainError):
    code = "invalid_request"


class InvalidModelId(InvalidRequest):
    code = "invalid_model_id"


class NotFound(DomainError):
    code = "not_found"


class Conflict(DomainError):
    code = "conflict"


class PayloadTooLarge(DomainError):
    code = "request_too_large"


class RateLimited(DomainError):
    """Too many requests for this key or this server; `headers` carries `Retry-After`."""

    code = "rate_limit_exceeded"


class Unavailable(DomainError):
    code = "unavailable"


class StorageFull(DomainError):
    code = "insufficient_storage"


class NotSupported(DomainError):
    """This server lacks the feature asked for (e.g. fine-tuning without the `training` extra)."""

    code = "not_supported"


_HTTP_BY_DOMAIN_ERROR: dict[type[DomainError], int] = {
    InvalidRequest: 400,
    NotFound: 404,
    Conflict: 409,
    PayloadTooLarge: 413,
    RateLimited: 429,
    Unavailable: 503,
    StorageFull: 507,
    NotSupported: 501,
}


def status_of(exc: DomainError) -> int:
    for cls in type(exc).__mro__:
        if cls in _HTTP_BY_DOMAIN_ERROR:
            return _HTTP_BY_DOMAIN_ERROR[cls]  # type: ignore[index]
    return 500


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=headers)


def _describe_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        # FastAPI puts the character offset where a field name goes; say what it is instead.
        offset = first.get("loc", ("body", "?"))[-1]
        reason = first.get("ctx", {}).get("error", "malformed JSON")
        return f"the request body is not valid JSON: {reason} at character {offset}", None
    location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path", "form")]
    param = ".".join(location) or None
    # Say what was wrong and where, without echoing the client's input back.
    message = first.get("msg", "invalid request")
    return (f"{param}: {message}" if param else message), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.code, exc.param, exc.headers)

    @app.exception_handler(DomainError)
    async def _domain_error(_: Request, exc: DomainError) -> JSONResponse:
        return error_response(status_of(exc), exc.message, exc.code, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation_error(exc)
        return error_response(400, message, "invalid_request", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = getattr(exc, "error_code", None) or {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, str(exc.detail), code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal server error", "internal_error")
