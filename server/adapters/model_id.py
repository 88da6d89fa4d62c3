"""The one grammar of model ids, used by every route that takes one (generation, `/v1/models/{id}`, the
adapter routes): the base model's name, an adapter `name`, or `name@N` pinning version N.

N is ASCII digits without a leading zero, at most `MAX_VERSION` (`str.isdigit` would also accept `²`, which
`int()` refuses: a 500). Anything else is `quiver.errors.InvalidModelId`, a 400 wherever it is raised.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from quiver.errors import InvalidModelId as _InvalidModelId

MAX_VERSION = 2**31 - 1
# An adapter's name, as registered (and checked by `validation.check_adapter_name`). `[a-z0-9]` and `[0-9]`
# are ASCII-only ranges.
ADAPTER_NAME = r"[a-z0-9][a-z0-9._-]{0,63}"
_ADAPTER_REF = re.compile(rf"(?P<name>{ADAPTER_NAME})(?:@(?P<version>[1-9][0-9]{{0,9}}))?")


def _invalid(model_id: str, param: str) -> _InvalidModelId:
    # The caller's text is cut short: a message must not echo a megabyte back.
    return _InvalidModelId(f"`{model_id[:100]}` is not a model id: use the base model's name, an adapter `name` "
                           f"or `name@version` (version 1 to {MAX_VERSION})", param=param)


@dataclass(frozen=True)
class ModelRef:
    """A parsed model id: the base model (`name` is its name), an adapter's current version, or a pin."""

    name: str
    version: int | None = None
    is_base: bool = False

    @property
    def id(self) -> str:
        """The canonical spelling."""
        return self.name if self.version is None else f"{self.name}@{self.version}"


def parse_adapter_ref(ref: str, param: str = "model") -> ModelRef:
    """`name` or `name@N`, nothing else."""
    match = _ADAPTER_REF.fullmatch(ref)
    if match is None or (match["version"] is not None and int(match["version"]) > MAX_VERSION):
        raise _invalid(ref, param)
    return ModelRef(match["name"], int(match["version"]) if match["version"] else None)


def parse_model_id(model_id: str, base_model_name: str, param: str = "model") -> ModelRef:
    """The base model's name (whatever its spelling: it comes from the operator), or an adapter reference."""
    if model_id == base_model_name:
        return ModelRef(base_model_name, is_base=True)
    return parse_adapter_ref(model_id, param)


def parse_adapter_name(name: str, param: str = "name") -> str:
    """A bare adapter name (the registry routes that take no version)."""
    ref = parse_adapter_ref(name, param)
    if ref.version is not None:
        raise _invalid(name, param)
    return ref.name
