"""Request ids and logs an operator can use.

Every HTTP request gets an id: the caller's `X-Request-ID` when it sends a sane one, else a new one. The id
is returned in the response's `X-Request-ID`, passed to the engine (vLLM takes it as its own request id,
so its logs and spans name the same request), and put on every log line written while the request runs,
through a contextvar that a logging filter reads. `QUIVER_LOG_FORMAT=json` writes one JSON object a line.

Tracing (the `otel` extra) is on when `QUIVER_OTLP_ENDPOINT` or the standard `OTEL_EXPORTER_OTLP_*ENDPOINT`
is set: one server span per request (joining the caller's `traceparent`), and the trace context passed to
the engine, so vLLM's own spans (with `--otlp-traces-endpoint` in `QUIVER_ENGINE_EXTRA_ARGS`) join the trace.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import uuid
from contextvars import ContextVar

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from quiver.errors import error_response

HEADER = "X-Request-ID"
# Visible ASCII without quotes or backslashes, bounded: an id is echoed into headers and logs, so a hostile
# one must not split a header line, forge a log line or fill the disk. Wide enough for UUIDs, ULIDs,
# W3C trace ids and the `Root=1-...;Parent=...` ids that AWS load balancers send.
_VALID_ID = re.compile(r"[A-Za-z0-9._:;=/+@-]{1,128}")

_request_id: ContextVar[str | None] = ContextVar("quiver_request_id", default=None)


def current_request_id() -> str | None:
    """The id of the request being served in this context (None outside a request): for the engine client."""
    return _request_id.get()


def new_request_id() -> str:
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware): streamed responses pass through untouched, and the id is set in
    the same context the route, its logs and the server's access log line run in."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get(HEADER)
        request_id = new_request_id() if given is None else given
        token = _request_id.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            if given is not None and not _VALID_ID.fullmatch(given):
                # Refused rather than replaced quietly: the caller would otherwise look for an id that never
                # appears anywhere. The response carries a fresh id of ours.
                request_id = new_request_id()
                _request_id.set(request_id)
                response = error_response(
                    400, f"{HEADER} must be 1-128 characters of A-Z a-z 0-9 . _ : ; = / + @ -",
                    "invalid_request_id", param=HEADER)
                await response(scope, receive, send_with_id)
                return
            await self.app(scope, receive, send_with_id)
        finally:
            _request_id.reset(token)


class RequestIdFilter(logging.Filter):
    """Puts `request_id` on every record ("-" outside a request), for the formatters to print."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _request_id.get() or "-"
        return True


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def log_formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        return JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s",
                             rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                             timestamp=False)
    return logging.Formatter(TEXT_FORMAT)


def configure_logging(fmt: str = "text", level: int = logging.INFO, stream=None) -> None:
    """One handler on the root logger; uvicorn's loggers propagate to it (serve() passes log_config=None),
    so its access and error lines get the same format and request ids."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(log_formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # uvicorn's own loggers may have been given handlers, or disabled, by an earlier logging configuration in
    # this process (uvicorn's default dictConfig, a library's): they must reach the root handler above.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
        logger.disabled = False


def engine_headers() -> dict[str, str]:
    """Headers for a request to the engine made while serving one: the request id, and the trace context
    when tracing is on."""
    headers: dict[str, str] = {}
    request_id = _request_id.get()
    if request_id:
        headers[HEADER] = request_id
    if _tracing_on:
        from opentelemetry.propagate import inject

        inject(headers)
    return headers


_tracing_on = False


def tracing_endpoint(configured: str | None) -> str | None:
    return (configured or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None)


def _tag_request_id(span, scope) -> None:
    if span is not None and span.is_recording():
        span.set_attribute("quiver.request_id", _request_id.get() or "")


def install_tracing(app, endpoint: str | None, tracer_provider=None) -> None:
    """Spans for every request, exported over OTLP/HTTP to `endpoint` (or to what the standard OTEL_*
    variables say when `endpoint` is None). A test passes its own `tracer_provider`. Add it before
    RequestIdMiddleware, so the id is known when the span is tagged."""
    global _tracing_on
    try:
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise RuntimeError("tracing needs the otel extra: pip install 'quiver[otel]'") from exc
    if tracer_provider is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        tracer_provider = TracerProvider(resource=Resource.create({"service.name": "quiver"}))
        url = endpoint.rstrip("/") + "/v1/traces" if endpoint and not endpoint.rstrip("/").endswith("/v1/traces") else endpoint
        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
    app.add_middleware(OpenTelemetryMiddleware, tracer_provider=tracer_provider, server_request_hook=_tag_request_id,
                       exclude_spans=["receive", "send"])  # one span per request, not one per chunk
    _tracing_on = True
