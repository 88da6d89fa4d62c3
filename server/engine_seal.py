"""Runs inside the vLLM engine (`--middleware quiver.engine_seal.SealMiddleware`): every HTTP route needs
the engine's per-start key, not only those under vLLM's own guarded prefixes (`/v1`, `/v2`, `/inference`,
`/cohere`): `/invocations`, `/pooling`, `/tokenize`, `/abort_requests`, ... would otherwise answer anyone
on the machine. `/health` too: only the gateway probes it.

It also adds the two routes vLLM's HTTP API lacks, behind the same key: `POST /quiver/pin_lora_adapter` and
`/quiver/unpin_lora_adapter` with `{"lora_name": ...}` (a name loaded with `/v1/load_lora_adapter`). Pinning
calls the engine's `pin_lora` (the adapter stays in its slot and in the CPU cache); vLLM has no unpin, so
unpinning removes the adapter from the worker (`remove_lora`, which drops the pin) and the next request using
the name loads it again from its path. The slots a pin may take are kept from the scheduler by the engine
plugin (`engine_plugin/pins.py`); the gateway bounds the number of pins."""

from __future__ import annotations

import hashlib
import hmac
import json
import os

KEY_ENV = "VLLM_API_KEY"
PIN_PATH, UNPIN_PATH = "/quiver/pin_lora_adapter", "/quiver/unpin_lora_adapter"
_MAX_BODY = 4096


async def _send_json(send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _error(status: int, message: str, error_type: str) -> dict:
    return {"error": {"message": message, "type": error_type, "param": "lora_name", "code": status}}


async def _read_name(receive) -> str | None:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if len(body) > _MAX_BODY:
            return None
        if not message.get("more_body"):
            break
    try:
        name = json.loads(body)["lora_name"]
    except (ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) and name else None


async def pin_route(scope, receive, send, pin: bool) -> None:
    """The pin/unpin routes (see the module's docstring), on vLLM's own app state."""
    name = await _read_name(receive)
    if name is None:
        await _send_json(send, 400, _error(400, "expected a JSON body {\"lora_name\": \"...\"}", "BadRequestError"))
        return
    state = scope["app"].state
    models, engine = state.openai_serving_models, state.engine_client
    async with models.lora_resolver_lock[name]:  # vLLM's own lock per name: no load or unload meanwhile
        lora = models.lora_requests.get(name)
        if lora is None:
            await _send_json(send, 404, _error(404, f"no adapter named {name!r} is loaded", "NotFoundError"))
            return
        try:
            if pin:
                # The worker may have evicted it from its CPU cache since it was loaded: put it back first
                # (a no-op when it is there), then pin it in both caches.
                await engine.add_lora(lora)
                await engine.pin_lora(lora.lora_int_id)
            else:
                await engine.remove_lora(lora.lora_int_id)
        except Exception as exc:  # the engine core's answer, e.g. "All items are pinned"
            await _send_json(send, 500, _error(500, f"{'pin' if pin else 'unpin'} failed: {exc}",
                                               "InternalServerError"))
            return
    await _send_json(send, 200, {"lora_name": name, "pinned": pin})


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
            await _send_json(send, 401, {"error": {"message": "Unauthorized", "type": "Unauthorized", "param": None,
                                                   "code": 401}})
            return
        if scope["type"] == "http" and scope.get("method") == "POST" and scope.get("path") in (PIN_PATH, UNPIN_PATH):
            await pin_route(scope, receive, send, scope["path"] == PIN_PATH)
            return
        await self.app(scope, receive, send)
