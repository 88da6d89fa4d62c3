"""A route whose well-formed requests skip FastAPI's generic dependency solver.

The generation routes are the hot path: every caller pays for them before the engine sees a token. FastAPI
resolves a route's parameters with a generic, recursive solver (`solve_dependencies`: headers, sub-dependencies,
the body), which on this gateway took ~0.09 ms a request with warm caches and ~0.2 ms with the caches evicted,
as they are between two requests in serving (the engine's weights stream through them). `FastPathRoute` is an
`APIRoute` (so the route, its dependencies, its header and its body stay in the OpenAPI schema exactly as
declared) that serves a *well-formed* request itself: a JSON body that validates, each header at most once. It
calls the same dependency functions and the same endpoint, with the same values FastAPI would pass. Anything
else (no or another content type, malformed JSON, a body that fails validation, a repeated header, dependency
overrides in tests) takes FastAPI's own path, so every refusal is exactly FastAPI's.

It serves only the route shapes it can serve exactly, checked when the route is built (a `TypeError` names the
route otherwise): every dependency an `async def` of the `Request` alone, header parameters of type
`str | None`, one JSON body that is a pydantic model, no path, query or cookie parameters, and an endpoint that
returns a `Response` itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Coroutine, Optional

from fastapi import Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from pydantic import BaseModel

from quiver.limits import BoundedJSONRoute, RefusedBody, bounded_request

_OPTIONAL_STR = (Optional[str], str | None)


@dataclass(frozen=True)
class _Plan:
    """What the endpoint is called with: each dependency's value by parameter name, headers, the body."""

    dependencies: tuple[tuple[str | None, Callable[[Request], Coroutine[Any, Any, Any]]], ...]
    headers: tuple[tuple[str, str], ...]  # (parameter name, header name)
    body_name: str
    body_model: type[BaseModel]


def _plan(route: APIRoute) -> _Plan:
    dependant = route.dependant

    def refuse(why: str) -> TypeError:
        return TypeError(f"FastPathRoute {sorted(route.methods)} {route.path}: {why}")

    if dependant.path_params or dependant.query_params or dependant.cookie_params:
        raise refuse("path, query and cookie parameters are not served")
    if any(getattr(dependant, name) for name in ("request_param_name", "websocket_param_name",
                                                  "http_connection_param_name", "response_param_name",
                                                  "background_tasks_param_name", "security_scopes_param_name")):
        raise refuse("the endpoint may take only dependencies, headers and the body")
    dependencies = []
    for sub in dependant.dependencies:
        if not _is_request_only(sub):
            raise refuse(f"dependency {getattr(sub.call, '__name__', sub.call)!r} is not an `async def` of the "
                         "Request alone")
        dependencies.append((sub.name, sub.call))
    headers = []
    for field in dependant.header_params:
        if field.field_info.annotation not in _OPTIONAL_STR or field.field_info.is_required():
            raise refuse(f"header {field.alias!r} is not an optional `str`")
        headers.append((field.name, field.alias))
    # Private in FastAPI (pinned); read with a default that refuses, so a rename fails here, loudly.
    if len(dependant.body_params) != 1 or getattr(route, "_embed_body_fields", True):
        raise refuse("exactly one JSON body, not embedded, is served")
    body = dependant.body_params[0]
    model = body.field_info.annotation
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise refuse("the body must be a pydantic model")
    if route.response_field is not None or route.response_model is not None:
        raise refuse("the endpoint must return a Response itself (response_model=None)")
    return _Plan(tuple(dependencies), tuple(headers), body.name, model)


def _is_request_only(sub: Dependant) -> bool:
    return (sub.is_coroutine_callable and not sub.is_gen_callable and not sub.is_async_gen_callable
            and sub.request_param_name is not None and not sub.dependencies and not sub.body_params
            and not (sub.path_params or sub.query_params or sub.header_params or sub.cookie_params)
            and not (sub.websocket_param_name or sub.http_connection_param_name or sub.response_param_name
                     or sub.background_tasks_param_name or sub.security_scopes_param_name)
            and not sub.oauth_scopes)


class FastPathRoute(BoundedJSONRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        plan = _plan(self)
        full = super().get_route_handler()
        endpoint = self.dependant.call
        overrides = self.dependency_overrides_provider

        async def handle(request: Request) -> Response:
            request = bounded_request(request)
            arguments = None if overrides is not None and overrides.dependency_overrides else \
                await _well_formed(request, plan)
            if arguments is None:
                return await full(request)  # the body read so far is cached on `request`
            values: dict[Any, Any] = {}  # FastAPI's per-request cache: each dependency runs once
            for name, call in plan.dependencies:
                if call not in values:
                    values[call] = await call(request)
                if name is not None:
                    arguments[name] = values[call]
            response = await endpoint(**arguments)
            if not isinstance(response, Response):
                raise TypeError(f"{self.path}: the endpoint returned {type(response).__name__}, not a Response")
            return response

        return handle


async def _well_formed(request: Request, plan: _Plan) -> dict[str, Any] | None:
    """The endpoint's body and header arguments, or None where FastAPI's own path must answer."""
    content_type = request.headers.get("content-type", "")
    if content_type.partition(";")[0].strip().lower() != "application/json":
        return None
    if not await request.body():
        return None
    try:
        body = plan.body_model.model_validate(await request.json())
    except (ValueError, RefusedBody):  # malformed, too deep or invalid (a ValidationError): FastAPI says which
        return None
    arguments: dict[str, Any] = {plan.body_name: body}
    for name, header in plan.headers:
        values = request.headers.getlist(header)
        if len(values) > 1:
            return None
        arguments[name] = values[0] if values else None
    return arguments
