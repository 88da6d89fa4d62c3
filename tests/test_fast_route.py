"""The generation routes' fast path (`quiver.fast_route.FastPathRoute`): a well-formed request skips FastAPI's
generic dependency solver; everything else, and every refusal, is exactly what FastAPI's own path answers.
Each case runs on two gateways over the same store and fake engine: one as shipped, one whose generation
routes are plain `BoundedJSONRoute`s."""

from __future__ import annotations

import json
from pathlib import Path

import fastapi.routing
import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, Request
from pydantic import BaseModel

from quiver.fake_engine import FakeEngine, fake_text
from quiver.fast_route import FastPathRoute
from quiver.limits import BoundedJSONRoute
from quiver.settings import Settings
from quiver.testing import ADMIN_KEY, API_KEY, InProcessGateway

BASE = "SmolLM2-135M-Instruct"
TENANT_KEY = "tenant-key-only-bots"
CHAT = {"model": BASE, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def gateways(model_dir: Path, fake_adapter: Path, tmp_path_factory: pytest.TempPathFactory):
    """(shipped, generic) over one store: the second built with FastPathRoute's handler replaced by
    BoundedJSONRoute's. One pair for the module: the cases only read."""
    root = tmp_path_factory.mktemp("fast-route")

    def start(state: str) -> InProcessGateway:
        settings = Settings(model_cache_dir=model_dir.parent, store_dir=root / "store", state_dir=root / state,
                            finetuning_dir=root / "ft", admin_keys=[ADMIN_KEY], api_keys=[API_KEY], store_poll_s=0,
                            tenant_keys={TENANT_KEY: ["bot*"]}, max_completion_tokens=64)
        return InProcessGateway(settings, FakeEngine(BASE)).start()

    shipped = start("shipped")
    try:
        for name in ("bot", "other"):
            assert shipped.register(name, fake_adapter).status_code == 201
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(FastPathRoute, "get_route_handler", BoundedJSONRoute.get_route_handler)
            generic = start("generic")
        try:
            yield shipped, generic
        finally:
            generic.stop()
    finally:
        shipped.stop()


@pytest.fixture
def solver_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths FastAPI's generic solver ran for, top-level calls only."""
    calls: list[str] = []
    solve = fastapi.routing.solve_dependencies

    async def counted(*, request, dependant, **kwargs):
        if dependant.path is not None:
            calls.append(request.url.path)
        return await solve(request=request, dependant=dependant, **kwargs)

    monkeypatch.setattr(fastapi.routing, "solve_dependencies", counted)
    return calls


def post(gateway, path: str, content: bytes, key: str = API_KEY, headers: dict | list = ()):
    """`headers` as a list of pairs may repeat a name."""
    pairs = list(headers.items()) if isinstance(headers, dict) else list(headers)
    return httpx.post(f"{gateway.base_url}{path}", content=content, timeout=30,
                      headers=[("authorization", f"Bearer {key}"), *pairs])


def answer(response: httpx.Response) -> tuple[int, object]:
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, response.text


JSON = {"content-type": "application/json"}


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", CHAT),
    ("/v1/chat/completions", {**CHAT, "model": "bot", "stream": True}),
    ("/v1/completions", {"model": "bot@1", "prompt": "x", "max_tokens": 2}),
])
def test_well_formed_requests_skip_the_generic_solver_and_get_the_same_answer(gateways, solver_calls, path, body):
    shipped, generic = gateways
    fast = post(shipped, path, json.dumps(body).encode(), headers={**JSON, "x-quiver-session": "s-1"})
    assert solver_calls == []
    slow = post(generic, path, json.dumps(body).encode(), headers={**JSON, "x-quiver-session": "s-1"})
    assert solver_calls == [path]
    assert fast.status_code == slow.status_code == 200
    if body.get("stream"):
        assert fast.text.count("data:") == slow.text.count("data:") > 1
        assert fake_text("bot@1", 3) in "".join(
            json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            for line in fast.text.splitlines() if line.startswith("data: {"))
    else:
        fast_body, slow_body = fast.json(), slow.json()
        for varying in ("id", "created"):
            fast_body.pop(varying), slow_body.pop(varying)
        assert fast_body == slow_body
    # the engine got the same request from both (the session header reached the canary split alike)
    assert shipped.engine.requests[-1] == generic.engine.requests[-1]


DEEP = b'{"model": "x", "messages": ' + b"[" * 200 + b"]" * 200 + b"}"
VALID = {"/v1/chat/completions": CHAT, "/v1/completions": {"model": BASE, "prompt": "Hi", "max_tokens": 3}}


def edited(**changes):
    """A valid body of the route's own shape with `changes` (None drops a field)."""
    def make(valid: dict) -> bytes:
        body = {**valid, **changes}
        return json.dumps({name: value for name, value in body.items() if value is not None}).encode()
    return make


def valid(body: dict) -> bytes:
    return json.dumps(body).encode()


# What a hostile or careless caller sends, with the status expected; each answer must be exactly what
# FastAPI's own path gives.
REFUSALS = [
    ("no content type", valid, {}, 400),
    ("text/plain", valid, {"content-type": "text/plain"}, 400),
    ("json with charset", valid, {"content-type": "application/json; charset=utf-8"}, 200),
    ("vendor json", valid, {"content-type": "application/vnd.api+json"}, 200),
    ("empty body", b"", JSON, 400),
    ("malformed json", b'{"model": ', JSON, 400),
    ("not utf-8", b'{"model": "\xff"}', JSON, 400),
    ("too deep", DEEP, JSON, 400),
    ("an array", b"[1, 2]", JSON, 400),
    ("a string", b'"hello"', JSON, 400),
    ("no model", edited(model=None), JSON, 400),
    ("a string for max_tokens", edited(max_tokens="3"), JSON, 400),
    ("an unknown model", edited(model="nobody"), JSON, 404),
    ("a bad model id", edited(model="bot@@1"), JSON, 400),
    ("max_tokens over the cap", edited(max_tokens=65), JSON, 400),
    ("a repeated session header", valid,
     [("content-type", "application/json"), ("x-quiver-session", "a"), ("x-quiver-session", "b")], 200),
]


@pytest.mark.parametrize("what, content, headers, status", REFUSALS, ids=[case[0] for case in REFUSALS])
def test_every_other_request_gets_fastapis_own_answer(gateways, what, content, headers, status):
    shipped, generic = gateways
    for path, body in VALID.items():
        sent = content(body) if callable(content) else content
        fast = answer(post(shipped, path, sent, headers=headers))
        assert fast[0] == status, (what, path, fast)
        generic_answer = answer(post(generic, path, sent, headers=headers))
        if status == 200:
            for varying in ("id", "created"):
                fast[1].pop(varying), generic_answer[1].pop(varying)
        assert fast == generic_answer, (what, path)


def test_a_tenant_key_out_of_scope_is_refused_alike(gateways):
    shipped, generic = gateways
    body = json.dumps({**CHAT, "model": "other"}).encode()  # outside the tenant's `bot*`
    fast, slow = (post(gateway, "/v1/chat/completions", body, key=TENANT_KEY, headers=JSON)
                  for gateway in gateways)
    assert fast.status_code >= 400
    assert answer(fast) == answer(slow)
    assert answer(post(shipped, "/v1/chat/completions", json.dumps({**CHAT, "model": "bot"}).encode(),
                       key=TENANT_KEY, headers=JSON))[0] == 200


def test_the_openapi_schema_still_documents_the_header_and_the_body(gateways):
    shipped, generic = gateways
    for path in ("/v1/chat/completions", "/v1/completions"):
        fast_doc = httpx.get(f"{shipped.base_url}/openapi.json").json()["paths"][path]["post"]
        generic_doc = httpx.get(f"{generic.base_url}/openapi.json").json()["paths"][path]["post"]
        assert fast_doc == generic_doc
        assert "x-quiver-session" in [parameter["name"] for parameter in fast_doc["parameters"]]
        assert "$ref" in json.dumps(fast_doc["requestBody"])


class Body(BaseModel):
    text: str


async def request_only(request: Request) -> str:
    return "x"


def request_and_more(request: Request, q: int = 0) -> int:
    return q


async def a_generator(request: Request):
    yield 1


@pytest.mark.parametrize("declare, why", [
    (lambda r: r.post("/q")(_endpoint_with_query), "path, query and cookie"),
    (lambda r: r.post("/sync", dependencies=[Depends(request_and_more)])(_endpoint), "request_and_more"),
    (lambda r: r.post("/gen", dependencies=[Depends(a_generator)])(_endpoint), "a_generator"),
    (lambda r: r.post("/model", response_model=Body)(_endpoint), "return a Response"),
    (lambda r: r.post("/request")(_endpoint_with_request), "only dependencies"),
])
def test_a_route_shape_it_cannot_serve_exactly_is_refused_when_built(declare, why):
    router = APIRouter(route_class=FastPathRoute)
    with pytest.raises(TypeError, match=why):
        declare(router)
    # the shape it serves builds
    router.post("/ok", dependencies=[Depends(request_only)])(_endpoint)
    FastAPI().include_router(router)


async def _endpoint(body: Body):
    return fastapi.Response()


async def _endpoint_with_query(body: Body, q: int = 0):
    return fastapi.Response()


async def _endpoint_with_request(body: Body, request: Request):
    return fastapi.Response()

