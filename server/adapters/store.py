"""The adapter store, the registry's source of truth, behind one interface with two backends.

`LocalAdapterStore` (the default) keeps everything in plain files:

    <store>/<name>/index.json         {"current": N, "last_version": M}; outlives its versions, so a
                                      version number is never given out twice
    <store>/<name>/<version>/         adapter files + manifest.json
    <store>/.staging/                 uploads being checked
    <store>/.corrupt/                 version folders whose manifest could not be read, moved aside at start

`quiver.adapters.s3_store.S3AdapterStore` keeps the same layout as objects in an S3-compatible bucket,
with a local cache per replica (the engine can only load adapters from a local folder).

For both, a version exists once its manifest.json does: the manifest is written last, atomically, so a
crash at any point leaves either a whole version or leftovers that scans ignore. Versions are immutable.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from quiver.adapters.protocol import AdapterVersion
from quiver.common.files import file_sha256, write_bytes_atomic, write_json_atomic  # noqa: F401  (re-exported for the stores)
from quiver.errors import Unavailable
from quiver.limits import loads_bounded

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
INDEX = "index.json"
_STAGING = ".staging"
_TRASH = ".trash"
_CORRUPT = ".corrupt"
# A version folder without a manifest older than this was staged by a registration that never finished (a
# crash, a kill): swept at start. Younger ones may be a registration in progress on another replica.
UNCOMMITTED_GRACE_S = 15 * 60


class StoreUnavailable(Unavailable):
    """The store could not be read or written (network, permissions, a corrupt object)."""

    code = "store_unavailable"


def parse_manifest(raw: bytes, name: str, version: int) -> AdapterVersion | None:
    """A version's record, or None when its manifest is unreadable or belongs elsewhere.

    A bad manifest hides that one version (with a warning) instead of failing the whole scan, so one
    damaged object cannot take every adapter offline on every replica.
    """
    try:
        record = AdapterVersion.model_validate_json(raw)
    except ValidationError as exc:
        log.warning("ignoring %s@%d: its manifest is not valid (%s)", name, version, exc.errors()[0]["msg"])
        return None
    if (record.name, record.version) != (name, version):
        log.warning("ignoring %s@%d: its manifest describes %s", name, version, record.id)
        return None
    return record


def parse_index(raw: bytes) -> dict:
    try:
        index = loads_bounded(raw)
    except ValueError:
        return {}
    return index if isinstance(index, dict) else {}


def recorded_last_version(index: dict) -> int:
    value = index.get("last_version", 0)
    return value if isinstance(value, int) else 0


@dataclass
class StoredAdapter:
    name: str
    current: int | None  # None: the bare name serves nothing until a version is promoted
    versions: dict[int, AdapterVersion] = field(default_factory=dict)


def assemble(name: str, versions: dict[int, AdapterVersion], index: dict) -> StoredAdapter | None:
    if not versions:
        return None
    if "current" not in index:
        # No readable index at all (written by hand, or lost): the newest version, as before indexes existed.
        return StoredAdapter(name, max(versions), versions)
    current = index["current"]
    # The index says which version is current, or that none is: a gone or missing one is never replaced.
    return StoredAdapter(name, current if current in versions else None, versions)


class AdapterStore(ABC):
    """What the registry needs from a store; it never knows which backend it has.

    Blocking calls (the registry runs the slow ones in a thread). Registering is
    `reserve_version` → `place_version` → `commit_version`; until the commit the version is invisible.
    """

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the store is, for logs (never credentials)."""

    @abstractmethod
    def prepare(self) -> None:
        """Check the store is usable and sweep what an interrupted run left behind."""

    @abstractmethod
    def new_staging_dir(self) -> Path:
        """An empty local folder for an upload being checked."""

    @abstractmethod
    def scan(self) -> dict[str, StoredAdapter]:
        """Every committed version; unreadable ones are left out."""

    @abstractmethod
    def reserve_version(self, name: str) -> int:
        """A version number no other caller, in this process or any replica, is given."""

    @abstractmethod
    def place_version(self, staged: Path, name: str, version: int) -> Path:
        """Store checked files as `version` (consumes `staged`); not registered until `commit_version`."""

    @abstractmethod
    def commit_version(self, record: AdapterVersion) -> None: ...

    @abstractmethod
    def local_path(self, name: str, version: int) -> Path:
        """A local folder with the version's files, for the engine to load from."""

    @abstractmethod
    def set_current(self, name: str, current: int | None) -> None: ...

    @abstractmethod
    def remove_version(self, name: str, version: int) -> None:
        """Un-commit (manifest first), then remove the files; the number is never given out again."""

    def remove_all_versions(self, name: str, versions: list[int]) -> None:
        for version in versions:
            self.remove_version(name, version)
        self.set_current(name, None)

    # Small documents kept beside a name's versions, outside any version folder (scans ignore them): the
    # name's canary record (`canary.json`), its suite (`suite.json`, `suites/<n>.json`) and the reports of its
    # versions (`reports/<version>.json`). `key` is always built by quiver, never taken from a caller.

    @abstractmethod
    def read_document(self, name: str, key: str) -> bytes | None:
        """The document's bytes, None if there is none."""

    @abstractmethod
    def write_document(self, name: str, key: str, data: bytes) -> None:
        """Replace the document in one step (readers see the old or the new bytes)."""

    def read_documents(self, names: list[str], key: str) -> dict[str, bytes]:
        """`key`'s document of each name that has one, as of the last `scan` (a store poll reads every name's
        canary record this way: a remote store reads only those that changed)."""
        found = {name: self.read_document(name, key) for name in names}
        return {name: raw for name, raw in found.items() if raw is not None}


class LocalAdapterStore(AdapterStore):
    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def location(self) -> str:
        return str(self.root)

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for leftovers in (self.root / _STAGING, self.root / _TRASH):
            shutil.rmtree(leftovers, ignore_errors=True)
            leftovers.mkdir()
        self._sweep()

    def _sweep(self) -> None:
        """At start: version folders never committed (older than the grace period) are removed, those whose
        manifest is unreadable are moved to .corrupt/ for an operator to look at; each with a log line.
        Either way the number stays used (index.json's last_version), so it is never given out again."""
        for adapter_dir in sorted(self.root.iterdir()):
            if adapter_dir.name.startswith(".") or not adapter_dir.is_dir():
                continue
            name = adapter_dir.name
            for version_dir in sorted(adapter_dir.iterdir()):
                if not (version_dir.is_dir() and version_dir.name.isdigit()):
                    continue
                version = int(version_dir.name)
                manifest = version_dir / MANIFEST
                if not manifest.is_file():
                    if time.time() - version_dir.stat().st_mtime < UNCOMMITTED_GRACE_S:
                        continue
                    self._keep_number(name, version)
                    log.warning("store: removing %s@%d, staged by a registration that never finished", name, version)
                    discard(version_dir, self.root / _TRASH)
                elif parse_manifest(manifest.read_bytes(), name, version) is None:
                    self._keep_number(name, version)
                    aside = self.root / _CORRUPT / f"{name}@{version}.{uuid.uuid4().hex[:8]}"
                    aside.parent.mkdir(exist_ok=True)
                    os.replace(version_dir, aside)
                    log.warning("store: %s@%d has an unreadable manifest; moved aside to %s", name, version, aside)

    def _keep_number(self, name: str, version: int) -> None:
        index = self._read_index(name)
        if recorded_last_version(index) < version:
            self._write_index(name, index.get("current"), version)

    def new_staging_dir(self) -> Path:
        path = self.root / _STAGING / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path

    def version_dir(self, name: str, version: int) -> Path:
        return self.root / name / str(version)

    def local_path(self, name: str, version: int) -> Path:
        return self.version_dir(name, version)

    def scan(self) -> dict[str, StoredAdapter]:
        adapters: dict[str, StoredAdapter] = {}
        for adapter_dir in sorted(self.root.iterdir()) if self.root.is_dir() else ():
            if adapter_dir.name.startswith(".") or not adapter_dir.is_dir():
                continue
            adapter = self._scan_adapter(adapter_dir)
            if adapter is not None:
                adapters[adapter.name] = adapter
        return adapters

    def _scan_adapter(self, adapter_dir: Path) -> StoredAdapter | None:
        versions: dict[int, AdapterVersion] = {}
        for version_dir in adapter_dir.iterdir():
            if not (version_dir.is_dir() and version_dir.name.isdigit()):
                continue
            manifest = version_dir / MANIFEST
            if manifest.is_file():
                record = parse_manifest(manifest.read_bytes(), adapter_dir.name, int(version_dir.name))
                if record is not None:
                    versions[record.version] = record
        return assemble(adapter_dir.name, versions, self._read_index(adapter_dir.name))

    def _read_index(self, name: str) -> dict:
        try:
            return parse_index((self.root / name / INDEX).read_bytes())
        except OSError:
            return {}

    def _write_index(self, name: str, current: int | None, last_version: int) -> None:
        (self.root / name).mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.root / name / INDEX, {"current": current, "last_version": last_version})

    def set_current(self, name: str, current: int | None) -> None:
        self._write_index(name, current, self._last_version(name))

    def _last_version(self, name: str) -> int:
        on_disk = [int(p.name) for p in (self.root / name).glob("[0-9]*") if p.name.isdigit()]
        return max([recorded_last_version(self._read_index(name)), *on_disk])

    def reserve_version(self, name: str) -> int:
        (self.root / name).mkdir(parents=True, exist_ok=True)
        version = self._last_version(name) + 1
        while True:
            try:
                # mkdir is atomic (on NFS too): of replicas racing for a number, exactly one creates it.
                self.version_dir(name, version).mkdir()
                break
            except FileExistsError:
                version += 1
        index = self._read_index(name)
        self._write_index(name, index.get("current"), max(version, recorded_last_version(index)))
        return version

    def place_version(self, staged: Path, name: str, version: int) -> Path:
        target = self.version_dir(name, version)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, target)  # onto the empty folder `reserve_version` made: one atomic rename
        return target

    def commit_version(self, record: AdapterVersion) -> None:
        write_json_atomic(self.version_dir(record.name, record.version) / MANIFEST, record.model_dump(mode="json"))

    def read_document(self, name: str, key: str) -> bytes | None:
        try:
            return (self.root / name / key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def write_document(self, name: str, key: str, data: bytes) -> None:
        path = self.root / name / key
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, data)

    def remove_version(self, name: str, version: int) -> None:
        folder = self.version_dir(name, version)
        # Un-commit first, so a crash mid-delete cannot leave a half-present version.
        (folder / MANIFEST).unlink(missing_ok=True)
        discard(folder, self.root / _TRASH)


def discard(folder: Path, trash_root: Path) -> None:
    """Remove a folder so that it is gone in one step, whatever happens to the slow part."""
    if not folder.exists():
        return
    trash = trash_root / uuid.uuid4().hex
    trash.parent.mkdir(parents=True, exist_ok=True)
    os.replace(folder, trash)  # atomic: gone from its place in one step
    shutil.rmtree(trash, ignore_errors=True)
