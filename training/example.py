"""One training example as chat messages: what the data checks produce and the encoder consumes.

Its own module so that `data` (which checks and splits examples, and encodes them to count tokens) and
`encoding` (which turns them into token ids) both depend on it instead of on each other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass
class Example:
    line: int
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {"messages": self.messages}
        if self.tools:
            row["tools"] = self.tools
        return row

    def key(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True, ensure_ascii=False)

    def prompt_key(self) -> str:
        """Everything before the last assistant turn: the context the answer is conditioned on."""
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return json.dumps({"messages": self.messages[:last], "tools": self.tools}, sort_keys=True, ensure_ascii=False)

    def final_answer(self) -> dict[str, Any]:
        return next(m for m in reversed(self.messages) if m["role"] == "assistant")
