"""The one atomic-write and sha256 helper: readers (other processes, a restarted server) never see half a file."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a unique temporary name beside `path`, flush to disk, then rename over it in one step."""
    path = Path(path)
    # A unique name: two writers of the same path never share (and truncate) one temporary file.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, payload: object, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(payload, indent=indent, ensure_ascii=False))


def file_sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()
