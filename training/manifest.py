"""`manifest.json` in a run folder: what the adapter was trained on and from, and what it achieved."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any

from quiver.common.files import write_text_atomic

MANIFEST_FILE = "manifest.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def base_model_digest(model_dir: Path) -> str:
    """sha256 over the files that define the weights and architecture, in name order."""
    digest = hashlib.sha256()
    files = sorted(p for p in Path(model_dir).iterdir() if p.suffix == ".safetensors" or p.name == "config.json")
    if not files:
        raise FileNotFoundError(f"{model_dir} holds no safetensors weights")
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def text_sha256(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def package_versions() -> dict[str, str]:
    versions = {}
    for package in ("quiver", "peft", "torch", "transformers", "trl"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a quiver training run (no {MANIFEST_FILE})")
    return json.loads(path.read_text())


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    """Write atomically: the server and `quiver eval` may read it while a run updates it."""
    write_text_atomic(Path(run_dir) / MANIFEST_FILE, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def update_manifest(run_dir: Path, **fields: Any) -> dict[str, Any]:
    manifest = read_manifest(run_dir)
    manifest.update(fields)
    write_manifest(run_dir, manifest)
    return manifest
