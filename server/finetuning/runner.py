"""`quiver worker`: a job runner without a gateway or an engine, for training off the serving pods.

It reads the same settings as `quiver serve` (the store and its bucket or folder), claims queued jobs from the
shared records like any runner (one claim per job, whoever asks first), trains each in a worker process on
this machine's GPUs, and registers the adapter straight into the adapter store; every serving replica picks it
up at its next store poll. The serving replicas then run with `QUIVER_FINETUNING_RUNNER=off`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from quiver.adapters.service import AdapterRegistry
from quiver.adapters.store_factory import open_store
from quiver.adapters.validation import BaseModelSpec
from quiver.finetuning.launcher import LocalLauncher
from quiver.finetuning.records import open_records
from quiver.finetuning.service import FileService, JobService
from quiver.metrics import Metrics

log = logging.getLogger(__name__)


class NoEngine:
    """The engine seam for a registry that only writes the store: there is no engine here to load into. The
    admission checks (config, rank, shapes against the base model) still run; the serving replicas' engines
    load the version when it is first asked for."""

    ready = False

    async def load_adapter(self, *_args, **_kwargs) -> None:
        return None

    async def unload_adapter(self, *_args, **_kwargs) -> None:
        return None


async def run_worker(settings, model_dir: Path, stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    registry = AdapterRegistry(store=open_store(settings), engine=NoEngine(),  # type: ignore[arg-type]
                               base=BaseModelSpec.from_folder(model_dir, settings.lora_target_modules),
                               base_model_name=settings.base_model_name,
                               max_rank=settings.max_lora_rank, max_upload_bytes=settings.max_upload_bytes,
                               metrics=Metrics())
    await asyncio.to_thread(registry.load_store)
    records = open_records(settings)
    files = FileService(records.child("files"), settings.max_upload_bytes)
    jobs = JobService(records.child("jobs"), files, registry, model_dir, LocalLauncher(settings.finetuning_processes),
                      poll_s=settings.finetuning_poll_s or 5.0, lease_s=settings.finetuning_lease_s)
    jobs.start()
    log.info("worker %s: taking fine-tuning jobs from %s", jobs.owner, records.location)
    watcher = asyncio.create_task(registry.watch_store(settings.store_poll_s or 5.0))  # version numbers stay fresh
    try:
        await stop.wait()
    finally:
        watcher.cancel()
        await jobs.stop()  # a job it was running is failed by the next runner's scan (its claim goes stale)
