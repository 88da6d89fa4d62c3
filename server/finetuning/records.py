"""Where uploaded training files and fine-tuning job records live: beside the adapter store, shared by every
replica. A folder (on one machine, or a ReadWriteMany volume in a cluster), or an S3 bucket.

    <root>/files/<file-id>.jsonl + .json                the data and its record
    <root>/jobs/<job-id>/job.json                       the job record (compare-and-swap updates)
    <root>/jobs/<job-id>/claim.json                     which runner took the job (created once), its heartbeat
    <root>/jobs/<job-id>/{spec.json, events.jsonl, result.json, train.log}
    <root>/jobs/<job-id>/worker-events.jsonl            (in a bucket) the worker's events, published by its runner

In a bucket `<root>` is `s3://<bucket>/<adapter prefix>.finetuning`: beside the adapters' prefix, not under it,
so the adapter store's listings never page through job records. A training worker works on plain files: in a
folder it writes straight into the job's own folder; with a bucket it works in a local scratch copy
(`workspace`) that its runner publishes into the bucket while it runs and when it ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import logging
import os
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from quiver.adapters.store import StoreUnavailable
from quiver.common.files import write_bytes_atomic

log = logging.getLogger(__name__)

# A lost compare-and-swap is retried at once; only an endpoint that fails every conditional write reaches this.
_CAS_ATTEMPTS = 50
Change = Callable[[bytes | None], bytes | None]


class Records(ABC):
    """Small records and data files under relative keys (`a/b.json`; callers build keys from checked ids only)."""

    location: str
    # True: `workspace(key)` is the records' own folder, so a worker's files are in the records as it writes them.
    in_place: bool

    @abstractmethod
    def child(self, name: str) -> "Records":
        """The records under `name/`."""

    @abstractmethod
    def read(self, key: str) -> bytes | None:
        """The bytes at `key`, or None when there are none."""

    @abstractmethod
    def write(self, key: str, data: bytes) -> None:
        """Replace `key` whole, atomically: readers see the old bytes or the new, never part."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Write `key` only if it does not exist; False when it did (someone else created it first)."""

    @abstractmethod
    def update(self, key: str, change: Change) -> bytes | None:
        """Read-modify-write `key` atomically against other writers, in any process or replica: `change` gets
        the current bytes (None: absent) and returns the new ones, or None to leave them. Returns what is stored."""

    @abstractmethod
    def append(self, key: str, line: bytes) -> None:
        """Add one line at the end of `key` (concurrent appends are all kept)."""

    @abstractmethod
    def keys(self, pattern: str) -> list[str]:
        """The keys matching a glob pattern (`file-*.json`, `ftjob-*/job.json`)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key`; nothing when it is absent."""

    @abstractmethod
    def move_aside(self, key: str) -> str:
        """Keep an unreadable record out of the way, under `<key>.corrupt-<time>`; returns that name."""

    @abstractmethod
    def put_file(self, key: str, source: Path) -> None:
        """Store the local file `source` (a file of `scratch_dir`, consumed) under `key`."""

    @abstractmethod
    def local_file(self, key: str, into: Path) -> Path:
        """A local path with `key`'s bytes: the file itself in a folder, else a download into the folder `into`."""

    @property
    @abstractmethod
    def scratch_dir(self) -> Path:
        """A local folder for files being prepared (`put_file` consumes them cheaply from here)."""

    @abstractmethod
    def workspace(self, key: str) -> Path:
        """A local folder where a process works on `key/`'s records as plain files (the training worker)."""

    @abstractmethod
    def publish(self, key: str, workspace: Path, names: dict[str, str]) -> None:
        """Put the workspace's files into the records under `key/` (source name -> record name); absent ones
        are skipped."""

    @abstractmethod
    def drop_workspace(self, key: str, workspace: Path) -> None:
        """The workspace is no longer needed (a scratch copy goes; a record folder stays)."""


class LocalRecords(Records):
    """Records in a folder: atomic renames, O_EXCL creation, and flock(2) (which Linux's NFS client maps to
    NFS locks) for read-modify-write."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.location = str(self.root)
        self.in_place = True
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / key

    def child(self, name: str) -> "LocalRecords":
        return LocalRecords(self.root / name)

    def read(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, data)

    def create(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        return True

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # One lock for the folder: updates are rare and short (job state changes).
        with open(self.root / ".records.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def update(self, key: str, change: Change) -> bytes | None:
        with self._locked():
            current = self.read(key)
            new = change(current)
            if new is None:
                return current
            self.write(key, new)
            return new

    def append(self, key: str, line: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as file:  # O_APPEND: each line lands whole after the others
            file.write(line.rstrip(b"\n") + b"\n")

    def keys(self, pattern: str) -> list[str]:
        return sorted(path.relative_to(self.root).as_posix() for path in self.root.glob(pattern))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def move_aside(self, key: str) -> str:
        path = self._path(key)
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, aside)
        return aside.name

    def put_file(self, key: str, source: Path) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, path)

    def local_file(self, key: str, into: Path) -> Path:
        return self._path(key)

    @property
    def scratch_dir(self) -> Path:
        return self.root  # same file system: put_file is a rename

    def workspace(self, key: str) -> Path:
        path = self._path(key)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def publish(self, key: str, workspace: Path, names: dict[str, str]) -> None:
        pass  # the workspace is the record folder itself

    def drop_workspace(self, key: str, workspace: Path) -> None:
        pass  # the workspace is the record folder itself


class S3Records(Records):
    """Records in an S3-compatible bucket, with the adapter store's client configuration and its conditional
    writes: `If-None-Match: *` to create, `If-Match: <etag>` to update."""

    def __init__(self, client, bucket: str, prefix: str, scratch: Path) -> None:
        self._client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._scratch = scratch
        self.in_place = False
        self.location = f"s3://{bucket}/{self.prefix}"

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextlib.contextmanager
    def _reaching(self, doing: str) -> Iterator[None]:
        from quiver.adapters.s3_store import _S3_ERRORS

        try:
            yield
        except _S3_ERRORS as exc:
            log.warning("fine-tuning records %s: %s failed: %s", self.location, doing, exc)
            raise StoreUnavailable("the fine-tuning store is not reachable; try again shortly") from exc

    def child(self, name: str) -> "S3Records":
        return S3Records(self._client, self.bucket, f"{self.prefix}/{name}", self._scratch / name)

    def _get(self, key: str) -> tuple[bytes, str] | None:
        from botocore.exceptions import ClientError

        from quiver.adapters.s3_store import _not_found

        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if _not_found(exc):
                return None
            raise
        return response["Body"].read(), response["ETag"]

    def read(self, key: str) -> bytes | None:
        with self._reaching(f"reading {key}"):
            got = self._get(key)
        return got[0] if got else None

    def write(self, key: str, data: bytes) -> None:
        with self._reaching(f"writing {key}"):
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def _put_if(self, key: str, data: bytes, etag: str | None) -> bool:
        """Put `data` if `key` still has `etag` (None: is still absent); False when someone wrote first."""
        from botocore.exceptions import ClientError

        from quiver.adapters.s3_store import _conflict

        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **condition)
        except ClientError as exc:
            if _conflict(exc):
                return False
            raise
        return True

    def create(self, key: str, data: bytes) -> bool:
        with self._reaching(f"creating {key}"):
            return self._put_if(key, data, None)

    def update(self, key: str, change: Change) -> bytes | None:
        with self._reaching(f"updating {key}"):
            for _ in range(_CAS_ATTEMPTS):
                got = self._get(key)
                current, etag = got if got else (None, None)
                new = change(current)
                if new is None:
                    return current
                if self._put_if(key, new, etag):
                    return new
        raise StoreUnavailable(f"{key} kept changing under us; try again")

    def append(self, key: str, line: bytes) -> None:
        line = line.rstrip(b"\n") + b"\n"
        self.update(key, lambda current: (current or b"") + line)

    def keys(self, pattern: str) -> list[str]:
        # List from the pattern's literal start only (`ftjob-` of `ftjob-*/job.json`).
        literal = pattern.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0]
        base = self._key("")
        found = []
        with self._reaching("listing"):
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base + literal)
            for page in pages:
                for item in page.get("Contents", ()):
                    key = item["Key"][len(base):]
                    if fnmatch.fnmatchcase(key, pattern) and key.count("/") == pattern.count("/"):
                        found.append(key)
        return sorted(found)

    def delete(self, key: str) -> None:
        with self._reaching(f"deleting {key}"):
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def move_aside(self, key: str) -> str:
        aside = f"{key}.corrupt-{int(time.time())}"
        with self._reaching(f"moving {key} aside"):
            self._client.copy_object(Bucket=self.bucket, Key=self._key(aside),
                                     CopySource={"Bucket": self.bucket, "Key": self._key(key)})
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
        return aside.rsplit("/", 1)[-1]

    def put_file(self, key: str, source: Path) -> None:
        try:
            with self._reaching(f"uploading {key}"):
                self._client.upload_file(str(source), self.bucket, self._key(key))  # multipart when large
        finally:
            source.unlink(missing_ok=True)

    def local_file(self, key: str, into: Path) -> Path:
        into.mkdir(parents=True, exist_ok=True)
        target = into / key.rsplit("/", 1)[-1]
        with self._reaching(f"downloading {key}"):
            self._client.download_file(self.bucket, self._key(key), str(target))
        return target

    @property
    def scratch_dir(self) -> Path:
        self._scratch.mkdir(parents=True, exist_ok=True)
        return self._scratch

    def workspace(self, key: str) -> Path:
        path = self.scratch_dir / "workspaces" / key
        path.mkdir(parents=True, exist_ok=True)
        return path

    def publish(self, key: str, workspace: Path, names: dict[str, str]) -> None:
        for source, target in names.items():
            path = workspace / source
            if path.is_file():
                with self._reaching(f"publishing {key}/{target}"):
                    self._client.upload_file(str(path), self.bucket, self._key(f"{key}/{target}"))

    def drop_workspace(self, key: str, workspace: Path) -> None:
        shutil.rmtree(workspace, ignore_errors=True)


class RecordSettings(Protocol):
    """What `open_records` reads of the settings (`quiver.settings.Settings` has it all)."""

    store_url: str | None
    finetuning_dir: Path
    state_dir: Path
    s3_endpoint_url: str | None
    s3_addressing_style: str | None


def open_records(settings: RecordSettings) -> Records:
    """Beside the adapter store: in its bucket when `store_url` names one, else the folder `finetuning_dir`."""
    if settings.store_url:
        from quiver.adapters.s3_store import s3_client
        from quiver.adapters.s3_url import parse_s3_url

        bucket, prefix = parse_s3_url(settings.store_url)
        return S3Records(s3_client(settings.s3_endpoint_url, settings.s3_addressing_style), bucket,
                         f"{prefix}.finetuning" if prefix else ".finetuning",
                         settings.state_dir / "finetuning-scratch")
    return LocalRecords(settings.finetuning_dir)
