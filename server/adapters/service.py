"""The adapter registry: versions, routing targets, hot swap and engine loading.

Every version is loaded into the engine under its own name (`name@version`), so a request keeps the
weights it started with while a newer version becomes current, and a deleted version is unloaded only
once the requests using it have finished.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import shutil
import time
from collections import Counter
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, AsyncIterator, BinaryIO, Protocol, TypeVar

from pydantic import BaseModel

from quiver.adapters.canary import (
    CANARY_DOCUMENT,
    Canary,
    CanaryRequest,
    CanaryWatch,
    GateOverride,
    choose_version,
)
from quiver.adapters.model_id import parse_model_id
from quiver.adapters.protocol import Adapter, AdapterVersion, GateResult, Pin, StoredFile
from quiver.adapters.store import AdapterStore, StoredAdapter, file_sha256
from quiver.adapters.uploads import stage_upload
from quiver.adapters.validation import (BaseModelSpec, NameConflict, adapter_modules, check_adapter_name,
                                        unserved_modules, validate_adapter_dir)
from quiver.auth import EVERY_MODEL, ModelScope
from quiver.engine_client import AdapterAlreadyLoaded, AdapterNotFound, EngineClient, EngineRejected, EngineUnavailable
from quiver.errors import APIError, Conflict, DomainError, InvalidRequest, NotFound, StorageFull, Unavailable
from quiver.limits import loads_bounded
from quiver.metrics import Metrics

log = logging.getLogger(__name__)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)  # same filesystem: no bytes copied, and deleting the store's file keeps this one
    except OSError:
        shutil.copy2(source, target)


def engine_name(name: str, version: int) -> str:
    return f"{name}@{version}"


@dataclass(frozen=True)
class Target:
    """What a request's `model` resolved to."""

    engine_model: str  # the name the engine knows: the base's served name or `name@version`
    adapter: str | None = None
    version: int | None = None
    pinned: bool = False  # asked for as `name@N` (not the bare name)
    split: bool = False  # a canary chose between the current version and the canary (bare name, canary on)

    @property
    def label(self) -> str:
        """The `adapter` metrics label; the base model's name for base traffic (adapters can't take it)."""
        return self.adapter or self.engine_model

    @property
    def model_label(self) -> str:
        """The `model` metrics label: what was asked for, as the registry spells it (`name` or `name@N`)."""
        if self.adapter is None:
            return self.engine_model
        return self.engine_model if self.pinned else self.adapter


def storage_error(exc: OSError) -> DomainError:
    """A failed write of the store: full (507) or otherwise unwritable (503); details go to the log only."""
    log.warning("adapter store write failed: %s", exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return StorageFull("the adapter store is full: nothing was registered", code="insufficient_storage")
    return Unavailable("the adapter store cannot be written: nothing was registered", code="store_unavailable")


def model_not_found(model: str) -> NotFound:
    return NotFound(f"The model `{model}` does not exist or you do not have access to it.",
                    code="model_not_found", param="model")


def adapter_not_found(name: str) -> NotFound:
    return NotFound(f"no adapter named `{name}`", code="adapter_not_found", param="name")


def version_not_found(name: str, version: int) -> NotFound:
    return NotFound(f"`{name}` has no version {version}", code="version_not_found", param="version")


def canary_not_found(name: str) -> NotFound:
    return NotFound(f"`{name}` has no canary running", code="canary_not_found", param="name")


DocumentModel = TypeVar("DocumentModel", bound=BaseModel)


def parse_document(name: str, raw: bytes | None, model: type[DocumentModel], what: str) -> DocumentModel | None:
    """A name's stored record (its canary, its pin), or None when absent or unreadable (logged: it must not stop
    the registry)."""
    if raw is None:
        return None
    try:
        return model.model_validate(loads_bounded(raw))
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        log.warning("ignoring the %s record of %s: %s", what, name, str(exc)[:200])
        return None


def parse_canary(name: str, raw: bytes | None) -> Canary | None:
    canary = parse_document(name, raw, Canary, "canary")
    return canary if canary is not None and canary.name == name else None


def parse_pin(name: str, raw: bytes | None) -> Pin | None:
    return parse_document(name, raw, Pin, "pin")


PIN_DOCUMENT = "pin.json"  # a name's pin (`Pin`) among its store documents


SUITE_FILE = "suite.json"  # uploaded beside the adapter files: becomes the name's suite, and gates this version


class VersionGate(Protocol):
    """What the registry needs from the suites (`quiver.suites.service.SuiteService`; the arrow runs that way)."""

    def parse_upload(self, source: BinaryIO) -> Any: ...

    async def gate(self, name: str, version: int, uploaded: Any) -> GateResult | None: ...

    async def record_override(self, name: str, version: int, by: str, reason: str | None) -> None: ...


class LiveSampler(Protocol):
    """What a canary's quality trigger needs from the suites (`quiver.suites.live.LiveScorer`)."""

    async def live_suite_version(self, name: str) -> int:
        """The name's suite that will score sampled traffic; a Conflict if it has no live checks."""

    def offer(self, canary: Canary, current: int, endpoint: str, body: dict[str, Any]) -> bool:
        """Queue one split request for replay and scoring; never waits (False: the queue was full)."""


class AdapterRegistry:
    def __init__(
        self,
        store: AdapterStore,
        engine: EngineClient,
        base: BaseModelSpec,
        base_model_name: str,
        max_rank: int,
        max_upload_bytes: int,
        metrics: Metrics,
        engine_copies_dir: Path | None = None,
        max_pins: int = 0,
    ) -> None:
        self.store = store
        # The engine loads each version from a copy of its own here (hard links where possible), removed only
        # once the engine has unloaded it: vLLM may re-read an adapter's files long after loading it (a request
        # queued in the engine for a slot, after its CPU cache evicted the adapter), and deleting a version
        # removes the store's files at once. Without it, such a re-read killed the engine core (a soak found it).
        self.engine_copies_dir = engine_copies_dir
        self.engine = engine
        self.base = base
        self.base_model_name = base_model_name
        self.max_rank = max_rank
        self.max_upload_bytes = max_upload_bytes
        self.metrics = metrics
        # Pinned versions take engine slots the scheduler never hands out (QUIVER_PINNED_SLOTS, see
        # engine_plugin/pins.py): at most that many names may be pinned.
        self.max_pins = max_pins
        self._pins: dict[str, Pin] = {}  # the store's pin records, by adapter name (unpinned ones too)
        self._engine_pins: set[str] = set()  # engine names pinned in the current engine process
        self._adapters: dict[str, StoredAdapter] = {}
        self._loaded: set[str] = set()  # engine names loaded into the current engine process
        self._load_locks: dict[str, asyncio.Lock] = {}
        self._in_flight: Counter[str] = Counter()
        self._retired: set[str] = set()  # deleted versions waiting for their last request to finish
        # Two levels: a name's lock is held for the whole of a change to that name, a suite run included (its
        # current version, a comparison's reference, stays put meanwhile); the write lock only for the short
        # commit to the registry and the store, so other names never wait for a suite. Always name, then write.
        self._write_lock = asyncio.Lock()
        self._name_locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}  # name -> (lock, [holders and waiters])
        self._canaries: dict[str, Canary] = {}  # the store's canary records (ended ones too), by adapter name
        self._watches: dict[str, CanaryWatch] = {}  # this replica's error-rate windows of the active canaries
        self._rng = random.Random()
        self._rollbacks: set[asyncio.Task] = set()
        self.gate: VersionGate | None = None  # set by the app: runs a name's suite before a version can be current
        self.sampler: LiveSampler | None = None  # set by the app: scores sampled canary traffic

    # --- start-up and engine restarts --------------------------------------------------------------

    def load_store(self) -> None:
        if self.engine_copies_dir is not None:  # a new engine process will load what it needs again
            shutil.rmtree(self.engine_copies_dir, ignore_errors=True)
            self.engine_copies_dir.mkdir(parents=True, exist_ok=True)
        self.store.prepare()
        self._adapters = self.store.scan()
        self._canaries = self._read_canaries(self._adapters)
        self._pins = self._read_pins(self._adapters)
        self._update_gauge()
        log.info("registry: %d adapters from %s", len(self._adapters), self.store.location)

    async def refresh(self) -> None:
        """Adopt what other replicas sharing the store registered, promoted or deleted."""
        async with self._write_lock:
            scanned = await asyncio.to_thread(self.store.scan)
            self._canaries = await asyncio.to_thread(self._read_canaries, scanned)
            self._pins = await asyncio.to_thread(self._read_pins, scanned)
            # Windows of canaries ended or replaced by another replica are dropped.
            self._watches = {name: watch for name, watch in self._watches.items()
                             if self._canaries.get(name) == watch.canary}
            gone = [
                engine_name(name, version)
                for name, adapter in self._adapters.items()
                for version in adapter.versions
                if version not in (scanned[name].versions if name in scanned else {})
            ]
            self._adapters = scanned
            for key in gone:
                await self._retire(key)
            self._update_gauge()
        await self.sync_pins()  # another replica may have pinned or unpinned

    async def watch_store(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.refresh()
            except Exception:  # a half-copied folder on a network volume must not stop the watcher
                log.exception("reading the adapter store failed; trying again")

    async def forget_engine_state(self) -> None:
        """A new engine process knows no adapters; they are loaded again on first use, pinned ones now."""
        self._loaded.clear()
        self._engine_pins.clear()
        await self.sync_pins()

    # --- reading -----------------------------------------------------------------------------------

    def list(self, scope: ModelScope = EVERY_MODEL) -> list[Adapter]:
        return [self._describe(adapter) for adapter in self._adapters.values() if scope.allows(adapter.name)]

    def get(self, name: str) -> Adapter:
        adapter = self._adapters.get(name)
        if adapter is None:
            raise adapter_not_found(name)
        return self._describe(adapter)

    def version(self, name: str, version: int) -> AdapterVersion:
        adapter = self._adapters.get(name)
        if adapter is None:
            raise adapter_not_found(name)
        if version not in adapter.versions:
            raise version_not_found(name, version)
        return adapter.versions[version]

    def _describe(self, adapter: StoredAdapter) -> Adapter:
        versions = [
            record.model_copy(update={"current": version == adapter.current})
            for version, record in sorted(adapter.versions.items())
        ]
        pinned = self._pinned_version(adapter)
        return Adapter(id=adapter.name, name=adapter.name, current_version=adapter.current, versions=versions,
                       canary=self._canaries.get(adapter.name),
                       pin=self._pins[adapter.name] if pinned is not None else None)

    def resolve(self, model: str, scope: ModelScope = EVERY_MODEL, caller: str | None = None) -> Target:
        """`caller` (a user or session id) keeps one caller on one side of a canary; see `quiver.adapters.canary`."""
        ref = parse_model_id(model, self.base_model_name)
        if ref.is_base:
            return Target(engine_model=ref.name)
        adapter = self._adapters.get(ref.name)
        # Another tenant's adapter is refused exactly like one that does not exist: its name must not leak.
        if adapter is None or not scope.allows(ref.name):
            raise model_not_found(model)
        # A bare name without a current version (it was deleted, or none was ever made current) serves nothing.
        version = adapter.current if ref.version is None else ref.version
        if version is None or version not in adapter.versions:
            raise model_not_found(model)
        canary = self._active_canary(adapter) if ref.version is None else None  # a pin is never split
        if canary is not None:
            version = choose_version(canary, version, caller, self._rng)
        return Target(engine_model=engine_name(ref.name, version), adapter=ref.name, version=version,
                      pinned=ref.version is not None, split=canary is not None)

    # --- serving -----------------------------------------------------------------------------------

    @asynccontextmanager
    async def lease(self, target: Target) -> AsyncIterator[None]:
        """Hold a version in the engine for the whole of one request (streams included)."""
        if target.adapter is None:
            yield
            return
        key = target.engine_model
        self._in_flight[key] += 1
        try:
            # Since `resolve`, the request may have waited for a slot while its version was deleted: loading
            # it now would put it back into the engine with nothing left to unload it.
            adapter = self._adapters.get(target.adapter)
            if adapter is None or target.version not in adapter.versions:
                raise model_not_found(key)
            await self._ensure_loaded(target.adapter, target.version)  # type: ignore[arg-type]
            yield
        finally:
            self._in_flight[key] -= 1
            if self._in_flight[key] <= 0:
                del self._in_flight[key]
                if key in self._retired:
                    await self._unload(key)

    async def _ensure_loaded(self, name: str, version: int) -> None:
        key = engine_name(name, version)
        if key in self._loaded:
            return
        lock = self._load_locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key in self._loaded:
                return
            await self._load(name, version)

    async def _load(self, name: str, version: int) -> None:
        key = engine_name(name, version)
        # Off the event loop: a remote store may first have to download the version.
        path = await asyncio.to_thread(self._engine_copy, name, version)
        if self.base.served_modules is not None:
            # Registered before this server's lora_target_modules left some of its layers out: vLLM would load
            # it without them and answer as another model.
            unserved = unserved_modules(await asyncio.to_thread(adapter_modules, path), self.base)
            if unserved:
                raise InvalidRequest(
                    f"adapter {key} trains {', '.join(unserved)}, which this server applies no LoRA to "
                    f"(lora_target_modules: {', '.join(sorted(self.base.served_modules))}); it cannot be served "
                    "here", code="target_module_not_served", param="model")
        try:
            await self.engine.load_adapter(key, path)
        except AdapterAlreadyLoaded:
            pass  # the engine still has it (e.g. its unload failed): the same immutable files, nothing to do
        except EngineUnavailable:
            raise Unavailable("the engine is not reachable; try again shortly", code="engine_unavailable") from None
        except (AdapterNotFound, EngineRejected) as exc:
            status = exc.status if isinstance(exc, EngineRejected) else 404
            refusal = InvalidRequest if status < 500 else Unavailable
            raise refusal(f"the engine refused adapter {key}: {exc}", code="engine_rejected", param="files") from None
        self._loaded.add(key)
        self.metrics.adapter_loads.labels(adapter=name).inc()

    async def _unload(self, key: str) -> None:
        self._retired.discard(key)
        self._load_locks.pop(key, None)
        if key in self._engine_pins:
            # vLLM's unload drops the name but not the worker's pin: unpinned first, or the slot stays taken.
            await self._engine_unpin(key)
        if key in self._loaded:
            self._loaded.discard(key)
            try:
                await self.engine.unload_adapter(key)
            except AdapterNotFound:
                pass  # a restarted engine never had it
            except (EngineUnavailable, EngineRejected):
                log.warning("could not unload %s from the engine (it may be restarting)", key)
        if self.engine_copies_dir is not None:
            await asyncio.to_thread(shutil.rmtree, self.engine_copies_dir / key, True)
        self.metrics.forget_version(key)

    def _engine_copy(self, name: str, version: int) -> Path:
        """The folder the engine loads `name@version` from (see `engine_copies_dir`)."""
        source = self.store.local_path(name, version)  # a remote store may first download the version
        if self.engine_copies_dir is None:
            return source
        target = self.engine_copies_dir / engine_name(name, version)
        if target.is_dir():
            return target  # versions are immutable
        partial = self.engine_copies_dir / f".{target.name}.{os.getpid()}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            shutil.copytree(source, partial, copy_function=_link_or_copy)
            os.replace(partial, target)
        except OSError as exc:
            shutil.rmtree(partial, ignore_errors=True)
            log.warning("could not copy %s for the engine: %s", target.name, exc)
            raise Unavailable(f"`{target.name}` could not be prepared for the engine; try again shortly",
                              code="store_unavailable") from None
        return target

    async def _retire(self, key: str) -> None:
        if self._in_flight.get(key):
            self._retired.add(key)
        else:
            await self._unload(key)

    # --- writing -----------------------------------------------------------------------------------

    @asynccontextmanager
    async def name_lock(self, name: str) -> AsyncIterator[None]:
        """Serialises changes to one name (see `_write_lock`); dropped once nobody holds or waits for it."""
        lock, users = self._name_locks.setdefault(name, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._name_locks[name]

    async def register(self, name: str, files: list[tuple[str, BinaryIO]], make_current: bool = True) -> AdapterVersion:
        check_adapter_name(name)
        if name == self.base_model_name:
            raise NameConflict("name_conflict", f"`{name}` is the base model's name", param="name")
        files, suite = self._take_suite(files)
        try:
            staging = self.store.new_staging_dir()
            try:
                # A suite.json inside an archive counts like a loose one.
                await asyncio.to_thread(stage_upload, files, staging, self.max_upload_bytes, (SUITE_FILE,))
                suite = await asyncio.to_thread(self._take_archived_suite, staging, suite)
                spec = await asyncio.to_thread(validate_adapter_dir, staging, self.base, self.max_rank)
                stored_files = await asyncio.to_thread(self._describe_files, staging)
                async with self.name_lock(name):
                    return await self._add_version(name, staging, spec, stored_files, make_current, suite)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        except OSError as exc:  # the disk, not the caller: nothing was committed (see _add_version)
            raise storage_error(exc) from None

    def _take_suite(self, files: list[tuple[str, BinaryIO]]) -> tuple[list[tuple[str, BinaryIO]], Any]:
        """Split an uploaded `suite.json` off the adapter files, checked before anything is staged."""
        suites = [source for filename, source in files if PurePosixPath(filename).name == SUITE_FILE]
        if not suites:
            return files, None
        if len(suites) > 1 or self.gate is None:
            raise InvalidRequest(f"upload at most one {SUITE_FILE}" if self.gate else "this server runs no suites",
                                 code="invalid_suite", param="files")
        suite = self.gate.parse_upload(suites[0])
        return [(filename, source) for filename, source in files if PurePosixPath(filename).name != SUITE_FILE], suite

    def _take_archived_suite(self, staging: Path, suite: Any) -> Any:
        path = staging / SUITE_FILE
        if not path.exists():
            return suite
        if self.gate is None:
            raise InvalidRequest("this server runs no suites", code="invalid_suite", param="files")
        try:
            with open(path, "rb") as source:
                return self.gate.parse_upload(source)
        finally:
            path.unlink()

    @staticmethod
    def _describe_files(folder: Path) -> list[StoredFile]:
        return [
            StoredFile(name=path.name, bytes=path.stat().st_size, sha256=file_sha256(path))
            for path in sorted(folder.iterdir())
        ]

    async def _add_version(self, name, staging, spec, stored_files, make_current, suite=None) -> AdapterVersion:
        """Under the name's lock (not the write lock: the suite may take minutes)."""
        # Store calls run in a thread: with a remote store they are network round trips and uploads.
        version = await asyncio.to_thread(self.store.reserve_version, name)
        record = AdapterVersion(
            id=engine_name(name, version),
            name=name,
            version=version,
            created_at=int(time.time()),
            base_model=self.base_model_name,
            rank=spec.rank,
            alpha=spec.alpha,
            target_modules=spec.target_modules,
            files=stored_files,
            size_bytes=sum(f.bytes for f in stored_files),
            warnings=spec.warnings,
        )
        await asyncio.to_thread(self.store.place_version, staging, name, version)
        try:
            # Loaded before it is committed: the engine has the last word on what it can serve.
            await self._load(name, version)
            if self.gate is not None:
                # Under the name's lock: the current version (a comparison's reference) stays put meanwhile.
                record.gate = await self.gate.gate(name, version, suite)
            async with self._write_lock:
                await asyncio.to_thread(self.store.commit_version, record)
                adapter = self._adapters.get(name)  # read now: a store poll may have replaced it meanwhile
                if adapter is None:
                    adapter = StoredAdapter(name=name, current=None)
                    self._adapters[name] = adapter
                adapter.versions[version] = record
                # Only an explicit make_current moves the name: a version registered with make_current=false is
                # never served under the bare name unless promoted (not even as the first version).
                if make_current and (record.gate is None or record.gate.passed):
                    adapter.current = version
                await asyncio.to_thread(self.store.set_current, name, adapter.current)
        except (APIError, DomainError, OSError):
            await self._unload(record.id)
            with suppress(APIError, DomainError, OSError):  # a store that failed the commit may fail this too;
                # leftovers stay invisible (no manifest) and are swept at the next start
                await asyncio.to_thread(self.store.remove_version, name, version)
            adapter = self._adapters.get(name)
            if adapter is not None and adapter.versions.get(version) is record:  # committed, then set_current failed
                del adapter.versions[version]
            raise
        self._update_gauge()
        log.info("registered %s (current: %s@%s)%s", record.id, name, adapter.current,
                 "" if record.gate is None else f", gate {record.gate.passed_cases}/{record.gate.total_cases}")
        return record.model_copy(update={"current": adapter.current == version})

    async def promote(self, name: str, version: int, override_gate: bool = False, by: str = "admin",
                      reason: str | None = None) -> Adapter:
        async with self.name_lock(name), self._write_lock:
            adapter = self._adapters.get(name)
            if adapter is None:
                raise adapter_not_found(name)
            if version not in adapter.versions:
                raise version_not_found(name, version)
            gate = adapter.versions[version].gate
            failed_gate = gate is not None and not gate.passed
            if failed_gate and not override_gate:
                raise Conflict(f"`{name}@{version}` failed its suite ({gate.passed_cases}/{gate.total_cases} cases "
                               f"passed; report: {gate.report}): promote with override_gate=true to serve it anyway",
                               code="gate_failed", param="version")
            await self._ensure_loaded(name, version)
            try:
                if failed_gate and self.gate is not None:  # recorded before it takes effect
                    await self.gate.record_override(name, version, by, reason)
                await asyncio.to_thread(self.store.set_current, name, version)
            except OSError as exc:
                raise storage_error(exc) from None
            adapter.current = version
            canary = self._canaries.get(name)
            if canary is not None and canary.active and canary.version == version:
                await self._end_canary_after(name, "promoted")  # its version is current: nothing left to split
            return self._describe(adapter)

    async def set_gate(self, name: str, version: int, gate: GateResult) -> None:
        """A suite ran again on a committed version (`SuiteService.rerun`): its manifest carries the new result."""
        async with self._write_lock:
            record = self.version(name, version).model_copy(update={"gate": gate})
            try:
                await asyncio.to_thread(self.store.commit_version, record)
            except OSError as exc:
                raise storage_error(exc) from None
            self._adapters[name].versions[version] = record

    async def delete(self, name: str, version: int | None = None) -> None:
        try:
            await self._delete(name, version)
        except OSError as exc:
            raise storage_error(exc) from None

    async def _delete(self, name: str, version: int | None) -> None:
        async with self.name_lock(name), self._write_lock:
            adapter = self._adapters.get(name)
            if adapter is None:
                raise adapter_not_found(name)
            if version is not None and version not in adapter.versions:
                raise version_not_found(name, version)
            doomed = [version] if version is not None else sorted(adapter.versions)
            # The store first: if it fails, the registry still matches it.
            if len(doomed) == len(adapter.versions):
                await asyncio.to_thread(self.store.remove_all_versions, name, doomed)
                del self._adapters[name]
            else:
                for number in doomed:
                    await asyncio.to_thread(self.store.remove_version, name, number)
                    del adapter.versions[number]
                if adapter.current not in adapter.versions:
                    # Versions mean what they say: no other version is made current behind the admin's back;
                    # the bare name is a 404 until an explicit promote (`name@N` still serves).
                    adapter.current = None
                await asyncio.to_thread(self.store.set_current, name, adapter.current)
            canary = self._canaries.get(name)
            if canary is not None and canary.active and (canary.version in doomed or name not in self._adapters
                                                         or self._adapters[name].current is None):
                await self._end_canary_after(name, "version_deleted")
            for number in doomed:
                await self._retire(engine_name(name, number))
            self._update_gauge()

    # --- pins: versions kept in an engine slot ----------------------------------------------------------

    def _read_pins(self, adapters: dict[str, StoredAdapter]) -> dict[str, Pin]:
        return self._read_documents(adapters, PIN_DOCUMENT, parse_pin)

    def _read_documents(self, adapters: dict[str, StoredAdapter], document: str, parse) -> dict:
        """Each name's readable record of one kind (canary, pin), by name: one store read for all names."""
        raw = self.store.read_documents(sorted(adapters), document)
        records = {name: parse(name, data) for name, data in raw.items()}
        return {name: record for name, record in records.items() if record is not None}

    def _pinned_version(self, adapter: StoredAdapter) -> int | None:
        """The version pinned for this name, if its record names one that still exists."""
        pin = self._pins.get(adapter.name)
        if pin is None or pin.version not in adapter.versions:
            return None
        return pin.version

    def _wanted_pins(self) -> set[str]:
        return {engine_name(name, version) for name, adapter in self._adapters.items()
                if (version := self._pinned_version(adapter)) is not None}

    async def pin(self, name: str, version: int | None, by: str = "admin") -> Adapter:
        async with self.name_lock(name), self._write_lock:
            adapter = self._adapters.get(name)
            if adapter is None:
                raise adapter_not_found(name)
            version = adapter.current if version is None else version
            if version is None:
                raise Conflict(f"`{name}` has no current version: name the version to pin",
                               code="no_current_version", param="version")
            if version not in adapter.versions:
                raise version_not_found(name, version)
            if self.max_pins == 0:
                raise Conflict("pinning is off on this server: it keeps no engine slots for pinned adapters "
                               "(set QUIVER_PINNED_SLOTS, below QUIVER_MAX_LORAS)", code="pinning_disabled",
                               param="name")
            others = sorted(other for other, stored in self._adapters.items()
                            if other != name and self._pinned_version(stored) is not None)
            if len(others) >= self.max_pins:
                raise Conflict(f"{len(others)} adapters are pinned already ({', '.join(others)}), as many as the "
                               f"engine slots kept for pins (QUIVER_PINNED_SLOTS={self.max_pins}); the other slots "
                               f"stay free for the rest of the traffic: unpin one first", code="too_many_pins",
                               param="name")
            previous = self._pinned_version(adapter)
            key = engine_name(name, version)
            await self._engine_pin(name, version)  # the engine has the last word before it is recorded
            try:
                await self._write_pin(name, Pin(version=version, at=int(time.time()), by=by))
            except DomainError:
                if previous != version:
                    await self._engine_unpin(key)
                raise
            if previous is not None and previous != version:
                await self._engine_unpin(engine_name(name, previous))
            log.info("pinned %s (by %s)", key, by)
            return self._describe(adapter)

    async def unpin(self, name: str, by: str = "admin") -> Adapter:
        async with self.name_lock(name), self._write_lock:
            adapter = self._adapters.get(name)
            if adapter is None:
                raise adapter_not_found(name)
            version = self._pinned_version(adapter)
            if version is None:
                raise NotFound(f"`{name}` is not pinned", code="pin_not_found", param="name")
            await self._write_pin(name, Pin(version=None, at=int(time.time()), by=by))
            await self._engine_unpin(engine_name(name, version))
            log.info("unpinned %s@%d (by %s)", name, version, by)
            return self._describe(adapter)

    async def _write_pin(self, name: str, pin: Pin) -> None:
        try:
            await asyncio.to_thread(self.store.write_document, name, PIN_DOCUMENT, pin.model_dump_json().encode())
        except OSError as exc:
            raise storage_error(exc) from None
        self._pins[name] = pin

    async def _engine_pin(self, name: str, version: int) -> None:
        key = engine_name(name, version)
        for attempt in (1, 2):
            await self._ensure_loaded(name, version)
            try:
                await self.engine.set_pinned(key, True)
                break
            except AdapterNotFound:
                if attempt == 2:
                    raise Unavailable(f"the engine lost {key} while pinning it; try again",
                                      code="engine_rejected") from None
                self._loaded.discard(key)  # the engine restarted since it was loaded: load it again, once
            except EngineUnavailable:
                raise Unavailable("the engine is not reachable; try again shortly",
                                  code="engine_unavailable") from None
            except EngineRejected as exc:
                raise Unavailable(f"the engine could not pin {key}: {exc.message}", code="engine_rejected") from None
        self._engine_pins.add(key)

    async def _engine_unpin(self, key: str) -> None:
        self._engine_pins.discard(key)
        try:
            await self.engine.set_pinned(key, False)
        except AdapterNotFound:
            pass  # not loaded in this engine process: nothing holds a slot
        except (EngineUnavailable, EngineRejected):
            log.warning("could not unpin %s in the engine (it may be restarting)", key)

    async def sync_pins(self) -> None:
        """Make this replica's engine hold exactly the pinned versions (at start, after a restart, after a
        store poll). Failures are logged: the next poll or restart tries again."""
        async with self._write_lock:  # not between a pin's engine call and its record
            wanted = self._wanted_pins()
            for key in sorted(self._engine_pins - wanted):
                await self._engine_unpin(key)
            for key in sorted(wanted - self._engine_pins):
                name, _, version = key.rpartition("@")
                try:
                    await self._engine_pin(name, int(version))
                except DomainError as exc:
                    log.warning("could not pin %s in the engine: %s", key, exc)

    def _update_gauge(self) -> None:
        self.metrics.adapters_registered.set(len(self._adapters))

    # --- canaries (see quiver.adapters.canary) -----------------------------------------------------

    def _read_canaries(self, adapters: dict[str, StoredAdapter]) -> dict[str, Canary]:
        return self._read_documents(adapters, CANARY_DOCUMENT, parse_canary)

    def _canary_running(self, name: str) -> bool:
        canary = self._canaries.get(name)
        return canary is not None and canary.active

    def _active_canary(self, adapter: StoredAdapter) -> Canary | None:
        """The canary that splits the bare name's traffic now, if any. A record whose version was deleted or
        has become current (by another replica, say) splits nothing."""
        canary = self._canaries.get(adapter.name)
        if (canary is None or not canary.active or adapter.current is None or canary.version == adapter.current
                or canary.version not in adapter.versions):
            return None
        watch = self._watches.get(adapter.name)
        if watch is not None and watch.ending and watch.canary == canary:
            return None  # this replica decided to roll it back: no more traffic while the end is being recorded
        return canary

    def get_canary(self, name: str) -> Canary:
        adapter = self._adapters.get(name)
        canary = self._canaries.get(name)
        if adapter is None:
            raise adapter_not_found(name)
        if canary is None:
            raise canary_not_found(name)
        watch = self._watches.get(name)
        if watch is None or watch.canary != canary:
            return canary
        stats = watch.stats(adapter.current)
        return canary.model_copy(update={"window": {engine_name(name, v): s for v, s in stats.items()}})

    async def set_canary(self, name: str, request: CanaryRequest, by: str = "admin") -> Canary:
        """Start (or re-weight) a canary: `request.weight` of the bare name's traffic goes to `request.version`."""
        async with self.name_lock(name), self._write_lock:
            adapter = self._adapters.get(name)
            if adapter is None:
                raise adapter_not_found(name)
            if request.version not in adapter.versions:
                raise version_not_found(name, request.version)
            if adapter.current is None:
                raise Conflict(f"`{name}` has no current version to compare a canary with: promote one first",
                               code="no_current_version", param="name")
            if request.version == adapter.current:
                raise Conflict(f"version {request.version} is already `{name}`'s current version",
                               code="canary_is_current", param="version")
            running = self._canaries.get(name)
            same = running is not None and running.active and running.version == request.version
            gate = adapter.versions[request.version].gate
            override = running.gate_override if same else None
            if gate is not None and not gate.passed and override is None:
                if not request.override_gate:
                    raise Conflict(f"`{name}@{request.version}` failed its suite ({gate.passed_cases}/"
                                   f"{gate.total_cases} cases passed; report: {gate.report}): start the canary with "
                                   f"override_gate=true to send it traffic anyway", code="gate_failed",
                                   param="version")
                override = GateOverride(by=by, at=int(time.time()), reason=request.reason)
                log.warning("canary on %s@%d started by %s although it failed its suite%s", name, request.version, by,
                            f": {request.reason}" if request.reason else "")
            live_suite = None
            if request.rollback.live_sample_rate > 0:
                if self.sampler is None:
                    raise InvalidRequest("this server scores no live traffic", code="invalid_rollback_policy",
                                         param="rollback.live_sample_rate")
                live_suite = await self.sampler.live_suite_version(name)
            # Before any traffic: the engine has the last word on what it can serve.
            await self._ensure_loaded(name, request.version)
            canary = Canary(name=name, version=request.version, weight=request.weight, rollback=request.rollback,
                            # re-weighting the same canary keeps its start (and this replica's window)
                            started_at=running.started_at if same else int(time.time()),  # type: ignore[union-attr]
                            live_suite_version=live_suite, gate_override=override)
            await self._write_canary(canary)
            if not same:
                self._watches.pop(name, None)
            log.info("canary on %s: version %d gets %.1f%% of the traffic (current: %s)", name, canary.version,
                     100 * canary.weight, adapter.current)
            return canary

    async def end_canary(self, name: str, reason: str = "ended") -> Canary:
        async with self.name_lock(name), self._write_lock:
            if name not in self._adapters:
                raise adapter_not_found(name)
            if not self._canary_running(name):
                raise canary_not_found(name)
            return await self._end_canary(name, reason)

    async def promote_canary(self, name: str) -> Adapter:
        """Make the running canary's version current; the canary ends as `promoted`."""
        canary = self._canaries.get(name)
        if name not in self._adapters:
            raise adapter_not_found(name)
        if canary is None or not canary.active:
            raise canary_not_found(name)
        return await self.promote(name, canary.version)  # ends the canary (see `promote`)

    async def _end_canary(self, name: str, reason: str) -> Canary:
        """Under the write lock. The ended record stays in the store: what ran and why it ended."""
        canary = self._canaries[name].model_copy(update={"active": False, "ended_at": int(time.time()),
                                                         "ended_reason": reason, "window": None})
        await self._write_canary(canary)
        self._watches.pop(name, None)
        level = logging.WARNING if reason.startswith("rolled_back") else logging.INFO
        log.log(level, "canary %s@%d ended: %s", name, canary.version, reason)
        return canary

    async def _end_canary_after(self, name: str, reason: str) -> None:
        """Record the end of a canary that a promote or delete made moot: the change itself is done, and an
        unrecorded end changes nothing (`_active_canary` ignores such a record), so a failure is only logged."""
        try:
            await self._end_canary(name, reason)
        except (DomainError, OSError):
            log.exception("could not record the end of %s's canary (%s)", name, reason)

    async def _write_canary(self, canary: Canary) -> None:
        raw = canary.model_dump_json(exclude={"window"}, indent=2).encode()
        try:
            await asyncio.to_thread(self.store.write_document, canary.name, CANARY_DOCUMENT, raw)
        except OSError as exc:
            raise storage_error(exc) from None
        self._canaries[canary.name] = canary

    def _split_canary(self, target: Target) -> tuple[StoredAdapter, Canary] | None:
        """The adapter and its active canary behind a split request, if it still has both and a current version."""
        if not target.split or target.adapter is None:
            return None
        adapter = self._adapters.get(target.adapter)
        canary = self._active_canary(adapter) if adapter is not None else None
        if canary is None or adapter is None or adapter.current is None:
            return None
        return adapter, canary

    def record_outcome(self, target: Target, error: bool) -> None:
        """One split request finished (`error`: the version is to blame); may start an automatic rollback."""
        found = self._split_canary(target) if target.version is not None else None
        if found is None:
            return
        adapter, canary = found
        self._watch(canary).record(target.version, error)
        self._judge(canary, adapter.current)

    def sample(self, target: Target, endpoint: str, body: dict[str, Any]) -> None:
        """A split request may be replayed on both versions and scored (the canary's quality trigger); this only
        draws and queues, so the caller never waits for it."""
        found = self._split_canary(target) if self.sampler is not None else None
        if found is None:
            return
        adapter, canary = found
        rate = canary.rollback.live_sample_rate
        if rate > 0 and canary.live_suite_version is not None and self._rng.random() < rate:
            self.sampler.offer(canary, adapter.current, endpoint, body)

    def record_scores(self, canary: Canary, scores: dict[int, float]) -> None:
        """One sample's live scores, per version; may start an automatic rollback. Ignored when the canary has
        ended or changed since the sample was taken."""
        adapter = self._adapters.get(canary.name)
        if adapter is None or self._active_canary(adapter) != canary or adapter.current not in scores:
            return
        watch = self._watch(canary)
        for version, score in scores.items():
            watch.record_score(version, score)
        self._judge(canary, adapter.current)  # type: ignore[arg-type]

    def _watch(self, canary: Canary) -> CanaryWatch:
        watch = self._watches.get(canary.name)
        if watch is None or watch.canary != canary:
            watch = self._watches[canary.name] = CanaryWatch(canary)
        return watch

    def _judge(self, canary: Canary, current: int) -> None:
        watch = self._watches[canary.name]
        reason = watch.verdict(current)
        if reason is not None:
            watch.ending = True
            task = asyncio.get_running_loop().create_task(self._roll_back(canary, reason))
            self._rollbacks.add(task)
            task.add_done_callback(self._rollbacks.discard)

    async def _roll_back(self, canary: Canary, reason: str) -> None:
        try:
            async with self._write_lock:
                # Ended or replaced meanwhile, here or by another replica (the store has the last word).
                raw = await asyncio.to_thread(self.store.read_document, canary.name, CANARY_DOCUMENT)
                stored = parse_canary(canary.name, raw)
                if self._canaries.get(canary.name) != canary or stored != canary:
                    return
                await self._end_canary(canary.name, reason)
            self.metrics.canary_rollbacks.labels(adapter=canary.name).inc()
        except Exception:  # the store may be down: the canary keeps running and is judged again
            log.exception("rolling back the canary %s@%d failed", canary.name, canary.version)
            watch = self._watches.get(canary.name)
            if watch is not None:
                watch.ending = False
