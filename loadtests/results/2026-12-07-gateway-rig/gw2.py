# Written for this measurement (kept with its figures, not a maintained tool). Run from the repo root with PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python <this file> ...
# A second gateway process attached to a running engine. argv: port engine_url engine_key store_dir state_dir
# VARIANT env picks what is changed.
import os, sys
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
if "old" in os.environ.get("VARIANT", ""):  # a copy of the previous commit's packages: `git archive` of
    sys.path.insert(0, os.environ["OLD_PKG"])  # server, common, training laid out as quiver/, quiver/common, quiver/training
port, engine_url, engine_key, store, state = sys.argv[1:6]
from quiver.settings import Settings
from quiver.app import create_app, uvicorn_config, _DrainingServer
from quiver.engine_client import HttpEngineClient
from quiver.observability import configure_logging
from quiver.testing import API_KEY
from loadtests.servers import ADMIN_KEY
VARIANT = set(filter(None, os.environ.get("VARIANT", "").split(",")))
class Attached(HttpEngineClient):
    ready = True
    restarts = 0
    def on_restart(self, listener): pass
    async def start(self): pass
    async def stop(self): await self.aclose()
settings = Settings(port=int(port), store_dir=store, state_dir=state, finetuning_dir=state + "/ft",
                    admin_keys=[ADMIN_KEY], api_keys=[os.environ["GW_KEY"]], max_loras=4)
configure_logging(settings.log_format)
app = create_app(settings, engine=Attached(engine_url, engine_key))
if "nomw" in VARIANT:
    app.user_middleware = [m for m in app.user_middleware if m.cls.__name__ == "AuthGate"]
served = app
if "trace" in VARIANT:
    import json as _json, time as _time
    import quiver.inference.service as svc
    import quiver.engine_client as ec
    TR = open(state + "/trace.jsonl", "a", buffering=1); CUR = {}
    async def traced(scope, receive, send, _app=app):
        if scope["type"] != "http" or scope["path"] != "/v1/completions":
            return await _app(scope, receive, send)
        rec = CUR["rec"] = {"asgi": _time.perf_counter_ns()}
        async def send2(m):
            if m["type"] == "http.response.start": rec["start"] = _time.perf_counter_ns()
            if m["type"] == "http.response.body" and m.get("body") and "out" not in rec: rec["out"] = _time.perf_counter_ns()
            await send(m)
        try:
            await _app(scope, receive, send2)
        finally:
            rec["end"] = _time.perf_counter_ns(); TR.write(_json.dumps(rec) + "\n")
    served = traced
    _fwd = svc.InferenceService.forward
    async def fwd(self, *a, **k):
        CUR["rec"]["handler"] = _time.perf_counter_ns(); return await _fwd(self, *a, **k)
    svc.InferenceService.forward = fwd
    _gen = ec.HttpEngineClient.generate
    async def gen(self, *a, **k):
        CUR["rec"]["post"] = _time.perf_counter_ns(); r = await _gen(self, *a, **k); CUR["rec"]["hdr"] = _time.perf_counter_ns(); return r
    ec.HttpEngineClient.generate = gen
    _ch = ec._HttpResponse.chunks
    async def ch(self):
        first = True
        async for c in _ch(self):
            if first: CUR["rec"]["chunk"] = _time.perf_counter_ns(); first = False
            yield c
    ec._HttpResponse.chunks = ch
    import quiver.observability as obs, quiver.auth as au, quiver.limits as li, quiver.fast_route as fr
    def stamp_call(cls, key):
        orig = cls.__call__
        async def call(self, scope, receive, send):
            if "rec" in CUR and key not in CUR["rec"]: CUR["rec"][key] = _time.perf_counter_ns()
            return await orig(self, scope, receive, send)
        cls.__call__ = call
    stamp_call(obs.RequestIdMiddleware, "reqid"); stamp_call(au.AuthGate, "gate"); stamp_call(li.BodySizeLimit, "bodylimit")
    _wf = fr._well_formed
    async def wf(request, plan):
        CUR["rec"]["route"] = _time.perf_counter_ns()
        r = await _wf(request, plan)
        CUR["rec"]["parsed"] = _time.perf_counter_ns()
        return r
    fr._well_formed = wf
    _fwd2 = svc.InferenceService.forward
    async def fwd2(self, *a, **k):
        r = await _fwd2(self, *a, **k); CUR["rec"]["returned"] = _time.perf_counter_ns(); return r
    svc.InferenceService.forward = fwd2
    _rc = svc._RelayResponse.__call__
    async def rc(self, scope, receive, send):
        CUR["rec"]["respcall"] = _time.perf_counter_ns(); return await _rc(self, scope, receive, send)
    svc._RelayResponse.__call__ = rc
    from starlette.responses import StreamingResponse as _SR
    _sr = _SR.stream_response
    async def sr(self, send):
        CUR["rec"]["streamtask"] = _time.perf_counter_ns(); return await _sr(self, send)
    _SR.stream_response = sr
if "spec24" in VARIANT:
    _inner = served
    async def served(scope, receive, send):
        if scope["type"] == "http":
            scope["asgi"] = {**scope["asgi"], "spec_version": "2.4"}
        await _inner(scope, receive, send)
if "lane" in VARIANT:
    _inner2 = served
    from quiver.inference.protocol import CompletionRequest
    async def served(scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/v1/completions":
            body = b""
            while True:
                m = await receive(); body += m.get("body", b"")
                if not m.get("more_body"): break
            req = CompletionRequest.model_validate_json(body)
            resp = await app.state.inference.forward("completions", req)
            await resp(scope, receive, send)
            return
        await _inner2(scope, receive, send)
config = uvicorn_config(app, settings)
config.app = served
if "noaccess" in VARIANT:
    import logging
    logging.getLogger("uvicorn.access").propagate = False
# 2026-12-07, fourth session: the cyclic garbage collector's share of a request
import gc
if "gcfreeze" in VARIANT:  # everything alive after start-up moves out of the collector's sight
    gc.freeze()
if "gcthr" in VARIANT:  # the young generation collected 100x less often
    gc.set_threshold(70_000, 10, 10)
if "gcoff" in VARIANT:  # the bound: no cyclic collection at all
    gc.disable()
_DrainingServer(config, app, settings.drain_timeout_s).run()
