# Written for this measurement (kept with its figures, not a maintained tool). Run from the repo root with PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python <this file>
"""The gateway's own cost per streamed request, in process: the ASGI app on the fake engine, no sockets."""
import asyncio, cProfile, pstats, sys, time, json, tempfile
from pathlib import Path
from quiver.settings import Settings
from quiver.app import create_app
from quiver.fake_engine import FakeEngine
from quiver.testing import API_KEY, ADMIN_KEY

N = int(sys.argv[1]) if len(sys.argv) > 1 else 500
PROFILE = len(sys.argv) > 2 and sys.argv[2] == 'profile'
COLD = 'cold' in sys.argv
tmp = Path(tempfile.mkdtemp())
settings = Settings(store_dir=tmp / "store", state_dir=tmp / "state", finetuning_dir=tmp / "ft",
                    admin_keys=[ADMIN_KEY], api_keys=[API_KEY], store_poll_s=0)
engine = FakeEngine("SmolLM2-135M-Instruct")
app = create_app(settings, engine=engine)
body = json.dumps({"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "hello " * 30}],
                   "max_tokens": 4, "stream": True}).encode()
headers = [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"), (b"authorization", b"Bearer " + API_KEY.encode()),
           (b"content-length", str(len(body)).encode()), (b"user-agent", b"OpenAI/Python 1.0"), (b"accept", b"application/json")]

async def one():
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
             "root_path": "", "headers": headers, "client": ("127.0.0.1", 5555), "server": ("127.0.0.1", 8000), "state": {}}
    given = False
    async def receive():
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()
    t0 = time.perf_counter(); first = None; chunks = []
    async def send(message):
        nonlocal first
        if message["type"] == "http.response.body" and message.get("body"):
            if first is None:
                first = time.perf_counter()
            chunks.append(message["body"])
        elif message["type"] == "http.response.start":
            assert message["status"] == 200, message
    await app(scope, receive, send)
    return first - t0, time.perf_counter() - t0, b"".join(chunks)

async def main():
    async with app.router.lifespan_context(app):
        for _ in range(50):
            await one()
        prof = cProfile.Profile() if PROFILE else None
        firsts, totals = [], []
        c0 = time.process_time()
        if prof: prof.enable()
        import numpy as np
        junk = np.ones(16 * 1024 * 1024, dtype=np.float32)
        for _ in range(N):
            if COLD: junk += 1.0
            f, t, out = await one()
            firsts.append(f); totals.append(t)
        if prof: prof.disable()
        cpu = time.process_time() - c0
        firsts.sort(); totals.sort()
        print(f"n={N} first-byte p50 {firsts[N//2]*1e3:.3f} ms  whole p50 {totals[N//2]*1e3:.3f} ms  cpu/request {cpu/N*1e3:.3f} ms")
        print(out[:300])
        if prof:
            pstats.Stats(prof).sort_stats("cumulative").print_stats(45)

asyncio.run(main())
