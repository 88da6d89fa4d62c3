"""Fold an adapter into its base model: one standalone Hugging Face checkpoint any server loads as a plain model."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from quiver.training.manifest import MANIFEST_FILE, read_manifest
from quiver.training.trainer import load_tokenizer


def merge_adapter(run_dir: Path, out_dir: Path, base_model_dir: Path | None = None) -> Path:
    """Write base + adapter as safetensors weights with the base tokenizer and chat template into `out_dir`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if base_model_dir is None:
        base_model_dir = Path(read_manifest(run_dir)["base_model"]["path"])
    base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, run_dir).merge_and_unload()

    # Build next to the destination and rename, so a failed merge never leaves a half-written model behind.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".merge-", dir=out_dir.parent))
    try:
        merged.save_pretrained(staging, safe_serialization=True)
        load_tokenizer(base_model_dir).save_pretrained(staging)
        if (run_dir / MANIFEST_FILE).is_file():
            shutil.copy(run_dir / MANIFEST_FILE, staging / "quiver_adapter_manifest.json")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
