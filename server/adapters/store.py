"""The adapter store on disk, the registry's source of truth.

    <store>/<name>/index.json         {"current": N, "last_version": M}; outlives its versions, so a
                                      version number is never given out twice
    <store>/<name>/<version>/         adapter files + manifest.json
    <store>/.staging/                 uploads being checked

A version exists once its manifest.json does: the manifest is written last, atomically, so a crash at
any point leaves either a whole version or a folder that the next start sweeps away. Everything here is
plain files, so the same layout works on a shared volume for many replicas.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from server.adapters.protocol import AdapterVersion

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
INDEX = "index.json"
_STAGING = ".staging"
_TRASH = ".trash"


def write_json_atomic(path: Path, payload: object) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as file:
        json.dump(payload, file, indent=2)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


@dataclass
class StoredAdapter:
    name: str
    current: int
    versions: dict[int, AdapterVersion] = field(default_factory=dict)


class AdapterStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def prepare(self) -> None:
        """Create the folders and sweep what an interrupted run left behind."""
        self.root.mkdir(parents=True, exist_ok=True)
        for leftovers in (self.root / _STAGING, self.root / _TRASH):
            shutil.rmtree(leftovers, ignore_errors=True)
            leftovers.mkdir()

    def new_staging_dir(self) -> Path:
        path = self.root / _STAGING / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path

    def version_dir(self, name: str, version: int) -> Path:
        return self.root / name / str(version)

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
                versions[int(version_dir.name)] = AdapterVersion.model_validate_json(manifest.read_bytes())
        if not versions:
            return None
        current = self._read_index(adapter_dir.name).get("current")
        if current not in versions:
            current = max(versions)
        return StoredAdapter(adapter_dir.name, current, versions)

    def _read_index(self, name: str) -> dict:
        try:
            index = json.loads((self.root / name / INDEX).read_text())
            return index if isinstance(index, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write_index(self, name: str, current: int | None, last_version: int) -> None:
        (self.root / name).mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.root / name / INDEX, {"current": current, "last_version": last_version})

    def set_current(self, name: str, current: int | None) -> None:
        self._write_index(name, current, self._last_version(name))

    def _last_version(self, name: str) -> int:
        on_disk = [int(p.name) for p in (self.root / name).glob("[0-9]*") if p.name.isdigit()]
        recorded = self._read_index(name).get("last_version", 0)
        return max([recorded if isinstance(recorded, int) else 0, *on_disk])

    def reserve_version(self, name: str) -> int:
        version = self._last_version(name) + 1
        self._write_index(name, self._read_index(name).get("current"), version)
        return version

    def place_version(self, staged: Path, name: str, version: int) -> Path:
        """Move checked files into their version folder; not a registered version until `commit_version`."""
        target = self.version_dir(name, version)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, target)
        return target

    def commit_version(self, record: AdapterVersion) -> None:
        write_json_atomic(self.version_dir(record.name, record.version) / MANIFEST, record.model_dump(mode="json"))

    def remove_version(self, name: str, version: int) -> None:
        folder = self.version_dir(name, version)
        # Un-commit first, so a crash mid-delete cannot leave a half-present version.
        (folder / MANIFEST).unlink(missing_ok=True)
        self._discard(folder)

    def remove_all_versions(self, name: str, versions: list[int]) -> None:
        for version in versions:
            self.remove_version(name, version)
        self.set_current(name, None)

    def _discard(self, folder: Path) -> None:
        if not folder.exists():
            return
        trash = self.root / _TRASH / uuid.uuid4().hex
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.replace(folder, trash)  # atomic: gone from the store in one step
        shutil.rmtree(trash, ignore_errors=True)
