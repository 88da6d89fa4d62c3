from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import Response

from quiver.adapters.model_id import parse_model_id
from quiver.adapters.service import AdapterRegistry, model_not_found
from quiver.auth import ModelScope, caller_identity, inference_auth
from quiver.errors import error_responses
from quiver.fast_route import FastPathRoute
from quiver.inference.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from quiver.inference.service import InferenceService
from quiver.limits import BoundedJSONRoute

router = APIRouter(prefix="/v1", tags=["inference"], dependencies=[Depends(inference_auth)],
                   responses=error_responses(401), route_class=BoundedJSONRoute)
# The two generation routes: every caller's request pays for them before the engine sees it, so their
# well-formed requests skip FastAPI's generic solver (fast_route.py); refusals still take FastAPI's own path.
generation = APIRouter(route_class=FastPathRoute)


def _generation_responses(model: type) -> dict:
    streamed = {"text/event-stream": {"schema": {"type": "string", "description": "server-sent events, as OpenAI's"}}}
    return {200: {"model": model, "content": streamed, "description": "The completion, or with `stream` its chunks"},
            **error_responses(400, 404, 413, 429, 503)}


# Dependencies are `async def` on purpose, here and in every router: FastAPI runs a plain `def` dependency in its
# thread pool, a hop to a worker thread and back on every request (this one's hop was 0.35 -> 0.22 ms to the
# first byte in process; tests/test_gateway_fake.py::test_every_route_and_dependency_runs_on_the_event_loop).
async def _inference(request: Request) -> InferenceService:
    return request.app.state.inference


async def _registry(request: Request) -> AdapterRegistry:
    return request.app.state.registry


async def _started_at(request: Request) -> int:
    return request.app.state.started_at


# The models the caller's key may see and call (FastAPI runs inference_auth once per request).
Scope = Annotated[ModelScope, Depends(inference_auth)]
Inference = Annotated[InferenceService, Depends(_inference)]
Registry = Annotated[AdapterRegistry, Depends(_registry)]
StartedAt = Annotated[int, Depends(_started_at)]
Caller = Annotated[tuple[str, bool], Depends(caller_identity)]
# A caller's session id: keeps it on one side of a canary (before OpenAI's `user` field); any string, only hashed.
Session = Annotated[str | None, Header(alias="x-quiver-session", include_in_schema=True)]


@generation.post("/chat/completions", response_model=None, responses=_generation_responses(ChatCompletion))
async def create_chat_completion(body: ChatCompletionRequest, inference: Inference, scope: Scope, caller: Caller,
                                 x_quiver_session: Session = None) -> Response:
    return await inference.forward("chat/completions", body, scope, x_quiver_session, caller[0])


@generation.post("/completions", response_model=None, responses=_generation_responses(Completion))
async def create_completion(body: CompletionRequest, inference: Inference, scope: Scope, caller: Caller,
                            x_quiver_session: Session = None) -> Response:
    return await inference.forward("completions", body, scope, x_quiver_session, caller[0])


router.include_router(generation)


def _model_cards(registry: AdapterRegistry, started_at: int, scope: ModelScope) -> list[ModelCard]:
    base = registry.base_model_name
    cards = [ModelCard(id=base, created=started_at, root=base)]
    for adapter in registry.list(scope):
        current = next((v for v in adapter.versions if v.current), None)
        if current is not None:  # without a current version the bare name serves nothing, so it is not listed
            cards.append(ModelCard(id=adapter.name, created=current.created_at, root=current.id, parent=base,
                                   warnings=current.warnings))
        cards += [ModelCard(id=v.id, created=v.created_at, root=v.id, parent=base, warnings=v.warnings)
                  for v in adapter.versions]
    return cards


@router.get("/models")
async def list_models(registry: Registry, started_at: StartedAt, scope: Scope) -> ModelList:
    return ModelList(data=_model_cards(registry, started_at, scope))


@router.get("/models/{model_id}", responses=error_responses(400, 404))
async def retrieve_model(model_id: str, registry: Registry, started_at: StartedAt, scope: Scope) -> ModelCard:
    canonical = parse_model_id(model_id, registry.base_model_name).id
    for card in _model_cards(registry, started_at, scope):
        if card.id == canonical:
            return card
    raise model_not_found(model_id)
