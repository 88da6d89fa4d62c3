from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from quiver.adapters.service import model_not_found
from quiver.auth import ModelScope, inference_auth
from quiver.errors import error_responses
from quiver.inference.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
)

router = APIRouter(prefix="/v1", tags=["inference"], dependencies=[Depends(inference_auth)],
                   responses=error_responses(401))


def _generation_responses(model: type) -> dict:
    streamed = {"text/event-stream": {"schema": {"type": "string", "description": "server-sent events, as OpenAI's"}}}
    return {200: {"model": model, "content": streamed, "description": "The completion, or with `stream` its chunks"},
            **error_responses(400, 404, 413, 429, 503)}
# The models the caller's key may see and call (FastAPI runs inference_auth once per request).
Scope = Annotated[ModelScope, Depends(inference_auth)]


@router.post("/chat/completions", response_model=None, responses=_generation_responses(ChatCompletion))
async def create_chat_completion(body: ChatCompletionRequest, request: Request, scope: Scope) -> Response:
    return await request.app.state.inference.forward("chat/completions", body, scope)


@router.post("/completions", response_model=None, responses=_generation_responses(Completion))
async def create_completion(body: CompletionRequest, request: Request, scope: Scope) -> Response:
    return await request.app.state.inference.forward("completions", body, scope)


def _model_cards(request: Request, scope: ModelScope) -> list[ModelCard]:
    registry = request.app.state.registry
    base = registry.base_model_name
    cards = [ModelCard(id=base, created=request.app.state.started_at, root=base)]
    for adapter in registry.list(scope):
        current = next(v for v in adapter.versions if v.current)
        cards.append(ModelCard(id=adapter.name, created=current.created_at, root=current.id, parent=base))
        cards += [ModelCard(id=v.id, created=v.created_at, root=v.id, parent=base) for v in adapter.versions]
    return cards


@router.get("/models")
async def list_models(request: Request, scope: Scope) -> ModelList:
    return ModelList(data=_model_cards(request, scope))


@router.get("/models/{model_id}", responses=error_responses(404))
async def retrieve_model(model_id: str, request: Request, scope: Scope) -> ModelCard:
    for card in _model_cards(request, scope):
        if card.id == model_id:
            return card
    raise model_not_found(model_id)
