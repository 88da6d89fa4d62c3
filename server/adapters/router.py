from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.security.utils import get_authorization_scheme_param

from quiver.adapters.canary import Canary, CanaryRequest
from quiver.adapters.model_id import parse_adapter_name, parse_adapter_ref
from quiver.adapters.protocol import Adapter, AdapterList, AdapterVersion, Deleted, PinRequest, PromoteRequest
from quiver.adapters.service import AdapterRegistry
from quiver.auth import admin_auth
from quiver.errors import error_responses
from quiver.limits import BoundedJSONRoute

router = APIRouter(prefix="/v1/adapters", tags=["adapters"], dependencies=[Depends(admin_auth)],
                   responses=error_responses(401, 403, 503), route_class=BoundedJSONRoute)


async def _registry(request: Request) -> AdapterRegistry:
    return request.app.state.registry


Registry = Annotated[AdapterRegistry, Depends(_registry)]


@router.post("", status_code=201, responses=error_responses(400, 409, 413))
async def register_adapter(
    registry: Registry,
    name: Annotated[str, Form(description="the adapter's name: requests use it as `model`")],
    files: Annotated[list[UploadFile], File(description="adapter_config.json + adapter_model.safetensors, or one "
                                                        ".tar.gz/.zip; optionally a suite.json (the name's new suite)")],
    make_current: Annotated[bool, Form(description="serve this version for `name` right away (if it passes the "
                                                   "name's suite, when it has one)")] = True,
) -> AdapterVersion:
    return await registry.register(name, [(upload.filename or "", upload.file) for upload in files], make_current)


@router.get("")
async def list_adapters(registry: Registry) -> AdapterList:
    return AdapterList(data=registry.list())


@router.get("/{name}", responses=error_responses(400, 404))
async def get_adapter(name: str, registry: Registry) -> Adapter:
    return registry.get(parse_adapter_name(name))


@router.delete("/{ref}", responses=error_responses(400, 404))
async def delete_adapter(ref: str, registry: Registry) -> Deleted:
    """`name` deletes every version; `name@version` deletes one."""
    parsed = parse_adapter_ref(ref, "name")
    await registry.delete(parsed.name, parsed.version)
    return Deleted(id=parsed.id, object="adapter" if parsed.version is None else "adapter.version")


@router.get("/{name}/canary", responses=error_responses(400, 404))
async def get_canary(name: str, registry: Registry) -> Canary:
    """The running canary (with this replica's error-rate window per version), or the last one and why it ended."""
    return registry.get_canary(parse_adapter_name(name))


@router.put("/{name}/canary", responses=error_responses(400, 404, 409, 413))
async def set_canary(name: str, body: CanaryRequest, registry: Registry, request: Request) -> Canary:
    """Send `weight` of the bare name's traffic to `version` (sticky per `user` / `x-quiver-session`), with
    automatic rollback when its error rate exceeds the current version's by `rollback.max_error_rate_margin`, or
    (with `rollback.live_sample_rate`) its live suite score is below the current version's by
    `rollback.max_score_margin`. A version that failed its suite needs `override_gate: true` (recorded)."""
    return await registry.set_canary(parse_adapter_name(name), body, _caller(request))


@router.delete("/{name}/canary", responses=error_responses(400, 404))
async def end_canary(name: str, registry: Registry) -> Canary:
    """End the canary: all of the bare name's traffic goes to the current version again."""
    return await registry.end_canary(parse_adapter_name(name))


@router.post("/{name}/canary/promote", responses=error_responses(400, 404))
async def promote_canary(name: str, registry: Registry) -> Adapter:
    """Make the canary's version current; the canary ends as `promoted`."""
    return await registry.promote_canary(parse_adapter_name(name))


def _caller(request: Request) -> str:
    """Who made an admin change, for its record: the key's fingerprint (never the key)."""
    scheme, token = get_authorization_scheme_param(request.headers.get("authorization"))
    if scheme.lower() != "bearer" or not token:
        return "anonymous (auth off)"
    return f"key sha256:{hashlib.sha256(token.encode()).hexdigest()[:12]}"


@router.post("/{name}/promote", responses=error_responses(400, 404, 409, 413))
async def promote_adapter(name: str, body: PromoteRequest, registry: Registry, request: Request) -> Adapter:
    """Make a version current. One that failed its name's suite needs `override_gate: true` (recorded in its report)."""
    return await registry.promote(parse_adapter_name(name), body.version, body.override_gate, _caller(request),
                                  body.reason)


@router.post("/{name}/pin", responses=error_responses(400, 404, 409, 413))
async def pin_adapter(name: str, registry: Registry, request: Request, body: PinRequest | None = None) -> Adapter:
    """Keep a version (the current one by default) loaded in an engine slot on every replica, so the name's
    requests never wait for a load or a free slot. At most `QUIVER_PINNED_SLOTS` names are pinned at once; a
    name holds one pin (pinning another version moves it)."""
    return await registry.pin(parse_adapter_name(name), body.version if body else None, _caller(request))


@router.post("/{name}/unpin", responses=error_responses(400, 404))
async def unpin_adapter(name: str, registry: Registry, request: Request) -> Adapter:
    """Let the pinned version leave its slot like any other (it stays registered and servable)."""
    return await registry.unpin(parse_adapter_name(name), _caller(request))
