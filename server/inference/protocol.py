"""Just enough of the OpenAI request shapes to route and cap; the engine validates the rest and its 400s pass
through. The fields the gateway caps are typed strictly, as OpenAI types them: `n: 100.0` or `n: "100"` is a
400 here, never a value that slips past the cap and is coerced by the engine."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from quiver.common.base_model import DEFAULT_MODEL_NAME


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = None


class _GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, description="the base model, an adapter `name`, or a pinned `name@version`")
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Lower bounds are the engine's to check (its 400s pass through); the gateway owns the types and the caps.
    n: StrictInt | None = Field(None, description="choices per request; capped by the server's max_n")
    max_tokens: StrictInt | None = Field(None, description="capped by the server's max_completion_tokens")
    max_completion_tokens: StrictInt | None = Field(None, description="as max_tokens")

    def engine_body(self, engine_model: str) -> dict[str, Any]:
        body = self.model_dump(exclude_unset=True, exclude_none=False)
        body["model"] = engine_model
        if self.stream:
            # Always ask for usage so streamed tokens are counted; dropped again if the client didn't ask.
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        return body

    @property
    def caller_id(self) -> str | None:
        """OpenAI's `user` field (an end-user id), when it is a string: keeps a user on one side of a canary."""
        user = (self.model_extra or {}).get("user")
        return user if isinstance(user, str) and user else None

    @property
    def wants_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_GenerationRequest):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "model": DEFAULT_MODEL_NAME, "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 8}]})
    messages: list[dict[str, Any]] = Field(min_length=1)
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)


class CompletionRequest(_GenerationRequest):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": DEFAULT_MODEL_NAME, "prompt": "The sea is", "max_tokens": 8}]})
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: StrictInt | None = Field(None, ge=0, le=20)


# What the engine answers, as far as the gateway vouches for it (the engine's other fields pass through).
class _EngineAnswer(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    created: int
    model: str = Field(description="the engine's name for what served it: the base or `name@version`")
    choices: list[dict[str, Any]]
    usage: dict[str, Any] | None = None


class ChatCompletion(_EngineAnswer):
    object: Literal["chat.completion"]


class Completion(_EngineAnswer):
    object: Literal["text_completion"]


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "quiver"
    root: str
    parent: str | None = None
    warnings: list[str] = Field(default_factory=list, description="the served version's admission warnings")


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]
