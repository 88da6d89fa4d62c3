"""The usage route's shapes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

GROUPS = ("key", "adapter", "adapter_version")


class UsageRow(BaseModel):
    key: str | None = Field(None, description="the API key's fingerprint: `key-` + 12 hex digits of its sha256")
    adapter: str | None = Field(None, description="the adapter's name (the base model's name for base traffic)")
    adapter_version: str | None = Field(None, description="`name@N` that answered, or the base model's name")
    requests: int
    errors: int = Field(description="requests the version failed (5xx, or the engine could not load it)")
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Usage(BaseModel):
    object: Literal["usage"] = "usage"
    start_time: int
    end_time: int
    bucket_width_s: int = Field(description="sums are over whole buckets of this width that begin in the window")
    group_by: list[str]
    scope: Literal["all", "own_key"] = Field(description="`own_key`: a non-admin key sees its own usage only")
    data: list[UsageRow]
