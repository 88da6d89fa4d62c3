"""The files through which a fine-tuning worker process and the server's job runner talk (no heavy imports)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from quiver.common.files import write_json_atomic  # noqa: F401  (the runner and the worker write through it)

SPEC = "spec.json"  # written by the runner: what to train
EVENTS = "events.jsonl"  # appended by both, one at a time: messages and per-step metrics
RESULT = "result.json"  # written last by the worker, atomically
TRAIN_LOG = "train.log"


class EventLog:
    def __init__(self, job_dir: Path) -> None:
        self.path = job_dir / EVENTS

    def emit(self, message: str, level: str = "info", kind: str = "message", data: dict[str, Any] | None = None) -> None:
        event = {"created_at": int(time.time()), "level": level, "message": message, "type": kind, "data": data}
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps(event) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        events = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:  # a line being written right now
                continue
        return events
