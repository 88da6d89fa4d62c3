# Written for this measurement (kept with its figures, not a maintained tool). Run from the repo root with PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python <this file> ...
# Cold-cache cost of pieces of the gateway's request path, in process: sweep 64 MB, then time one call.
import asyncio, statistics, sys, tempfile, time
from pathlib import Path
import numpy as np
from quiver.settings import Settings
from quiver.app import create_app
from quiver.fake_engine import FakeEngine
from quiver.testing import API_KEY, ADMIN_KEY
from starlette.requests import Request
tmp = Path(tempfile.mkdtemp())
app = create_app(Settings(store_dir=tmp / "s", state_dir=tmp / "st", finetuning_dir=tmp / "ft", admin_keys=[ADMIN_KEY], api_keys=[API_KEY]), engine=FakeEngine("m"))
buf = np.ones(64 * 1024 * 1024 // 8)
headers = [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"), (b"authorization", b"Bearer " + API_KEY.encode()),
           (b"content-length", b"100"), (b"user-agent", b"Python/3.11 aiohttp/3.14.5"), (b"accept", b"*/*"), (b"accept-encoding", b"gzip, deflate")]
def scope():
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
            "root_path": "", "headers": headers, "client": ("127.0.0.1", 5555), "server": ("127.0.0.1", 8000), "state": {}, "app": app}
auth = app.state.auth
kl = None
for m in app.user_middleware:
    if m.cls.__name__ == "AuthGate": kl = m.kwargs["key_limits"]
import anyio
from starlette.responses import StreamingResponse
async def body():
    yield b"x"
async def noop_send(m): pass
async def never_receive():
    await asyncio.sleep(10)
    return {"type": "http.disconnect"}
async def pieces():
    out = {}
    def t(name, fn):
        buf.sum(); t0 = time.perf_counter_ns(); fn(); out.setdefault(name, []).append((time.perf_counter_ns() - t0) / 1e3)
    async def ta(name, coro_fn):
        buf.sum(); t0 = time.perf_counter_ns(); await coro_fn(); out.setdefault(name, []).append((time.perf_counter_ns() - t0) / 1e3)
    for _ in range(200):
        t("Request(scope)", lambda: Request(scope()))
        t("request.url.path", lambda: Request(scope()).url.path)
        t("request.headers.get", lambda: Request(scope()).headers.get("authorization"))
        t("auth.gate", lambda: auth.gate(Request(scope())))
        async def hold():
            async with kl.hold(b"k" * 32):
                pass
        await ta("key_limits.hold", hold)
        async def stream():
            await StreamingResponse(body(), media_type="text/event-stream")(scope(), never_receive, noop_send)
        await ta("StreamingResponse(1 chunk)", stream)
        async def tg():
            async with anyio.create_task_group() as g:
                g.start_soon(asyncio.sleep, 0)
        await ta("anyio task group + 1 task", tg)
        async def plain():
            await asyncio.create_task(asyncio.sleep(0))
        await ta("asyncio task", plain)
        async def nothing(): pass
        await ta("(nothing)", nothing)
    for k, v in out.items():
        print(f"{k:30s} cold median {statistics.median(v):7.1f} us")
asyncio.run(pieces())
