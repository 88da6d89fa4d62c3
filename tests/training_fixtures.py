"""Fixtures shared by the training tests: the real default base model and its tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def base_model_dir(model_dir: Path) -> Path:
    """The same prepared model as the serving tests' (`conftest.model_dir`): one conversion per machine."""
    return model_dir


@pytest.fixture(scope="session")
def tokenizer(base_model_dir):
    from quiver.training.trainer import load_tokenizer

    return load_tokenizer(base_model_dir)


def write_lines(path: Path, rows: list) -> Path:
    """Rows are dicts (written as JSON) or raw strings (written as they are, to test broken lines)."""
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def chat(user: str, answer: str, system: str | None = "Be brief.") -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": messages + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}
