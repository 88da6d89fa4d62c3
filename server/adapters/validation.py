"""Admission checks: everything about an uploaded adapter is verified before the engine ever sees it."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import re2

from quiver.adapters.model_id import ADAPTER_NAME
from quiver.adapters.safetensors_header import SafetensorsError, all_zero, read_header
from quiver.errors import Conflict, InvalidRequest, PayloadTooLarge
from quiver.limits import loads_bounded

ADAPTER_NAME_PATTERN = re.compile(rf"^{ADAPTER_NAME}$")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Kept with the version when uploaded; anything else that is not a pickle is ignored.
STORED_FILES = (CONFIG_FILE, WEIGHTS_FILE, "README.md")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_WEIGHT_DTYPES = {"F32", "F16", "BF16"}
_MAX_CONFIG_BYTES = 1024 * 1024
# Caller regexes (`target_modules` as a string, `rank_pattern`/`alpha_pattern` keys) are matched with RE2:
# linear time in pattern x text whatever the pattern, so no upload can stall a core (and with it the GIL,
# which Python's own `re` holds while backtracking: a thread would not save the event loop). RE2 refuses
# backreferences and look-around, which no module-name pattern needs; such a pattern is a clear 400.
_MAX_PATTERN_CHARS = 1024
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a refused pattern is the caller's error, not a log line
_RE2_OPTIONS.max_mem = 8 * 1024 * 1024  # bounds the compiled automaton (e.g. `(a{1000}){1000}`)


class AdmissionError(InvalidRequest):
    """An upload refused by an admission check (400 unless a subclass says otherwise)."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message, code=code, param=param)


class UploadTooLarge(PayloadTooLarge, AdmissionError):  # 413
    pass


class NameConflict(Conflict, AdmissionError):  # 409
    pass


def check_adapter_name(name: str) -> None:
    if not ADAPTER_NAME_PATTERN.fullmatch(name):
        raise AdmissionError(
            "invalid_adapter_name",
            "adapter names are 1-64 characters of a-z, 0-9, '.', '_' or '-', starting with a letter or digit",
            param="name",
        )


@dataclass(frozen=True)
class BaseModelSpec:
    """What an adapter must fit: the base model's linear layers and their (out, in) shapes, and the layers the
    engine serves LoRA on (`served_modules`, module names such as q_proj; None: every one)."""

    architecture: str
    model_type: str
    linear_shapes: dict[str, tuple[int, int]]
    served_modules: frozenset[str] | None = None

    @classmethod
    def from_folder(cls, model_dir: Path, served_modules: Sequence[str] = ()) -> "BaseModelSpec":
        """`served_modules`: the engine's --lora-target-modules (empty: all); each must name linear layers of the
        model, else ValueError (a server that would refuse every adapter for a typo must not start)."""
        config = json.loads((model_dir / "config.json").read_text())
        shards = sorted(model_dir.glob("*.safetensors"))
        if not shards:
            raise ValueError(f"{model_dir} holds no safetensors weights")
        shapes: dict[str, tuple[int, int]] = {}
        for shard in shards:
            for name, info in read_header(shard).items():
                if name.endswith(".weight") and len(info.shape) == 2:
                    out_features, in_features = info.shape
                    shapes[name.removesuffix(".weight")] = (out_features, in_features)
        spec = cls(
            architecture=(config.get("architectures") or ["?"])[0],
            model_type=config.get("model_type", "?"),
            linear_shapes=shapes,
            served_modules=frozenset(served_modules) or None,
        )
        unknown = sorted(name for name in served_modules if not spec.modules_matching([name]))
        if unknown:
            layers = sorted({name.rsplit(".", 1)[-1] for name in shapes if name.count(".") > 1})
            raise ValueError(f"lora_target_modules names {', '.join(unknown)}: not a linear layer of "
                             f"{spec.architecture} (its layers: {', '.join(layers)})")
        return spec

    def serves(self, module: str) -> bool:
        """Whether the engine applies LoRA to this module (a full name from an adapter's weights)."""
        return self.served_modules is None or module.rsplit(".", 1)[-1] in self.served_modules

    def modules_matching(self, target: str | list[str]) -> set[str]:
        """PEFT's rule: a list names module-name suffixes, a string is a regex over the full name."""
        if isinstance(target, str):
            pattern = compile_caller_pattern(target, "target_modules")
            return {name for name in self.linear_shapes if pattern.fullmatch(name)}
        return {
            name for name in self.linear_shapes
            if any(name == suffix or name.endswith("." + suffix) for suffix in target)
        }


def compile_caller_pattern(pattern: str, field_name: str) -> Any:
    """A caller's regular expression, compiled for linear-time matching (RE2), or a 400."""
    if len(pattern) > _MAX_PATTERN_CHARS:
        raise AdmissionError("invalid_adapter_config",
                             f"a `{field_name}` pattern is longer than {_MAX_PATTERN_CHARS} characters", param="files")
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error:
        raise AdmissionError(
            "invalid_adapter_config",
            f"a `{field_name}` pattern is not a regular expression this server accepts "
            "(RE2 syntax: no backreferences or look-around)", param="files") from None


@dataclass(frozen=True)
class AdapterSpec:
    rank: int
    alpha: float
    target_modules: list[str]
    base_model_name_or_path: str | None
    modules: int
    config: dict[str, Any] = field(repr=False)
    warnings: list[str] = field(default_factory=list)


def _load_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise AdmissionError("missing_adapter_config", f"the upload has no {CONFIG_FILE}", param="files")
    if path.stat().st_size > _MAX_CONFIG_BYTES:
        raise AdmissionError("invalid_adapter_config", f"{CONFIG_FILE} is implausibly large", param="files")
    try:
        config = loads_bounded(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise AdmissionError("invalid_adapter_config", f"{CONFIG_FILE} is not valid JSON ({exc})"[:300],
                             param="files") from None
    if not isinstance(config, dict):
        raise AdmissionError("invalid_adapter_config", f"{CONFIG_FILE} is not a JSON object", param="files")
    return config


def _check_config(config: dict[str, Any], base: BaseModelSpec, max_rank: int) -> tuple[int, list[str] | str]:
    def refuse(code: str, message: str) -> AdmissionError:
        return AdmissionError(code, message, param="files")

    if config.get("peft_type") != "LORA":
        raise refuse("unsupported_adapter_type", f"only PEFT LoRA adapters are served, not {config.get('peft_type')!r}")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise refuse("invalid_adapter_config", "adapter_config.json needs a positive integer `r`")
    patterns = {field_name: config.get(field_name) or {} for field_name in ("rank_pattern", "alpha_pattern")}
    for field_name, mapping in patterns.items():
        if not isinstance(mapping, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in mapping.values()):
            raise refuse("invalid_adapter_config", f"`{field_name}` must map module patterns to positive numbers")
        for key in mapping:
            compile_caller_pattern(key, field_name)
    if not all(isinstance(v, int) for v in patterns["rank_pattern"].values()):
        raise refuse("invalid_adapter_config", "`rank_pattern` ranks must be integers")
    ranks = [rank, *patterns["rank_pattern"].values()]
    if max(ranks) > max_rank:
        raise refuse("rank_too_large", f"rank {max(ranks)} is above this server's maximum LoRA rank of {max_rank}")
    if config.get("use_dora"):
        raise refuse("dora_not_supported", "DoRA adapters are not supported by the engine")
    if config.get("modules_to_save"):
        raise refuse("modules_to_save_not_supported", "adapters with `modules_to_save` (full extra layers) are not supported")
    if config.get("bias", "none") != "none":
        raise refuse("bias_not_supported", "only adapters trained with bias='none' are supported")
    task_type = config.get("task_type")
    if task_type not in (None, "CAUSAL_LM"):
        raise refuse("unsupported_task_type", f"the base model is a causal LM; this adapter is for {task_type}")
    targets = config.get("target_modules")
    if not targets or not isinstance(targets, (list, str)) or (
        isinstance(targets, list) and not all(isinstance(t, str) for t in targets)
    ):
        raise refuse("invalid_adapter_config", "adapter_config.json needs `target_modules`")
    if isinstance(targets, list):
        missing = sorted(t for t in targets if not base.modules_matching([t]))
        if missing:
            raise refuse(
                "unknown_target_module",
                f"the base model ({base.architecture}) has no linear layer named {', '.join(missing)}",
            )
    else:
        matched = base.modules_matching(targets)
        if not matched:
            raise refuse("unknown_target_module", f"`target_modules` matches no linear layer of {base.architecture}")
    return rank, targets


# An adapter whose every LoRA B matrix is zero adds B @ A = 0 to every layer: it serves exactly the base model.
# That is PEFT's initialisation, saved before any training step (a pipeline that forgot to train, or saved
# the wrong checkpoint). It is accepted - harmless, and a deliberate identity adapter has its uses - but the
# version record carries this warning, shown by the registry API and /v1/models.
NOOP_ADAPTER_WARNING = ("noop_adapter: every lora_B weight is zero, so this adapter changes nothing (PEFT's "
                        "initialisation, saved before training?)")


def _check_weights(path: Path, config: dict[str, Any], rank: int, base: BaseModelSpec) -> tuple[int, list[str]]:
    def refuse(code: str, message: str) -> AdmissionError:
        return AdmissionError(code, message, param="files")

    if not path.is_file():
        raise refuse("missing_adapter_weights", f"the upload has no {WEIGHTS_FILE}")
    try:
        tensors = read_header(path)
    except SafetensorsError as exc:
        raise refuse("invalid_safetensors", f"{WEIGHTS_FILE} is not a valid safetensors file: {exc}") from None
    if not tensors:
        raise refuse("empty_adapter", f"{WEIGHTS_FILE} holds no tensors")
    rank_pattern = [(compile_caller_pattern(key, "rank_pattern"), r) for key, r in (config.get("rank_pattern") or {}).items()]
    parts: dict[str, set[str]] = {}
    for name, info in tensors.items():
        match = _LORA_KEY.match(name)
        if not match:
            raise refuse("unsupported_adapter_tensor", f"tensor {name!r} is not a LoRA A/B weight of a linear layer")
        module, part = match["module"], match["part"]
        if module not in base.linear_shapes:
            raise refuse("unknown_target_module", f"tensor {name!r} targets {module!r}, which the base model lacks")
        if info.dtype not in _WEIGHT_DTYPES:
            raise refuse("invalid_tensor_dtype", f"tensor {name!r} has dtype {info.dtype}; expected F32, F16 or BF16")
        out_features, in_features = base.linear_shapes[module]
        module_rank = next((r for pattern, r in rank_pattern if pattern.search(module)), rank)
        expected = (module_rank, in_features) if part == "A" else (out_features, module_rank)
        if info.shape != expected:
            raise refuse(
                "shape_mismatch",
                f"tensor {name!r} has shape {list(info.shape)}, but the base model needs {list(expected)} "
                f"(is this adapter for another model?)",
            )
        parts.setdefault(module, set()).add(part)
    unserved = unserved_modules(parts, base)
    if unserved:
        # vLLM would load such an adapter and silently leave those layers out: it would answer as another model.
        raise refuse("target_module_not_served",
                     f"this server applies LoRA to {', '.join(sorted(base.served_modules or ()))} only "
                     f"(lora_target_modules); the adapter trains {', '.join(unserved)}")
    incomplete = sorted(module for module, seen in parts.items() if seen != {"A", "B"})
    if incomplete:
        raise refuse("incomplete_adapter", f"these layers lack a lora_A or lora_B weight: {', '.join(incomplete[:5])}")
    b_weights = [info for name, info in tensors.items() if _LORA_KEY.match(name)["part"] == "B"]  # type: ignore[index]
    return len(parts), [NOOP_ADAPTER_WARNING] if all_zero(path, b_weights) else []


def unserved_modules(modules: Iterable[str], base: BaseModelSpec) -> list[str]:
    """The layer names (q_proj, ...) among `modules` (full names) that the engine applies no LoRA to."""
    return sorted({module.rsplit(".", 1)[-1] for module in modules if not base.serves(module)})


def adapter_modules(folder: Path) -> set[str]:
    """The modules an adapter folder holds LoRA weights for, from its safetensors header (nothing else is read)."""
    return {match["module"] for name in read_header(folder / WEIGHTS_FILE) if (match := _LORA_KEY.match(name))}


def validate_adapter_dir(folder: Path, base: BaseModelSpec, max_rank: int) -> AdapterSpec:
    config = _load_config(folder / CONFIG_FILE)
    rank, targets = _check_config(config, base, max_rank)
    modules, warnings = _check_weights(folder / WEIGHTS_FILE, config, rank, base)
    alpha = config.get("lora_alpha", rank)
    return AdapterSpec(
        rank=rank,
        alpha=float(alpha) if isinstance(alpha, (int, float)) else float(rank),
        target_modules=[targets] if isinstance(targets, str) else list(targets),
        base_model_name_or_path=config.get("base_model_name_or_path"),
        modules=modules,
        config=config,
        warnings=warnings,
    )
