"""API keys: admin keys for the registry, inference keys (or admin keys) for generation.

With no keys configured at all, auth is off and `quiver serve` binds to loopback only.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from server.errors import APIError
from server.settings import Settings


def _presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def _matches(key: str, candidates: list[str]) -> bool:
    # Compare against every candidate, in constant time each, so timing reveals neither key nor position.
    found = False
    for candidate in candidates:
        found |= hmac.compare_digest(key.encode(), candidate.encode())
    return found


class Auth:
    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.auth_enabled
        self.admin_keys = list(settings.admin_keys)
        self.inference_keys = list(settings.api_keys) + self.admin_keys

    def _authenticate(self, request: Request) -> str:
        key = _presented_key(request)
        if key is None:
            raise APIError(401, "missing API key: send `Authorization: Bearer <key>`", code="missing_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        if not _matches(key, self.inference_keys):
            raise APIError(401, "incorrect API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return key

    async def inference(self, request: Request) -> None:
        if self.enabled:
            self._authenticate(request)

    async def admin(self, request: Request) -> None:
        if not self.enabled:
            return
        key = self._authenticate(request)
        if not _matches(key, self.admin_keys):
            raise APIError(403, "this route needs an admin key", code="admin_key_required")


async def inference_auth(request: Request) -> None:
    await request.app.state.auth.inference(request)


async def admin_auth(request: Request) -> None:
    await request.app.state.auth.admin(request)
