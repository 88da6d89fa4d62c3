"""The adapter registry's wire shapes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from quiver.adapters.canary import Canary


class StoredFile(BaseModel):
    name: str
    bytes: int
    sha256: str


class GateResult(BaseModel):
    """The name's suite run against a version when it was registered (the full report: `report`)."""

    passed: bool
    passed_cases: int
    total_cases: int
    suite_version: int
    report: str = Field(description="where the report is: JSON here, Markdown at the same path + `.md`")


class AdapterVersion(BaseModel):
    """One immutable registration of an adapter; persisted as the version's manifest.json."""

    object: Literal["adapter.version"] = "adapter.version"
    id: str = Field(description="`name@version`, usable as `model` to pin this version")
    name: str
    version: int
    created_at: int
    base_model: str
    rank: int
    alpha: float
    target_modules: list[str]
    files: list[StoredFile]
    size_bytes: int
    warnings: list[str] = Field(default_factory=list,
                                description="what admission noticed but accepted, e.g. `noop_adapter: ...`")
    gate: GateResult | None = Field(
        None, description="the suite's verdict at registration; null when the name had no suite. A failed "
                          "version stays staged until promoted with `override_gate`")
    current: bool = False


class Pin(BaseModel):
    """An operator's pin (`POST /v1/adapters/{name}/pin`): the engine keeps this version in one of its slots,
    so the name's requests never wait for a load or a free slot. Persisted in the store beside the name's
    versions (every replica, and a restarted engine, pins it again); `version` null after an unpin."""

    version: int | None
    at: int = Field(description="when it was pinned or unpinned (Unix seconds)")
    by: str = Field(description="who: the admin key's fingerprint")


class PinRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int | None = Field(None, ge=1, le=2**31 - 1, strict=True,
                                description="the version to keep loaded; the current version when omitted")


class Adapter(BaseModel):
    object: Literal["adapter"] = "adapter"
    id: str
    name: str
    current_version: int | None = Field(
        description="the version the bare name serves; null after the current version was deleted (or when "
                    "every version was registered with make_current=false) until one is promoted")
    versions: list[AdapterVersion]
    canary: Canary | None = Field(None, description="the name's canary: the running one, or the last one and why "
                                                    "it ended (`PUT /v1/adapters/{name}/canary`)")
    pin: Pin | None = Field(None, description="the version pinned in the engine's slots, if any "
                                              "(`POST /v1/adapters/{name}/pin`)")


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Adapter]


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1, le=2**31 - 1, strict=True)
    override_gate: bool = Field(False, description="promote a version that failed its suite (recorded with who/when)")
    reason: str | None = Field(None, max_length=500, description="why, recorded with an override")


class Deleted(BaseModel):
    id: str
    object: Literal["adapter", "adapter.version"]
    deleted: bool = True
