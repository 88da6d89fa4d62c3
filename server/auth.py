"""API keys: admin keys for the registry, inference keys (or admin keys) for generation, and tenant keys:
inference keys that see and call only the base model and their own adapters.

With no keys configured at all, auth is off and `quiver serve` binds to loopback only.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from fnmatch import fnmatchcase

from fastapi import Request

from quiver.errors import APIError
from quiver.settings import Settings


@dataclass(frozen=True)
class ModelScope:
    """Which models one key may see and call: every model, or the base plus the adapters matching `patterns`.

    The base model is open to every key: its weights are shared by all tenants and say nothing about them.
    """

    patterns: tuple[str, ...] | None = None  # None: every model

    def allows(self, adapter: str | None) -> bool:
        """`adapter` is an adapter name (never `name@version`); None means the base model."""
        if adapter is None or self.patterns is None:
            return True
        return any(fnmatchcase(adapter, pattern) for pattern in self.patterns)


EVERY_MODEL = ModelScope()


@dataclass(frozen=True)
class _Identity:
    admin: bool
    scope: ModelScope


def _presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def _digest(key: str) -> bytes:
    # Keys are compared as fixed-length digests: compare_digest on raw keys of unequal length returns early,
    # which would reveal a key's length.
    return hashlib.sha256(key.encode()).digest()


class Auth:
    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.auth_enabled
        admin = _Identity(admin=True, scope=EVERY_MODEL)
        inference = _Identity(admin=False, scope=EVERY_MODEL)
        self._keys: list[tuple[bytes, _Identity]] = (
            [(_digest(key), admin) for key in settings.admin_keys]
            + [(_digest(key), inference) for key in settings.api_keys]
            + [(_digest(key), _Identity(admin=False, scope=ModelScope(tuple(patterns))))
               for key, patterns in settings.tenant_keys.items()]
        )

    def _authenticate(self, request: Request) -> _Identity:
        key = _presented_key(request)
        if key is None:
            raise APIError(401, "missing API key: send `Authorization: Bearer <key>`", code="missing_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        presented = _digest(key)
        found: _Identity | None = None
        # Every candidate is compared, each in constant time, so timing reveals neither a key nor its role.
        for candidate, identity in self._keys:
            if hmac.compare_digest(presented, candidate):
                found = identity
        if found is None:
            raise APIError(401, "incorrect API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return found

    async def inference(self, request: Request) -> ModelScope:
        return self._authenticate(request).scope if self.enabled else EVERY_MODEL

    async def admin(self, request: Request) -> None:
        if not self.enabled:
            return
        if not self._authenticate(request).admin:
            raise APIError(403, "this route needs an admin key", code="admin_key_required")


async def inference_auth(request: Request) -> ModelScope:
    """A dependency: authenticates an inference request and gives the models its key may use."""
    return await request.app.state.auth.inference(request)


async def admin_auth(request: Request) -> None:
    await request.app.state.auth.admin(request)
