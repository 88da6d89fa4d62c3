"""The canary record in both store backends (local folder, S3 on a moto server): written by one replica, read
by another, atomic, and invisible to the scan of versions."""

from __future__ import annotations

from s3_fixtures import moto_s3  # noqa: F401
from test_adapter_stores import Backend, backend, register  # noqa: F401

from quiver.adapters.canary import Canary, RollbackPolicy
from quiver.adapters.service import parse_canary


def test_a_canary_written_by_one_replica_is_read_by_another(backend: Backend) -> None:  # noqa: F811
    writer, reader = backend.replica(), backend.replica()
    register(writer, "bot")
    register(writer, "bot", current=False)
    assert reader.read_canary("bot") is None and reader.read_canary("never-registered") is None
    canary = Canary(name="bot", version=2, weight=0.25, rollback=RollbackPolicy(min_requests=5), started_at=1)
    writer.write_canary("bot", canary.model_dump_json().encode())
    assert parse_canary("bot", reader.read_canary("bot")) == canary
    ended = canary.model_copy(update={"active": False, "ended_at": 2, "ended_reason": "ended"})
    writer.write_canary("bot", ended.model_dump_json().encode())
    assert parse_canary("bot", reader.read_canary("bot")) == ended
    scanned = reader.scan()["bot"]  # the record is beside the versions, not one of them
    assert sorted(scanned.versions) == [1, 2] and scanned.current == 1


def test_an_unreadable_canary_record_is_ignored(backend: Backend) -> None:  # noqa: F811
    store = backend.replica()
    register(store, "bot")
    for raw in (b"{not json", b"[" * 10_000, b'{"name": "bot"}', b'{"name": "other", "version": 2, "weight": 0.5, '
                b'"rollback": {}, "started_at": 1}'):
        backend.put_raw("bot/canary.json", raw)
        assert parse_canary("bot", store.read_canary("bot")) is None
