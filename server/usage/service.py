"""The usage ledger: requests, errors and tokens per (API key, adapter version), in per-minute buckets.

Kept in a sqlite file in `state_dir` (stdlib, one file, survives restarts, summed by SQL): per minute there is
one row per key and version that had traffic, so a busy day of 10 keys x 20 versions is at most 288k small
rows, and rows older than the retention (`QUIVER_USAGE_RETENTION_DAYS`) are deleted. Requests add to an
in-memory batch (no disk I/O on the request path); a background task writes the batch every few seconds, and
every query writes it first, so answers include the last second's traffic. Each replica has its own ledger
(its own state_dir): a cluster's usage is the sum over replicas.

A key is recorded by its fingerprint (`key-` + the first 12 hex digits of its sha256), never the key itself.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Iterable

from quiver.errors import InvalidRequest
from quiver.usage.protocol import GROUPS, UsageRow

log = logging.getLogger(__name__)

BUCKET_S = 60
FLUSH_EVERY_S = 5.0
_FIELDS = ("requests", "errors", "prompt_tokens", "completion_tokens")
# Column names for group_by come only from this table (never from the caller's text).
_COLUMN = {"key": "api_key", "adapter": "adapter", "adapter_version": "version"}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    minute INTEGER NOT NULL,
    api_key TEXT NOT NULL,
    adapter TEXT NOT NULL,
    version TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (minute, api_key, version)
) WITHOUT ROWID
"""


class UsageLedger:
    def __init__(self, path: Path, retention_s: float, clock=time.time) -> None:
        self.path = path
        self.retention_s = retention_s
        self.clock = clock
        self._pending: Counter[tuple[int, str, str, str, str]] = Counter()
        self._pending_lock = threading.Lock()  # the event loop adds, a worker thread takes the batch
        self._db_lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)

    def add(self, key: str, adapter: str, version: str, *, requests: int = 0, errors: int = 0,
            prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        minute = int(self.clock()) // BUCKET_S * BUCKET_S
        with self._pending_lock:
            for field, amount in zip(_FIELDS, (requests, errors, prompt_tokens, completion_tokens)):
                if amount:
                    self._pending[(minute, key, adapter, version, field)] += amount

    def flush(self) -> None:
        """Write the batch and drop buckets past the retention (blocking: run it in a thread)."""
        with self._pending_lock:
            batch, self._pending = self._pending, Counter()
        rows: dict[tuple[int, str, str, str], dict[str, int]] = {}
        for (minute, key, adapter, version, field), amount in batch.items():
            rows.setdefault((minute, key, adapter, version), dict.fromkeys(_FIELDS, 0))[field] += amount
        with self._db_lock:
            try:
                self._db.execute("BEGIN")
                self._db.executemany(
                    "INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (minute, api_key, version) DO "
                    "UPDATE SET requests = requests + excluded.requests, errors = errors + excluded.errors, "
                    "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
                    "completion_tokens = completion_tokens + excluded.completion_tokens",
                    [(*row, *(counts[f] for f in _FIELDS)) for row, counts in rows.items()])
                self._db.execute("DELETE FROM usage WHERE minute < ?", (int(self.clock() - self.retention_s),))
                self._db.execute("COMMIT")
            except sqlite3.Error:
                self._db.execute("ROLLBACK")
                with self._pending_lock:  # kept for the next attempt, not lost
                    self._pending.update(batch)
                raise

    def query(self, start: int, end: int, group_by: Iterable[str], key: str | None = None) -> list[UsageRow]:
        """Sums over the buckets that begin in [start, end), grouped by `group_by` (names from GROUPS);
        `key` restricts the sums to one key's traffic."""
        groups = [g for g in GROUPS if g in set(group_by)]  # a fixed order, and only known names
        columns = [_COLUMN[g] for g in groups]
        where = "minute >= ? AND minute < ?" + (" AND api_key = ?" if key is not None else "")
        params: list[object] = [start // BUCKET_S * BUCKET_S, end] + ([key] if key is not None else [])
        select = ", ".join([*columns, *(f"SUM({f})" for f in _FIELDS)])
        group = f" GROUP BY {', '.join(columns)} ORDER BY {', '.join(columns)}" if columns else ""
        self.flush()
        with self._db_lock:
            found = self._db.execute(f"SELECT {select} FROM usage WHERE {where}{group}", params).fetchall()
        result = []
        for row in found:
            named = dict(zip(groups, row[:len(groups)]))
            sums = dict(zip(_FIELDS, (int(v or 0) for v in row[len(groups):])))
            if not any(sums.values()):
                continue  # totals over no traffic at all (SQL's SUM of nothing): no row, as with groups
            result.append(UsageRow(**named, **sums, total_tokens=sums["prompt_tokens"] + sums["completion_tokens"]))
        return result

    async def run(self, every_s: float = FLUSH_EVERY_S) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await asyncio.to_thread(self.flush)
            except sqlite3.Error:
                log.exception("writing usage to %s failed; trying again", self.path)

    def close(self) -> None:
        try:
            self.flush()
        except sqlite3.Error:
            log.exception("writing usage to %s failed at shutdown", self.path)
        with self._db_lock:
            self._db.close()


def parse_group_by(text: str) -> list[str]:
    """`key`, `adapter`, `adapter_version`, comma-separated (empty: one row of totals)."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in GROUPS]
    if unknown:
        raise InvalidRequest(f"`group_by` takes {', '.join(GROUPS)} (comma-separated); not `{unknown[0][:40]}`",
                             code="invalid_group_by", param="group_by")
    return [g for g in GROUPS if g in names]
