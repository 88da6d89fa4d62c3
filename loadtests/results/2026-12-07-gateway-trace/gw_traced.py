# Written for this measurement (kept with its figures, not a maintained tool). Run from the repo root with PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python <this file>
"""`quiver serve` with timestamps (time.monotonic_ns, system-wide) at each stage of a generation request."""
import json, os, sys, time
import quiver.observability as obs
import quiver.inference.service as svc
import quiver.engine_client as ec
OUT = open(os.environ["TRACE_OUT"], "a", buffering=1)
CUR = {}
_orig_mw = obs.RequestIdMiddleware.__call__
async def mw(self, scope, receive, send):
    if scope["type"] != "http" or not scope["path"].startswith("/v1/chat"):
        return await _orig_mw(self, scope, receive, send)
    rec = {"asgi": time.monotonic_ns()}
    CUR["rec"] = rec
    async def send2(message):
        if message["type"] == "http.response.body" and message.get("body") and "out" not in rec:
            rec["out"] = time.monotonic_ns()
            await send(message)
            rec["out_done"] = time.monotonic_ns()
            return
        await send(message)
    try:
        await _orig_mw(self, scope, receive, send2)
    finally:
        OUT.write(json.dumps(rec) + "\n")
obs.RequestIdMiddleware.__call__ = mw
_orig_fwd = svc.InferenceService.forward
async def fwd(self, *a, **k):
    CUR["rec"]["handler"] = time.monotonic_ns()
    return await _orig_fwd(self, *a, **k)
svc.InferenceService.forward = fwd
_orig_send = svc.InferenceService._send
async def snd(self, *a, **k):
    CUR["rec"]["post"] = time.monotonic_ns()
    r = await _orig_send(self, *a, **k)
    CUR["rec"]["headers"] = time.monotonic_ns()
    return r
svc.InferenceService._send = snd
_orig_chunks = ec._HttpResponse.chunks
async def chunks(self):
    rec = CUR.get("rec"); first = True
    async for c in _orig_chunks(self):
        if first and rec is not None:
            rec["chunk_in"] = time.monotonic_ns(); first = False
        yield c
ec._HttpResponse.chunks = chunks
from quiver.cli import app
app(["serve"])
