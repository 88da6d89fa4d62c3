"""How a claimed fine-tuning job's training process is started: the seam between the job runner and where the
training runs. `LocalLauncher` (the default) starts `python -m quiver.training.worker <workspace>` on this
machine, under the engine guard so it dies with the gateway; its output goes to the workspace's train.log.

The worker's whole instruction is the workspace's spec.json, and it reports through files there (events.jsonl,
result.json): any launcher that runs the worker against that folder fits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Protocol

from quiver.common.jobs import TRAIN_LOG


class Run(Protocol):
    """One started training process."""

    async def wait(self) -> int: ...

    async def kill(self) -> None: ...


class Launcher(Protocol):
    async def start(self, workspace: Path) -> Run: ...


class LocalRun:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def wait(self) -> int:
        return await self.process.wait()

    async def kill(self) -> None:
        if self.process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # the worker's session: its children too
        await self.process.wait()


class LocalLauncher:
    def __init__(self, processes: int = 1) -> None:
        self.processes = processes  # data-parallel training processes, one per GPU (torchrun beyond one)

    def command(self, workspace: Path) -> list[str]:
        worker = [sys.executable, "-m", "quiver.training.worker", str(workspace)]
        if self.processes > 1:
            worker = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                      "--nproc-per-node", str(self.processes), *worker[1:]]
        # Under the engine guard: the worker dies with the gateway.
        return [sys.executable, "-m", "quiver.engine_guard", str(os.getpid()), *worker]

    @staticmethod
    def env() -> dict[str, str]:
        # The spec carries everything the worker needs; the gateway's own settings (its keys among them) stay here.
        env = {key: value for key, value in os.environ.items() if not key.startswith("QUIVER_")}
        return {**env, "HF_HUB_OFFLINE": "1"}

    async def start(self, workspace: Path) -> LocalRun:
        with open(workspace / TRAIN_LOG, "ab") as train_log:
            process = await asyncio.create_subprocess_exec(
                *self.command(workspace),
                stdin=asyncio.subprocess.DEVNULL, stdout=train_log, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True, env=self.env(),
            )
        return LocalRun(process)
