"""API keys: admin keys for the registry, inference keys (or admin keys) for generation, and tenant keys:
inference keys that see and call only the base model and their own adapters.

A key is identified once per request, by `AuthGate` from the headers alone before any body is read (401/403,
and the per-key limits); the routes' dependencies, which give the key's model scope, reuse that identification
(kept in the request's ASGI scope) and identify the key themselves only where no gate ran.

With no keys configured at all, auth is off and `quiver serve` binds to loopback only.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from fnmatch import fnmatchcase

from fastapi import Request
from fastapi.security.utils import get_authorization_scheme_param
from starlette.types import ASGIApp, Receive, Scope, Send

# Auth and middleware are the HTTP layer: they answer with APIError (services raise domain errors).
from quiver.errors import APIError, error_response
from quiver.inference.limiter import KeyLimited, KeyLimiter
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
# The usage ledger's name for every caller when auth is off.
ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class _Identity:
    admin: bool
    scope: ModelScope


# The ASGI scope's entry for the request's identified key (its digest and identity): only the server writes a
# scope, and the key's header cannot change within one request.
_IDENTIFIED = "quiver.identified_key"


def _presented_key(request: Request) -> str | None:
    scheme, token = get_authorization_scheme_param(request.headers.get("authorization"))
    return token if scheme.lower() == "bearer" and token else None


def _digest(key: str) -> bytes:
    # Keys are compared as fixed-length digests: compare_digest on raw keys of unequal length returns early,
    # which would reveal a key's length.
    return hashlib.sha256(key.encode()).digest()


def key_fingerprint(digest: bytes) -> str:
    """How usage names a key: `key-` + 12 hex digits of its sha256 (`sha256sum` of the key, cut short)."""
    return "key-" + digest.hex()[:12]


class Auth:
    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.auth_enabled
        self.metrics_require_key = settings.metrics_require_key
        admin = _Identity(admin=True, scope=EVERY_MODEL)
        inference = _Identity(admin=False, scope=EVERY_MODEL)
        identities: dict[bytes, _Identity] = {}
        # Admin keys last, so a key listed both as admin and as API key keeps its admin rights (tenant keys
        # cannot overlap either: the settings refuse that).
        for keys, identity in ((settings.api_keys, inference), (settings.admin_keys, admin)):
            identities.update((_digest(key), identity) for key in keys)
        for key, patterns in settings.tenant_keys.items():
            identities[_digest(key)] = _Identity(admin=False, scope=ModelScope(tuple(patterns)))
        self._keys = list(identities.items())

    def _authenticate(self, request: Request) -> _Identity:
        return self._identify(request)[1]

    def _identify(self, request: Request) -> tuple[bytes, _Identity]:
        known = request.scope.get(_IDENTIFIED)
        if known is not None:
            return known
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
        request.scope[_IDENTIFIED] = presented, found
        return presented, found

    async def inference(self, request: Request) -> ModelScope:
        return self._authenticate(request).scope if self.enabled else EVERY_MODEL

    async def caller(self, request: Request) -> tuple[str, bool]:
        """The key's fingerprint and whether it is an admin key; (ANONYMOUS, True) with auth off."""
        if not self.enabled:
            return ANONYMOUS, True
        digest, identity = self._identify(request)
        return key_fingerprint(digest), identity.admin

    async def admin(self, request: Request) -> None:
        if not self.enabled:
            return
        if not self._authenticate(request).admin:
            raise APIError(403, "this route needs an admin key", code="admin_key_required")

    async def metrics(self, request: Request) -> None:
        if self.enabled:
            self._check_metrics_key(self._authenticate(request))

    @staticmethod
    def _check_metrics_key(identity: _Identity) -> None:
        # /metrics names every adapter: a tenant key, which must not learn other tenants' names, is refused.
        if identity.scope.patterns is not None:
            raise APIError(403, "/metrics needs an admin or API key (not a tenant key)", code="metrics_key_required")

    def route_class(self, path: str) -> str:
        """Which key a path needs: "admin", "inference", "metrics" or "open" (the one table of route classes).
        /metrics needs an admin or API key only with `metrics_require_key` (QUIVER_METRICS_REQUIRE_KEY, the
        Helm chart's `server.metricsRequireKey`)."""
        if path.startswith(_ADMIN_PREFIXES):
            return "admin"
        if path.startswith("/v1/"):
            return "inference"
        if path == "/metrics" and self.metrics_require_key:
            return "metrics"
        return "open"

    def gate(self, request: Request) -> tuple[bytes | None, bool]:
        """Checks the key a request needs from its headers alone; raises the 401/403. Gives the key's digest
        (None when auth is off or the route is open) and whether it is an admin key."""
        # The scope's path, which the router matches (`request.url` would build and parse a whole URL: ~0.1 ms
        # on cold caches, on every request).
        needed = self.route_class(request.scope["path"])
        if not self.enabled or needed == "open":
            return None, False
        digest, identity = self._identify(request)
        if needed == "admin" and not identity.admin:
            raise APIError(403, "this route needs an admin key", code="admin_key_required")
        if needed == "metrics":
            self._check_metrics_key(identity)
        return digest, identity.admin


# Registry, training files and jobs: they change what the server serves.
_ADMIN_PREFIXES = ("/v1/adapters", "/v1/files", "/v1/fine_tuning")
_GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")


class AuthGate:
    """ASGI middleware: refuses a request without the right key BEFORE its body is read (an unauthenticated
    caller must not make the server spool hundreds of MiB), and applies the per-key limits to generation.
    The routes' own auth dependencies still run: they give the key's model scope."""

    def __init__(self, app: ASGIApp, auth: Auth, key_limits: KeyLimiter | None = None) -> None:
        self.app = app
        self.auth = auth
        self.key_limits = key_limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        try:
            digest, is_admin = self.auth.gate(request)
        except APIError as refused:
            await error_response(refused.status, refused.message, refused.code, headers=refused.headers)(
                scope, receive, send)
            return
        if (self.key_limits is None or not self.key_limits.enabled or digest is None or is_admin
                or scope["path"] not in _GENERATION_PATHS):
            await self.app(scope, receive, send)
            return
        try:
            async with self.key_limits.hold(digest):
                await self.app(scope, receive, send)
        except KeyLimited as limited:
            await error_response(429, str(limited), "key_rate_limited",
                                 headers={"Retry-After": str(limited.retry_after_s)})(scope, receive, send)


async def inference_auth(request: Request) -> ModelScope:
    """A dependency: authenticates an inference request and gives the models its key may use."""
    return await request.app.state.auth.inference(request)


async def caller_identity(request: Request) -> tuple[str, bool]:
    """A dependency: the caller's key fingerprint (for usage) and whether it is an admin key."""
    return await request.app.state.auth.caller(request)


async def admin_auth(request: Request) -> None:
    await request.app.state.auth.admin(request)


async def metrics_auth(request: Request) -> None:
    await request.app.state.auth.metrics(request)
