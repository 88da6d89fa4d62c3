"""Runs inside the vLLM engine (`--middleware quiver.engine_seal.SealMiddleware`): every HTTP route needs
the engine's per-start key, not only those under vLLM's own guarded prefixes (`/v1`, `/v2`, `/inference`,
`/cohere`): `/invocations`, `/pooling`, `/tokenize`, `/abort_requests`, ... would otherwise answer anyone
on the machine. `/health` too: only the gateway probes it."""

from __future__ import annotations

import hashlib
import hmac
import json
import os

KEY_ENV = "VLLM_API_KEY"


class SealMiddleware:
    def __init__(self, app) -> None:
        self.app = app
        key = os.environ.get(KEY_ENV, "")
        if not key:
            raise RuntimeError(f"{KEY_ENV} is not set: the engine would be open to every local process")
        self._digest = hashlib.sha256(key.encode()).digest()

    def _allowed(self, scope) -> bool:
        for name, value in scope.get("headers") or ():
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(
                    hashlib.sha256(token.encode()).digest(), self._digest)
        return False

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket") and not self._allowed(scope):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            body = json.dumps({"error": {"message": "Unauthorized", "type": "Unauthorized", "param": None,
                                         "code": 401}}).encode()
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)
