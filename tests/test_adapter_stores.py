"""The adapter store backends, each instance standing for one replica: the local folder and an S3 bucket
(moto's real HTTP S3 API on loopback). Shared behaviour runs against both."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from pydantic import ValidationError

from s3_fixtures import MotoS3, moto_s3  # noqa: F401
from quiver.adapters.protocol import AdapterVersion, StoredFile
from quiver.adapters.s3_store import RESERVED, S3AdapterStore
from quiver.adapters.store import AdapterStore, LocalAdapterStore, StoreUnavailable
from quiver.adapters.store_factory import open_store
from quiver.errors import NotFound
from quiver.settings import Settings

FILES = {"adapter_config.json": b'{"r": 8, "peft_type": "LORA"}', "adapter_model.safetensors": b"\x00" * 4096}


@dataclass
class Backend:
    """Replicas of one store, and a way to write behind their backs."""

    kind: str
    replica: Callable[[], AdapterStore]  # a new instance on the same store
    put_raw: Callable[[str, bytes], None]  # write `<name>/<version>/<file>` straight into the store
    s3: MotoS3 | None = None
    bucket: str = ""
    prefix: str = ""


def local_backend(tmp_path: Path) -> Backend:
    root = tmp_path / "store"

    def put_raw(relative: str, data: bytes) -> None:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)

    def replica() -> AdapterStore:
        store = LocalAdapterStore(root)
        store.prepare()
        return store

    return Backend("local", replica, put_raw)


def s3_backend_on(s3: MotoS3, tmp_path: Path) -> Backend:
    bucket, prefix = s3.new_bucket(), "team/adapters"
    caches = iter(range(1000))

    def replica() -> AdapterStore:
        store = S3AdapterStore(f"s3://{bucket}/{prefix}", tmp_path / f"cache-{next(caches)}",
                               endpoint_url=s3.endpoint_url)
        store.prepare()
        return store

    def put_raw(relative: str, data: bytes) -> None:
        s3.client.put_object(Bucket=bucket, Key=f"{prefix}/{relative}", Body=data)

    return Backend("s3", replica, put_raw, s3, bucket, prefix)


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path: Path) -> Backend:
    if request.param == "local":
        return local_backend(tmp_path)
    return s3_backend_on(request.getfixturevalue("moto_s3"), tmp_path)


@pytest.fixture
def s3_backend(moto_s3: MotoS3, tmp_path: Path) -> Backend:  # noqa: F811
    return s3_backend_on(moto_s3, tmp_path)


def record_for(name: str, version: int, files: dict[str, bytes]) -> AdapterVersion:
    stored = [StoredFile(name=n, bytes=len(d), sha256=hashlib.sha256(d).hexdigest()) for n, d in sorted(files.items())]
    return AdapterVersion(id=f"{name}@{version}", name=name, version=version, created_at=int(time.time()),
                          base_model="SmolLM2-135M-Instruct", rank=8, alpha=16.0, target_modules=["q_proj"],
                          files=stored, size_bytes=sum(f.bytes for f in stored))


def register(store: AdapterStore, name: str, files: dict[str, bytes] = FILES, current: bool = True) -> AdapterVersion:
    """What the registry does, in its order: reserve, stage, place, (engine load), commit, point current."""
    version = store.reserve_version(name)
    staged = store.new_staging_dir()
    for file_name, data in files.items():
        (staged / file_name).write_bytes(data)
    record = record_for(name, version, files)
    store.place_version(staged, name, version)
    store.commit_version(record)
    if current:
        store.set_current(name, version)
    return record


def contents(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.name != "manifest.json"}


# --------------------------------------------------------------------------------------- both backends


def test_registered_versions_are_seen_and_served_by_another_replica(backend: Backend) -> None:
    first, second = backend.replica(), backend.replica()
    v1 = register(first, "support-bot")
    other_files = {**FILES, "adapter_model.safetensors": b"\x01" * 2048}
    v2 = register(first, "support-bot", other_files, current=False)
    assert (v1.version, v2.version) == (1, 2)

    scanned = second.scan()
    assert list(scanned) == ["support-bot"]
    assert scanned["support-bot"].current == 1
    assert scanned["support-bot"].versions == {1: v1, 2: v2}
    assert contents(second.local_path("support-bot", 2)) == other_files
    assert contents(first.local_path("support-bot", 1)) == FILES


def test_promote_through_one_replica_is_seen_by_the_other(backend: Backend) -> None:
    first, second = backend.replica(), backend.replica()
    register(first, "bot")
    register(first, "bot")
    assert second.scan()["bot"].current == 2
    second.set_current("bot", 1)
    assert first.scan()["bot"].current == 1


def test_deleted_versions_vanish_and_their_numbers_are_never_given_again(backend: Backend) -> None:
    first, second = backend.replica(), backend.replica()
    for _ in range(3):
        register(first, "bot")
    second.remove_version("bot", 3)
    second.set_current("bot", 2)
    assert sorted(first.scan()["bot"].versions) == [1, 2]
    assert register(first, "bot").version == 4

    second.remove_all_versions("bot", [1, 2, 4])
    assert first.scan() == {}
    assert register(second, "bot").version == 5


def test_uncommitted_and_damaged_versions_are_ignored(backend: Backend) -> None:
    first, second = backend.replica(), backend.replica()
    good = register(first, "bot")
    # A registration that never reached its commit (a crash, or the engine refused the adapter).
    version = first.reserve_version("bot")
    staged = first.new_staging_dir()
    (staged / "adapter_config.json").write_bytes(b"{}")
    first.place_version(staged, "bot", version)
    # A manifest that is not one, one that describes another version, and files without any manifest.
    backend.put_raw("bot/7/manifest.json", b"{not json")
    backend.put_raw("bot/8/manifest.json", json.dumps(record_for("bot", 1, FILES).model_dump(mode="json")).encode())
    backend.put_raw("bot/9/adapter_config.json", b"{}")
    backend.put_raw("other/1/manifest.json", b'{"object": "adapter.version"}')

    scanned = second.scan()
    assert list(scanned) == ["bot"] and scanned["bot"].versions == {1: good}
    # The damaged numbers are still taken.
    assert register(second, "bot").version == 10


def test_racing_replicas_never_get_the_same_version_number(backend: Backend) -> None:
    replicas = [backend.replica() for _ in range(3)]
    start = threading.Barrier(6)

    def reserve_many(store: AdapterStore) -> list[int]:
        start.wait()
        return [store.reserve_version("contended") for _ in range(5)]

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(reserve_many, replicas * 2))
    numbers = [n for result in results for n in result]
    assert Counter(numbers).most_common(1)[0][1] == 1, f"a number was handed out twice: {sorted(numbers)}"
    assert sorted(numbers) == list(range(1, 31))
    # The next one, from anywhere, follows on.
    assert replicas[0].reserve_version("contended") == 31


# --------------------------------------------------------------------------------------- S3 only


def test_s3_layout_and_the_manifest_last(s3_backend: Backend) -> None:
    store = s3_backend.replica()
    puts: list[str] = []
    for operation in ("PutObject", "CreateMultipartUpload"):
        store._client.meta.events.register(f"before-parameter-build.s3.{operation}",
                                           lambda params, **_: puts.append(params["Key"]))
    register(store, "bot")
    base = f"{s3_backend.prefix}/bot"
    assert s3_backend.s3.keys(s3_backend.bucket) == sorted(
        [f"{base}/index.json", f"{base}/1/{RESERVED}", f"{base}/1/manifest.json",
         *(f"{base}/1/{name}" for name in FILES)])
    version_puts = [key for key in puts if key.startswith(f"{base}/1/")]
    assert version_puts[0].endswith(RESERVED) and version_puts[-1].endswith("manifest.json")
    index = s3_backend.s3.client.get_object(Bucket=s3_backend.bucket, Key=f"{base}/index.json")["Body"].read()
    assert json.loads(index) == {"current": 1, "last_version": 1}


def test_s3_cache_is_downloaded_whole_once_and_kept(s3_backend: Backend) -> None:
    first, second = s3_backend.replica(), s3_backend.replica()
    register(first, "bot")
    second.scan()
    cached = second.local_path("bot", 1)
    assert cached == second.cache_dir / "bot" / "1" and contents(cached) == FILES
    assert not any((second.cache_dir / ".downloading").iterdir())
    # Versions are immutable, so a cached copy is served without asking the store again.
    calls: list[str] = []
    second._client.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))
    assert second.local_path("bot", 1) == cached
    assert calls == []


def test_s3_cache_survives_restarts_but_not_a_change_of_bucket(moto_s3: MotoS3, tmp_path: Path) -> None:  # noqa: F811
    def store(bucket: str, cache: str) -> S3AdapterStore:
        opened = S3AdapterStore(f"s3://{bucket}", tmp_path / cache, endpoint_url=moto_s3.endpoint_url)
        opened.prepare()
        opened.scan()  # what the registry does at start, before serving anything
        return opened

    first_bucket, second_bucket = moto_s3.new_bucket(), moto_s3.new_bucket()
    register(store(first_bucket, "cache"), "bot")
    # Restarted on the same bucket, the cached copy is used as it is.
    restarted = store(first_bucket, "cache")
    calls: list[str] = []
    restarted._client.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))
    assert contents(restarted.local_path("bot", 1)) == FILES and calls == []
    # Pointed at another bucket that also has a bot@1, with other weights: that one is served.
    other = {**FILES, "adapter_model.safetensors": b"\x02" * 1024}
    register(store(second_bucket, "writer-cache"), "bot", other)
    assert contents(store(second_bucket, "cache").local_path("bot", 1)) == other


def test_s3_damaged_download_leaves_nothing_behind(s3_backend: Backend) -> None:
    first, second = s3_backend.replica(), s3_backend.replica()
    register(first, "bot")
    s3_backend.put_raw("bot/1/adapter_model.safetensors", b"\x00" * 4095 + b"\x01")  # same size, other bytes
    with pytest.raises(StoreUnavailable):
        second.local_path("bot", 1)
    assert not (second.cache_dir / "bot" / "1").exists()
    assert not any((second.cache_dir / ".downloading").iterdir())


def test_s3_deleted_versions_leave_every_replica_cache(s3_backend: Backend) -> None:
    first, second = s3_backend.replica(), s3_backend.replica()
    register(first, "bot")
    register(first, "bot")
    second.scan()
    second.local_path("bot", 1)
    second.local_path("bot", 2)
    first.remove_version("bot", 1)
    assert not (first.cache_dir / "bot" / "1").exists()
    assert (second.cache_dir / "bot" / "1").exists()
    second.scan()  # the poll that notices the deletion
    assert not (second.cache_dir / "bot" / "1").exists() and (second.cache_dir / "bot" / "2").exists()
    with pytest.raises(NotFound) as missing:
        first.local_path("bot", 1)
    assert missing.value.status == 404
    # The objects are gone; only the claim on the number stays.
    assert s3_backend.s3.keys(s3_backend.bucket, f"{s3_backend.prefix}/bot/1/") == [
        f"{s3_backend.prefix}/bot/1/{RESERVED}"]


def test_s3_repeated_scans_only_list(s3_backend: Backend) -> None:
    first, second = s3_backend.replica(), s3_backend.replica()
    for name in ("a", "b", "c"):
        register(first, name)
    register(first, "a", current=False)
    second.scan()
    calls: list[str] = []
    second._client.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))
    second.scan()
    assert set(calls) == {"ListObjectsV2"}
    first.set_current("a", 2)  # a changed index.json is read again
    calls.clear()
    second.scan()
    assert sorted(calls) == ["GetObject", "ListObjectsV2"]


def test_s3_unreachable_store_is_a_503(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = S3AdapterStore("s3://nowhere-bucket", tmp_path / "cache", endpoint_url=f"http://127.0.0.1:{port}")
    with pytest.raises(StoreUnavailable) as failed:
        store.prepare()
    assert failed.value.status == 503 and failed.value.code == "store_unavailable"
    assert "127.0.0.1" not in failed.value.message  # clients learn nothing about the store's whereabouts


def test_s3_missing_bucket_is_refused_at_start(moto_s3: MotoS3, tmp_path: Path) -> None:  # noqa: F811
    store = S3AdapterStore("s3://no-such-bucket-here", tmp_path / "cache", endpoint_url=moto_s3.endpoint_url)
    with pytest.raises(StoreUnavailable):
        store.prepare()


# --------------------------------------------------------------------------------------- settings


def test_settings_choose_the_backend(tmp_path: Path) -> None:
    local = open_store(Settings(store_dir=tmp_path / "adapters"))
    assert isinstance(local, LocalAdapterStore) and local.root == tmp_path / "adapters"
    settings = Settings(store_url="s3://team-bucket/quiver/adapters", s3_endpoint_url="http://minio:9000",
                        state_dir=tmp_path / "run")
    remote = open_store(settings)
    assert isinstance(remote, S3AdapterStore)
    assert (remote.bucket, remote.prefix) == ("team-bucket", "quiver/adapters")
    assert remote.cache_dir == tmp_path / "run" / "adapter-cache"
    assert remote._client.meta.config.s3 == {"addressing_style": "path"}
    assert open_store(Settings(store_url="", store_dir=tmp_path)).location == str(tmp_path)


@pytest.mark.parametrize("field, value", [
    ("store_url", "https://bucket.s3.amazonaws.com/prefix"),
    ("store_url", "s3://Upper_Case/prefix"),
    ("store_url", "s3://key:secret@bucket/prefix"),
    ("store_url", "s3://bucket/a/../b"),
    ("s3_endpoint_url", "minio:9000"),
    ("s3_endpoint_url", "http://user:pass@minio:9000"),
    ("s3_addressing_style", "sideways"),
])
def test_bad_store_settings_are_refused(field: str, value: str) -> None:
    with pytest.raises(ValidationError, match=field):
        Settings(**{field: value})


def test_start_moves_corrupt_versions_aside_and_sweeps_stale_uncommitted_ones(
        backend: Backend, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import quiver.adapters.s3_store as s3_module
    import quiver.adapters.store as store_module

    first = backend.replica()
    good = register(first, "bot")
    backend.put_raw("bot/2/adapter_config.json", b"{}")  # staged, never committed
    backend.put_raw("bot/3/manifest.json", b"{half a rec")  # a half-written record
    backend.put_raw("bot/3/adapter_config.json", b"{}")
    backend.put_raw("bot/4/manifest.json", json.dumps(record_for("bot", 1, FILES).model_dump(mode="json")).encode())

    # Young uncommitted folders may be another replica's registration in progress: left alone.
    backend.replica()
    assert _version_files(backend, "bot", 2) == ["adapter_config.json"]

    for module in (store_module, s3_module):
        monkeypatch.setattr(module, "UNCOMMITTED_GRACE_S", -1.0)
    with caplog.at_level("WARNING"):
        restarted = backend.replica()
    assert _version_files(backend, "bot", 2) == []
    assert _version_files(backend, "bot", 3) == _version_files(backend, "bot", 4) == []
    moved = _corrupt_files(backend)
    assert sorted(name.split("/", 1)[1] for name in moved) == [
        "adapter_config.json", "manifest.json", "manifest.json"]
    assert {name.split("/", 1)[0].split(".")[0] for name in moved} == {"bot@3", "bot@4"}
    logged = caplog.text
    assert "bot@2, staged by a registration that never finished" in logged
    assert "bot@3 has an unreadable manifest; moved aside" in logged and "bot@4" in logged
    # The rest loads; no number is given out twice.
    assert restarted.scan()["bot"].versions == {1: good}
    assert register(restarted, "bot").version == 5


def _version_files(backend: Backend, name: str, version: int) -> list[str]:
    if backend.kind == "local":
        folder = backend_root(backend) / name / str(version)
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    assert backend.s3 is not None
    listed = backend.s3.client.list_objects_v2(Bucket=backend.bucket, Prefix=f"{backend.prefix}/{name}/{version}/")
    return sorted(k["Key"].rsplit("/", 1)[1] for k in listed.get("Contents", ()) if not k["Key"].endswith(RESERVED))


def _corrupt_files(backend: Backend) -> list[str]:
    if backend.kind == "local":
        root = backend_root(backend) / ".corrupt"
        return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]
    assert backend.s3 is not None
    listed = backend.s3.client.list_objects_v2(Bucket=backend.bucket, Prefix=f"{backend.prefix}/.corrupt/")
    return [k["Key"].split("/.corrupt/", 1)[1] for k in listed.get("Contents", ())]


def backend_root(backend: Backend) -> Path:
    store = backend.replica()
    assert isinstance(store, LocalAdapterStore)
    return store.root
