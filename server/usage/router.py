from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from quiver.auth import caller_identity, inference_auth
from quiver.errors import InvalidRequest, error_responses
from quiver.usage.protocol import Usage
from quiver.usage.service import BUCKET_S, UsageLedger, parse_group_by

router = APIRouter(prefix="/v1", tags=["usage"], dependencies=[Depends(inference_auth)],
                   responses=error_responses(401))

DAY_S = 86_400
_MAX_TIME = 2**40  # unix seconds, far beyond any date the ledger holds


async def _ledger(request: Request) -> UsageLedger:
    return request.app.state.usage


@router.get("/usage", responses=error_responses(400))
async def get_usage(
    ledger: Annotated[UsageLedger, Depends(_ledger)],
    caller: Annotated[tuple[str, bool], Depends(caller_identity)],
    start_time: Annotated[int | None, Query(ge=0, le=_MAX_TIME, description="unix seconds; default end_time - 1 day")] = None,
    end_time: Annotated[int | None, Query(ge=0, le=_MAX_TIME, description="unix seconds, exclusive; default now")] = None,
    group_by: Annotated[str, Query(max_length=100, description="comma-separated: key, adapter, adapter_version")] = "key,adapter_version",
) -> Usage:
    """Requests, errors and tokens summed over a window, per API key and/or adapter version, in whole minutes.
    Admin keys see every key's usage; other keys only their own."""
    end = end_time if end_time is not None else int(time.time()) + 1
    start = start_time if start_time is not None else max(0, end - DAY_S)
    if start >= end:
        raise InvalidRequest("`start_time` must be before `end_time`", code="invalid_time_window", param="start_time")
    groups = parse_group_by(group_by)
    fingerprint, admin = caller
    rows = await asyncio.to_thread(ledger.query, start, end, groups, None if admin else fingerprint)
    return Usage(start_time=start, end_time=end, bucket_width_s=BUCKET_S, group_by=groups,
                 scope="all" if admin else "own_key", data=rows)
