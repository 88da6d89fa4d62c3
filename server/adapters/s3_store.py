"""The adapter store in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, ...), for replicas without a
shared volume.

    s3://<bucket>/<prefix>/<name>/index.json             {"current": N, "last_version": M}
    s3://<bucket>/<prefix>/<name>/<version>/<files>      adapter files, uploaded first
    s3://<bucket>/<prefix>/<name>/<version>/manifest.json   put last: the version exists once it does
    s3://<bucket>/<prefix>/<name>/<version>/.reserved    claims the number; kept when the version is
                                                         deleted, so a number is never given out twice

Numbers are claimed with conditional writes (`If-None-Match: *`): of two replicas racing for the same
number exactly one put succeeds, the other gets 412 and tries the next. index.json is updated with
compare-and-swap (`If-Match: <etag>`), so concurrent updates are never lost. The endpoint must honour
both headers (AWS S3 and MinIO do); one that ignores them silently loses that guarantee.

The engine loads adapters from a local folder only, so each replica keeps a cache:

    <cache>/<name>/<version>/      the version's files and manifest: placed there by the replica that
                                   registered it, or downloaded (checked against the manifest's sha256)
                                   into <cache>/.downloading/ and renamed into place on first use
    <cache>/.staging/              uploads being checked

Versions are immutable, so a cached folder never goes stale. Each scan removes the folders of versions
that are gone from the bucket, and those whose manifest is not the bucket's (a cache kept across a change
of bucket, or a bucket emptied and refilled): the manifest holds every file's sha256, so an equal
manifest means equal files. Credentials come from boto3's standard chain (environment,
shared config, web identity, instance/pod roles), never from quiver's settings.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import boto3
from boto3.exceptions import Boto3Error
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from quiver.adapters.protocol import AdapterVersion
from quiver.adapters.store import (
    INDEX,
    MANIFEST,
    AdapterStore,
    UNCOMMITTED_GRACE_S,
    StoredAdapter,
    StoreUnavailable,
    assemble,
    discard,
    file_sha256,
    parse_index,
    parse_manifest,
    recorded_last_version,
    write_json_atomic,
)
from quiver.adapters.s3_url import parse_s3_url
from quiver.errors import NotFound

log = logging.getLogger(__name__)

RESERVED = ".reserved"
_STAGING = ".staging"
_DOWNLOADING = ".downloading"
_TRASH = ".trash"
_CORRUPT = ".corrupt"  # <prefix>/.corrupt/<name>@<version>/<files>: unreadable versions, moved aside at start
_S3_ERRORS = (BotoCoreError, ClientError, Boto3Error)
# Conflicts are between a handful of replicas, each retrying at once: these bounds are never reached
# unless the endpoint answers every conditional write with a conflict.
# Hand-written on purpose: botocore's retries (retries={"mode": "standard"} below) cover throttling and 5xx,
# not a 409/412 lost race, which must re-read the index and recompute the write before trying again.
_CAS_ATTEMPTS = 20
_RESERVE_ATTEMPTS = 1000
_DELETE_BATCH = 1000  # DeleteObjects' limit


def s3_client(endpoint_url: str | None, addressing_style: str | None):
    """The one S3 client configuration (the adapter store's and the fine-tuning records')."""
    if addressing_style is None and endpoint_url:
        # Most S3-compatible servers (MinIO, Ceph) are reached by path: virtual hosts need wildcard DNS.
        addressing_style = "path"
    config = Config(
        retries={"mode": "standard"},
        # botocore ≥ 1.36 sends CRC checksums on every put by default; several S3-compatible servers
        # reject them. Only what an operation requires (DeleteObjects) is sent.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"addressing_style": addressing_style} if addressing_style else None,
        connect_timeout=10,
        read_timeout=60,
    )
    # A session of our own: boto3's default session is not thread-safe to create clients from.
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


def _status(exc: ClientError) -> int:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)


def _conflict(exc: ClientError) -> bool:
    # 412: the condition failed (someone else wrote first); 409: a concurrent conditional write is in
    # progress on the same key (AWS asks to retry).
    return _status(exc) in (409, 412)


def _not_found(exc: ClientError) -> bool:
    return _status(exc) == 404 or exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404")


@dataclass
class _Listed:
    """One adapter's objects as a listing shows them."""

    index_etag: str | None = None
    manifests: dict[int, str] = field(default_factory=dict)  # version -> the manifest's ETag
    numbers: set[int] = field(default_factory=set)  # every version folder, reserved or committed
    documents: dict[str, str] = field(default_factory=dict)  # `<name>/<key>` documents -> ETag (canary.json, ...)


class S3AdapterStore(AdapterStore):
    def __init__(
        self,
        url: str,
        cache_dir: Path,
        endpoint_url: str | None = None,
        addressing_style: str | None = None,
    ) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        self.cache_dir = cache_dir
        self.endpoint_url = endpoint_url
        self._base = f"{self.prefix}/" if self.prefix else ""
        self._client = s3_client(endpoint_url, addressing_style)
        self._lock = threading.Lock()  # scans and commits: a scan never prunes a version committed meanwhile
        self._pending: set[tuple[str, int]] = set()  # placed in the cache, not committed yet
        self._parsed: dict[str, tuple[str, object]] = {}  # key -> (ETag, parsed manifest or index)
        self._verified: dict[tuple[str, int], AdapterVersion] = {}  # cached folders known to match the bucket
        self._documents: dict[tuple[str, str], str] = {}  # (name, key) -> ETag of a top-level document, last scan

    @property
    def location(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}"
        return f"{where} at {self.endpoint_url}" if self.endpoint_url else where

    # --- keys, errors ------------------------------------------------------------------------------

    def _key(self, name: str, *rest: object) -> str:
        return self._base + "/".join([name, *map(str, rest)])

    @contextmanager
    def _reaching(self, doing: str) -> Iterator[None]:
        try:
            yield
        except _S3_ERRORS as exc:
            # The details (bucket, error code) go to the log; clients only learn the store is unavailable.
            log.warning("adapter store %s: %s failed: %s", self.location, doing, exc)
            raise StoreUnavailable("the adapter store is not reachable; try again shortly") from exc

    def _get(self, key: str) -> tuple[bytes, str] | None:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _not_found(exc):
                return None
            raise
        return response["Body"].read(), response["ETag"]

    def _list(self, name: str = "") -> dict[str, _Listed]:
        prefix = self._base + (f"{name}/" if name else "")
        listing: dict[str, _Listed] = {}
        for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", ()):
                parts = item["Key"][len(self._base):].split("/")
                if len(parts) < 2 or not parts[0] or parts[0].startswith("."):
                    continue
                listed = listing.setdefault(parts[0], _Listed())
                if parts[1:] == [INDEX]:
                    listed.index_etag = item["ETag"]
                elif len(parts) == 2:
                    listed.documents[parts[1]] = item["ETag"]
                elif len(parts) == 3 and parts[1].isdigit():
                    version = int(parts[1])
                    listed.numbers.add(version)
                    if parts[2] == MANIFEST:
                        listed.manifests[version] = item["ETag"]
        return listing

    def _delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = [{"Key": key} for key in keys[start:start + _DELETE_BATCH]]
            response = self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            if response.get("Errors"):
                first = response["Errors"][0]
                raise StoreUnavailable(f"could not delete {first.get('Key')}: {first.get('Code')}")

    # --- the interface -----------------------------------------------------------------------------

    def prepare(self) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for leftovers in (_STAGING, _DOWNLOADING, _TRASH):
            shutil.rmtree(self.cache_dir / leftovers, ignore_errors=True)
            (self.cache_dir / leftovers).mkdir()
        with self._reaching(f"opening bucket {self.bucket}"):
            self._client.head_bucket(Bucket=self.bucket)
        with self._reaching("sweeping the store"):
            self._sweep()

    def _sweep(self) -> None:
        """As the local store's: versions never committed (files but no manifest, older than the grace
        period) are deleted; versions whose manifest is unreadable are moved under .corrupt/; each with a log
        line. `.reserved` stays, so the number is never given out again."""
        now = time.time()
        folders: dict[tuple[str, int], list[dict]] = {}
        for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._base):
            for item in page.get("Contents", ()):
                parts = item["Key"][len(self._base):].split("/")
                if len(parts) == 3 and parts[0] and not parts[0].startswith(".") and parts[1].isdigit():
                    folders.setdefault((parts[0], int(parts[1])), []).append(item)
        for (name, version), items in sorted(folders.items()):
            files = [item for item in items if not item["Key"].endswith("/" + RESERVED)]
            manifest = next((item for item in files if item["Key"].endswith("/" + MANIFEST)), None)
            if not files:
                continue
            if manifest is None:
                if max(item["LastModified"].timestamp() for item in files) > now - UNCOMMITTED_GRACE_S:
                    continue
                self._keep_number(name, version)
                log.warning("store: removing %s@%d, staged by a registration that never finished", name, version)
                self._delete([item["Key"] for item in files])
                continue
            got = self._get(manifest["Key"])
            if got is None or parse_manifest(got[0], name, version) is not None:
                continue
            self._keep_number(name, version)
            aside = f"{self._base}{_CORRUPT}/{name}@{version}.{uuid.uuid4().hex[:8]}/"
            for item in files:
                self._client.copy_object(Bucket=self.bucket, Key=aside + item["Key"].rsplit("/", 1)[1],
                                         CopySource={"Bucket": self.bucket, "Key": item["Key"]})
            # The manifest first: the version is un-committed before its files go.
            self._client.delete_object(Bucket=self.bucket, Key=manifest["Key"])
            self._delete([item["Key"] for item in files if item is not manifest])
            log.warning("store: %s@%d has an unreadable manifest; moved aside to s3://%s/%s",
                        name, version, self.bucket, aside)

    def _keep_number(self, name: str, version: int) -> None:
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(name, version, RESERVED), Body=b"",
                                    IfNoneMatch="*")
        except ClientError as exc:
            if not _conflict(exc):
                raise

    def new_staging_dir(self) -> Path:
        path = self.cache_dir / _STAGING / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path

    def cache_path(self, name: str, version: int) -> Path:
        return self.cache_dir / name / str(version)

    def scan(self) -> dict[str, StoredAdapter]:
        with self._lock, self._reaching("reading the store"):
            listing = self._list()
            adapters: dict[str, StoredAdapter] = {}
            for name, listed in sorted(listing.items()):
                versions = {}
                for version, etag in listed.manifests.items():
                    record = self._parsed_object(self._key(name, version, MANIFEST), etag,
                                                 lambda raw, n=name, v=version: parse_manifest(raw, n, v))
                    if record is not None:
                        versions[version] = record
                index = {}
                if versions and listed.index_etag:
                    index = self._parsed_object(self._key(name, INDEX), listed.index_etag, parse_index) or {}
                adapter = assemble(name, versions, index)
                if adapter is not None:
                    adapters[name] = adapter
            self._documents = {(name, key): etag for name, listed in listing.items()
                               for key, etag in listed.documents.items()}
            self._forget_unlisted(listing)
            self._prune_cache(adapters)
            return adapters

    def _parsed_object(self, key: str, etag: str, parse: Callable[[bytes], object]):
        """Manifests are immutable and index.json changes rarely: each is read again only when its ETag
        changes, so a steady-state scan is one LIST request per 1000 objects."""
        cached = self._parsed.get(key)
        if cached is not None and cached[0] == etag:
            return cached[1]
        got = self._get(key)
        if got is None:  # deleted since the listing
            return None
        raw, etag = got
        parsed = parse(raw)
        self._parsed[key] = (etag, parsed)
        return parsed

    def _forget_unlisted(self, listing: dict[str, _Listed]) -> None:
        present = {self._key(name, INDEX) for name in listing} | {
            self._key(name, version, MANIFEST) for name, listed in listing.items() for version in listed.manifests
        } | {self._key(name, key) for name, listed in listing.items() for key in listed.documents}
        for key in set(self._parsed) - present:
            del self._parsed[key]

    def _prune_cache(self, adapters: dict[str, StoredAdapter]) -> None:
        """Remove cached folders of versions deleted elsewhere (the registry has stopped serving them) and
        of versions whose manifest differs from the bucket's."""
        for name_dir in self.cache_dir.iterdir():
            if name_dir.name.startswith(".") or not name_dir.is_dir():
                continue
            kept = adapters[name_dir.name].versions if name_dir.name in adapters else {}
            for version_dir in name_dir.iterdir():
                key = (name_dir.name, int(version_dir.name)) if version_dir.name.isdigit() else None
                if key in self._pending or (key is not None and self._matches(version_dir, kept.get(key[1]))):
                    continue
                self._verified.pop(key, None)
                discard(version_dir, self.cache_dir / _TRASH)
            try:
                name_dir.rmdir()
            except OSError:
                pass  # still holds versions

    def _matches(self, folder: Path, record: AdapterVersion | None) -> bool:
        if record is None:
            return False
        key = (record.name, record.version)
        if self._verified.get(key) is record:  # the same parsed manifest (same ETag) as last time
            return True
        try:
            cached = parse_manifest((folder / MANIFEST).read_bytes(), record.name, record.version)
        except OSError:
            return False
        # The gate's result is the one field a committed manifest may change (a suite run again): the files are not.
        if cached is None or cached.model_copy(update={"gate": record.gate}) != record:
            log.warning("cached %s does not match the adapter store; dropping it", record.id)
            return False
        self._verified[key] = record
        return True

    def _read_index(self, name: str) -> tuple[dict, str | None]:
        got = self._get(self._key(name, INDEX))
        return (parse_index(got[0]), got[1]) if got is not None else ({}, None)

    def _update_index(self, name: str, change: Callable[[dict], dict]) -> None:
        """Read-modify-write of index.json with compare-and-swap: a concurrent update is retried, not lost."""
        for _ in range(_CAS_ATTEMPTS):
            index, etag = self._read_index(name)
            condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
            try:
                self._client.put_object(Bucket=self.bucket, Key=self._key(name, INDEX),
                                        Body=json.dumps(change(index), indent=2).encode(),
                                        ContentType="application/json", **condition)
                return
            except ClientError as exc:
                if not _conflict(exc):
                    raise
        raise StoreUnavailable(f"index.json of `{name}` kept changing under us; try again")

    def set_current(self, name: str, current: int | None) -> None:
        with self._reaching(f"updating {name}/{INDEX}"):
            self._update_index(name, lambda index: {"current": current,
                                                    "last_version": recorded_last_version(index)})

    def reserve_version(self, name: str) -> int:
        with self._reaching(f"reserving a version of {name}"):
            listed = self._list(name).get(name, _Listed())
            index, _ = self._read_index(name)
            version = max([recorded_last_version(index), *listed.numbers]) + 1
            for _ in range(_RESERVE_ATTEMPTS):
                try:
                    self._client.put_object(Bucket=self.bucket, Key=self._key(name, version, RESERVED), Body=b"",
                                            IfNoneMatch="*")
                    break
                except ClientError as exc:
                    if not _conflict(exc):
                        raise
                    version += 1  # another replica has it
            else:
                raise StoreUnavailable(f"could not reserve a version of `{name}`")
            self._update_index(name, lambda index: {"current": index.get("current"),
                                                    "last_version": max(version, recorded_last_version(index))})
        return version

    def place_version(self, staged: Path, name: str, version: int) -> Path:
        with self._lock:
            self._pending.add((name, version))
        uploaded: list[str] = []
        try:
            with self._reaching(f"uploading {name}@{version}"):
                for path in sorted(p for p in staged.iterdir() if p.is_file()):
                    key = self._key(name, version, path.name)
                    self._client.upload_file(str(path), self.bucket, key)  # multipart when large
                    uploaded.append(key)
        except StoreUnavailable:
            with self._lock:
                self._pending.discard((name, version))
            try:
                self._delete(uploaded)
            except (StoreUnavailable, *_S3_ERRORS):
                log.warning("could not remove the partial upload of %s@%d (it stays invisible)", name, version)
            raise
        # The staged files are exactly what was uploaded: they become the cached copy, no download needed.
        target = self.cache_path(name, version)
        target.parent.mkdir(parents=True, exist_ok=True)
        discard(target, self.cache_dir / _TRASH)
        os.replace(staged, target)
        return target

    def commit_version(self, record: AdapterVersion) -> None:
        with self._lock, self._reaching(f"committing {record.id}"):
            self._client.put_object(Bucket=self.bucket, Key=self._key(record.name, record.version, MANIFEST),
                                    Body=json.dumps(record.model_dump(mode="json"), indent=2).encode(),
                                    ContentType="application/json")
            cached = self.cache_path(record.name, record.version)
            if cached.is_dir():
                # The cached copy carries its manifest too: later scans check the copy against it.
                write_json_atomic(cached / MANIFEST, record.model_dump(mode="json"))
            self._pending.discard((record.name, record.version))

    def local_path(self, name: str, version: int) -> Path:
        target = self.cache_path(name, version)
        if target.is_dir():
            return target  # versions are immutable: a cached copy is always the right one
        with self._reaching(f"reading {name}@{version}"):
            got = self._get(self._key(name, version, MANIFEST))
        if got is None:
            raise NotFound(f"`{name}@{version}` is no longer in the adapter store", code="model_not_found",
                           param="model")
        record = parse_manifest(got[0], name, version)
        if record is None or any(_unsafe_file_name(f.name) for f in record.files):
            raise StoreUnavailable(f"the manifest of `{name}@{version}` in the adapter store is damaged")
        download = self.cache_dir / _DOWNLOADING / uuid.uuid4().hex
        download.mkdir(parents=True)
        try:
            with self._reaching(f"downloading {name}@{version}"):
                for stored in record.files:
                    path = download / stored.name
                    self._client.download_file(self.bucket, self._key(name, version, stored.name), str(path))
                    if path.stat().st_size != stored.bytes or file_sha256(path) != stored.sha256:
                        log.warning("%s@%d: %s differs from its manifest", name, version, stored.name)
                        raise StoreUnavailable(f"`{name}@{version}` in the adapter store is damaged")
            (download / MANIFEST).write_bytes(got[0])
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(download, target)  # whole or not at all: the engine never sees a partial folder
            except OSError:
                if not target.is_dir():
                    raise
                # another download of the same version won; its files are the same
        finally:
            shutil.rmtree(download, ignore_errors=True)
        return target

    def read_document(self, name: str, key: str) -> bytes | None:
        with self._reaching(f"reading {name}/{key}"):
            found = self._get(self._key(name, key))
        return None if found is None else found[0]

    def write_document(self, name: str, key: str, data: bytes) -> None:
        with self._reaching(f"writing {name}/{key}"):  # a put is atomic: readers see the old or the new object
            self._client.put_object(Bucket=self.bucket, Key=self._key(name, key), Body=data,
                                    ContentType="application/json")

    def read_documents(self, names: list[str], key: str) -> dict[str, bytes]:
        """From the last scan's listing: a name without the document costs no request, and one whose document
        kept its ETag is served from memory; only new or changed ones are read (one GET each)."""
        found: dict[str, bytes] = {}
        with self._reaching(f"reading the {key} documents"):
            for name in names:
                etag = self._documents.get((name, key))
                raw = None if etag is None else self._parsed_object(self._key(name, key), etag, lambda data: data)
                if raw is not None:
                    found[name] = raw
        return found

    def remove_version(self, name: str, version: int) -> None:
        with self._reaching(f"deleting {name}@{version}"):
            # Un-commit first, so a failure mid-delete cannot leave a half-present version.
            self._client.delete_object(Bucket=self.bucket, Key=self._key(name, version, MANIFEST))
            folder = self._key(name, version) + "/"
            keys = [
                item["Key"]
                for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=folder)
                for item in page.get("Contents", ())
                if item["Key"] != folder + RESERVED  # the claim on the number stays
            ]
            self._delete(keys)
        with self._lock:
            self._pending.discard((name, version))
        discard(self.cache_path(name, version), self.cache_dir / _TRASH)


def _unsafe_file_name(name: str) -> bool:
    return name != PurePosixPath(name).name or name.startswith(".") or name in ("", MANIFEST)
