"""The canary record in both store backends (local folder, S3 on a moto server): written by one replica, read
by another, atomic, and invisible to the scan of versions."""

from __future__ import annotations

from s3_fixtures import moto_s3  # noqa: F401
from test_adapter_stores import Backend, backend, register, s3_backend  # noqa: F401

from quiver.adapters.canary import Canary, RollbackPolicy
from quiver.adapters.service import parse_canary


def test_a_canary_written_by_one_replica_is_read_by_another(backend: Backend) -> None:  # noqa: F811
    writer, reader = backend.replica(), backend.replica()
    register(writer, "bot")
    register(writer, "bot", current=False)
    assert reader.read_document("bot", "canary.json") is None
    assert reader.read_document("never-registered", "canary.json") is None
    canary = Canary(name="bot", version=2, weight=0.25, rollback=RollbackPolicy(min_requests=5), started_at=1)
    writer.write_document("bot", "canary.json", canary.model_dump_json().encode())
    assert parse_canary("bot", reader.read_document("bot", "canary.json")) == canary
    ended = canary.model_copy(update={"active": False, "ended_at": 2, "ended_reason": "ended"})
    writer.write_document("bot", "canary.json", ended.model_dump_json().encode())
    assert parse_canary("bot", reader.read_document("bot", "canary.json")) == ended
    scanned = reader.scan()["bot"]  # the record is beside the versions, not one of them
    assert sorted(scanned.versions) == [1, 2] and scanned.current == 1


def test_an_unreadable_canary_record_is_ignored(backend: Backend) -> None:  # noqa: F811
    store = backend.replica()
    register(store, "bot")
    for raw in (b"{not json", b"[" * 10_000, b'{"name": "bot"}', b'{"name": "other", "version": 2, "weight": 0.5, '
                b'"rollback": {}, "started_at": 1}'):
        backend.put_raw("bot/canary.json", raw)
        assert parse_canary("bot", store.read_document("bot", "canary.json")) is None


def test_a_poll_reads_the_canary_records_as_of_its_scan(backend: Backend) -> None:  # noqa: F811
    writer, reader = backend.replica(), backend.replica()
    for name in ("a", "b", "c"):
        register(writer, name)
    writer.write_document("a", "canary.json", b'{"v": 1}')
    reader.scan()
    assert reader.read_documents(["a", "b", "c"], "canary.json") == {"a": b'{"v": 1}'}
    writer.write_document("a", "canary.json", b'{"v": 2}')
    writer.write_document("c", "canary.json", b'{"v": 3}')
    reader.scan()
    assert reader.read_documents(["a", "b", "c"], "canary.json") == {"a": b'{"v": 2}', "c": b'{"v": 3}'}


def test_s3_poll_reads_only_changed_canary_records(s3_backend: Backend) -> None:  # noqa: F811
    """Requests counted as the client sends them to the real S3 server process: a steady poll over 20 adapters,
    two with a canary record, is one LIST; a changed record costs one GET, an unchanged one none."""
    writer, reader = s3_backend.replica(), s3_backend.replica()
    names = [f"bot-{i}" for i in range(20)]
    for name in names:
        register(writer, name)
    writer.write_document("bot-3", "canary.json", b'{"v": 1}')
    writer.write_document("bot-7", "canary.json", b'{"v": 1}')
    calls: list[str] = []
    reader._client.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))

    def poll() -> dict[str, bytes]:
        calls.clear()
        reader.scan()
        return reader.read_documents(names, "canary.json")

    assert poll() == {"bot-3": b'{"v": 1}', "bot-7": b'{"v": 1}'}
    first = sorted(calls)  # the first poll reads every manifest and index once, and the two records
    assert first.count("GetObject") == 20 + 20 + 2 and first.count("ListObjectsV2") == 1
    assert poll() == {"bot-3": b'{"v": 1}', "bot-7": b'{"v": 1}'} and calls == ["ListObjectsV2"]
    writer.write_document("bot-7", "canary.json", b'{"v": 2}')
    assert poll()["bot-7"] == b'{"v": 2}' and sorted(calls) == ["GetObject", "ListObjectsV2"]
