"""Just enough of the OpenAI request shapes to route; the engine validates the rest and its 400s pass through."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = None


class _GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, description="the base model, an adapter `name`, or a pinned `name@version`")
    stream: bool = False
    stream_options: StreamOptions | None = None

    def engine_body(self, engine_model: str) -> dict[str, Any]:
        body = self.model_dump(exclude_unset=True, exclude_none=False)
        body["model"] = engine_model
        if self.stream:
            # Always ask for usage so streamed tokens are counted; dropped again if the client didn't ask.
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        return body

    @property
    def wants_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_GenerationRequest):
    messages: list[dict[str, Any]] = Field(min_length=1)


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "quiver"
    root: str
    parent: str | None = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]
