"""Routes of the suites: a name's suite, and the gate's reports on its versions (admin keys)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse

from quiver.adapters.model_id import parse_adapter_name, parse_adapter_ref
from quiver.auth import admin_auth
from quiver.errors import InvalidModelId, error_responses
from quiver.limits import BoundedJSONRoute
from quiver.suites.protocol import Report, Suite, SuiteSpec
from quiver.suites.runner import render_markdown
from quiver.suites.service import SuiteService

router = APIRouter(prefix="/v1/adapters", tags=["suites"], dependencies=[Depends(admin_auth)],
                   responses=error_responses(401, 403, 503), route_class=BoundedJSONRoute)


async def _suites(request: Request) -> SuiteService:
    return request.app.state.suites


Suites = Annotated[SuiteService, Depends(_suites)]


class MarkdownResponse(PlainTextResponse):
    media_type = "text/markdown"  # the OpenAPI schema says so too (its content type comes from the class)


def _version_ref(ref: str) -> tuple[str, int]:
    parsed = parse_adapter_ref(ref, "ref")
    if parsed.version is None:
        raise InvalidModelId(f"a report belongs to one version: ask for `{parsed.name}@N`", param="ref")
    return parsed.name, parsed.version


@router.get("/{name}/suite", responses=error_responses(400, 404))
async def get_suite(name: str, suites: Suites) -> Suite:
    return await suites.get_suite(parse_adapter_name(name))


@router.put("/{name}/suite", responses=error_responses(400, 413))
async def put_suite(name: str, spec: SuiteSpec, suites: Suites) -> Suite:
    """Set the name's suite (a new suite version); it gates every version registered from now on."""
    return await suites.put_suite(parse_adapter_name(name), spec)


@router.post("/{ref}/suite/run", responses=error_responses(400, 404))
async def rerun_suite(ref: str, suites: Suites) -> Report:
    """Run the name's suite (its latest) on `name@N` again: the report is replaced and the version's gate result
    updated (a version that passes now promotes without `override_gate`)."""
    return await suites.rerun(*_version_ref(ref))


@router.get("/{ref}/report", responses=error_responses(400, 404))
async def get_report(ref: str, suites: Suites) -> Report:
    """The gate's report on `name@N` (JSON)."""
    return await suites.report(*_version_ref(ref))


@router.get("/{ref}/report.md", response_class=MarkdownResponse, responses=error_responses(400, 404))
async def get_report_markdown(ref: str, suites: Suites) -> MarkdownResponse:
    """The gate's report on `name@N` as a Markdown page: each case, its checks, the answers side by side."""
    report = await suites.report(*_version_ref(ref))
    return MarkdownResponse(render_markdown(report))
