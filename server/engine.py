"""The vLLM engine as a supervised, sealed child process on a private loopback port.

Every call to it goes through `quiver.engine_client.HttpEngineClient` (the supervisor's health probe too).

Sealed: each start makes a random API key that only the gateway holds. It reaches the engine in its
environment (`VLLM_API_KEY`; a command-line `--api-key` would be readable by every user in
/proc/<pid>/cmdline), where vLLM's own middleware checks it on `/v1/*` (the LoRA load/unload routes
included) and `quiver.engine_seal` on every other route (`/invocations`, `/pooling`, `/tokenize`, ... are
not under vLLM's guarded prefixes). The engine's environment is built from an allow-list: none of the
gateway's keys, S3 credentials or tokens reach it.

Healing: the supervisor probes `/health` with a deadline; after `engine_health_failures` misses in a row,
or when the process exits, it kills the whole process group (in-flight requests fail at once with a 503),
starts a new engine and tells its listeners (the registry forgets what was loaded and reloads on use).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import secrets
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from quiver.common.base_model import chat_template_file, tool_call_parser
from quiver.engine_client import (
    EngineError,
    EngineResponse,
    EngineUnavailable,
    HttpEngineClient,
    RestartListener,
    Timeouts,
)
from quiver.settings import Settings

log = logging.getLogger(__name__)

ENGINE_HOST = "127.0.0.1"
ENGINE_KEY_ENV = "VLLM_API_KEY"  # vLLM reads it itself; quiver.engine_seal reads the same
SEAL_MIDDLEWARE = "quiver.engine_seal.SealMiddleware"
_LOG_TAIL_BYTES = 4000

# The engine's environment: only these names and prefixes are passed on from the gateway's.
_ENV_NAMES = {
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TERM", "PWD",
    "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE",
    "LD_LIBRARY_PATH", "LD_PRELOAD", "XDG_CACHE_HOME", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE", "TRANSFORMERS_CACHE", "TOKENIZERS_PARALLELISM",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
    "QUIVER_CPU_LORA_PLUGIN", "QUIVER_CPU_LORA_KERNEL",  # the engine plugin's switches (not secrets)
    "QUIVER_KERNEL_CACHE", "CC",  # where the plugin's CPU kernel is built and cached, and with what
}
_ENV_PREFIXES = ("VLLM_", "LC_", "OMP_", "MKL_", "KMP_", "OPENBLAS_", "TORCH", "CUDA_", "NVIDIA_", "NCCL_",
                 "ROCM_", "HIP_")
# Belt and braces: even an allowed prefix does not pass a name that looks like a secret.
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH", re.IGNORECASE)


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((ENGINE_HOST, 0))
        return sock.getsockname()[1]


def engine_command(settings: Settings, model_dir: Path, port: int) -> list[str]:
    command = [
        sys.executable, "-m", "quiver.engine_guard", str(os.getpid()),  # the engine stops if the gateway dies
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir),
        "--served-model-name", settings.base_model_name,
        "--host", ENGINE_HOST,
        "--port", str(port),
        "--middleware", SEAL_MIDDLEWARE,
        "--dtype", settings.dtype,
        "--lora-dtype", settings.lora_dtype,
        "--max-model-len", str(settings.max_model_len),
        "--enable-lora",
        "--max-loras", str(settings.max_loras),
        "--max-lora-rank", str(settings.max_lora_rank),
        "--disable-uvicorn-access-log",
        # Sampling defaults for requests that set none come from the model folder's generation_config.json
        # (vLLM's default too; said here because the default model's folder is written to carry them).
        "--generation-config", "auto",
    ]
    # The same template the trainer renders with, and the parser that reads the tool calls it teaches.
    template = chat_template_file(model_dir, settings)
    if template is not None:
        command += ["--chat-template", str(template)]
    parser = tool_call_parser(model_dir, settings)
    if parser is not None:
        command += ["--enable-auto-tool-choice", "--tool-call-parser", parser]
    if settings.lora_target_modules:
        command += ["--lora-target-modules", *settings.lora_target_modules]
    if settings.max_cpu_loras is not None:
        command += ["--max-cpu-loras", str(settings.max_cpu_loras)]
    if settings.tensor_parallel_size > 1:
        command += ["--tensor-parallel-size", str(settings.tensor_parallel_size)]
    if settings.gpu_memory_utilization is not None:
        command += ["--gpu-memory-utilization", f"{settings.gpu_memory_utilization:g}"]
    return command + list(settings.engine_extra_args)


# vLLM binds ZMQ sockets at TMPDIR/<uuid4>, and a Unix socket path holds at most 107 bytes: a deep state_dir
# (a test's tmp_path, a mounted volume) would fail the engine's start.
_MAX_TMPDIR_LENGTH = 107 - 1 - 36 - 10  # the separator, the uuid and a margin


def engine_tmpdir(state_dir: Path) -> Path:
    tmp = state_dir / "tmp"
    if len(str(tmp)) <= _MAX_TMPDIR_LENGTH:
        return tmp
    return Path("/tmp") / f"quiver-engine-{hashlib.sha256(str(state_dir).encode()).hexdigest()[:16]}"


def engine_environment(settings: Settings, api_key: str, parent: dict[str, str] | None = None) -> dict[str, str]:
    parent = dict(os.environ) if parent is None else parent
    scratch = settings.state_dir.resolve()
    env = {
        name: value for name, value in parent.items()
        if (name in _ENV_NAMES or name.startswith(_ENV_PREFIXES)) and not _SECRET_NAME.search(name)
    }
    env.update(
        HF_HUB_OFFLINE=parent.get("HF_HUB_OFFLINE", "1"),
        # Adapters are loaded and unloaded at run time through the HTTP API; only the gateway holds its key.
        VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
        VLLM_CPU_KVCACHE_SPACE=f"{settings.kv_cache_gib:g}",
        TMPDIR=str(engine_tmpdir(scratch)),
        VLLM_CACHE_ROOT=str(settings.engine_cache_dir.resolve()),  # shared by starts: see the setting
        VLLM_CONFIG_ROOT=str(scratch / "vllm-config"),
        VLLM_NO_USAGE_STATS="1",
        QUIVER_ENGINE_NICE=str(settings.engine_nice),  # applied by quiver.engine_guard before it starts vLLM
        QUIVER_PINNED_SLOTS=str(settings.pinned_slots),  # read by the engine plugin's scheduler (engine_plugin/pins.py)
        DO_NOT_TRACK="1",
    )
    env[ENGINE_KEY_ENV] = api_key
    if settings.cpu_threads_bind == "all":
        # By default vLLM keeps a core for its scheduler; binding every core was 25-35 % faster here.
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{(os.cpu_count() or 1) - 1}"
    elif settings.cpu_threads_bind:
        env["VLLM_CPU_OMP_THREADS_BIND"] = settings.cpu_threads_bind
    if settings.engine_worker_in_core and settings.tensor_parallel_size == 1:
        # The API server still runs its engine core in a process of its own (AsyncLLM always does); this only
        # keeps vLLM's CPU platform from forcing the `mp` executor, i.e. a third process for the model.
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        cpus = bound_cpus(env.get("VLLM_CPU_OMP_THREADS_BIND", ""))
        if cpus and "OMP_NUM_THREADS" not in env:
            # What vLLM's mp executor gives its worker process (utils/ompmultiprocessing.py): one OpenMP thread
            # per bound core, bound to them. Without it vLLM cuts the engine core to one torch thread "for
            # serving", which suits a scheduler, not the process that now runs the model.
            env["OMP_NUM_THREADS"] = str(len(cpus))
            env.setdefault("OMP_PLACES", "{" + ",".join(map(str, cpus)) + "}")
            env.setdefault("OMP_PROC_BIND", "true")
    (scratch / "vllm-config").mkdir(parents=True, exist_ok=True)
    engine_tmpdir(scratch).mkdir(mode=0o700, parents=True, exist_ok=True)
    settings.engine_cache_dir.mkdir(parents=True, exist_ok=True)
    return env


def bound_cpus(bind: str) -> list[int] | None:
    """The cores a VLLM_CPU_OMP_THREADS_BIND list such as `0-3,6` names (None: auto, nobind, or several
    ranks' lists)."""
    if not bind or bind in ("auto", "nobind") or "|" in bind:
        return None
    cpus: list[int] = []
    for part in bind.split(","):
        first, _, last = part.strip().partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            return None
        cpus += range(int(first), int(last) + 1) if last else [int(first)]
    return cpus or None


def engine_timeouts(settings: Settings) -> Timeouts:
    return Timeouts(connect_s=settings.engine_connect_timeout_s, read_s=settings.engine_read_timeout_s,
                    health_s=settings.engine_health_timeout_s)


class EngineSupervisor:
    """Starts, probes, kills and restarts the engine process; implements `quiver.engine_client.Engine` by
    handing every call to its `HttpEngineClient`."""

    def __init__(self, settings: Settings, model_dir: Path) -> None:
        self.settings = settings
        self.model_dir = model_dir
        self.port = settings.engine_port or free_loopback_port()
        self.base_url = f"http://{ENGINE_HOST}:{self.port}"
        self.log_path = settings.state_dir / "engine.log"
        self.client = HttpEngineClient(self.base_url, None, engine_timeouts(settings))
        self.ready = False
        self.restarts = 0  # every restart since the gateway started
        self.restart_streak = 0  # restarts without a healthy period between them: sets the back-off
        self._process: asyncio.subprocess.Process | None = None
        self._watch_task: asyncio.Task | None = None
        self._stopping = False
        self._listeners: list[RestartListener] = []

    def on_restart(self, listener: RestartListener) -> None:
        self._listeners.append(listener)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    # --- the calls (all through the one client) -----------------------------------------------------

    async def generate(self, endpoint: str, body: dict[str, Any]) -> EngineResponse:
        return await self.client.generate(endpoint, body)

    async def load_adapter(self, name: str, path: Path) -> None:
        await self.client.load_adapter(name, path)

    async def unload_adapter(self, name: str) -> None:
        await self.client.unload_adapter(name)

    async def set_pinned(self, name: str, pinned: bool) -> None:
        await self.client.set_pinned(name, pinned)

    async def health(self) -> None:
        await self.client.health()

    async def metrics_text(self) -> str:
        return await self.client.metrics_text()

    async def loaded_models(self) -> set[str]:
        return await self.client.loaded_models()

    async def aclose(self) -> None:
        await self.client.aclose()

    # --- the process --------------------------------------------------------------------------------

    async def start(self) -> None:
        await self._spawn_and_wait()
        self._watch_task = asyncio.create_task(self._watch(), name="engine-watch")

    async def _spawn_and_wait(self) -> None:
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        command = engine_command(self.settings, self.model_dir, self.port)
        # A new key for every start: a key seen by an earlier engine process is worth nothing.
        api_key = secrets.token_urlsafe(32)
        old_client, self.client = self.client, HttpEngineClient(self.base_url, api_key, engine_timeouts(self.settings))
        await old_client.aclose()
        log.info("starting the vLLM engine on %s (log: %s)", self.base_url, self.log_path)
        with open(self.log_path, "ab") as log_file:
            self._process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                env=engine_environment(self.settings, api_key),
                # Its own process group, so stopping it also stops the engine-core and worker processes.
                start_new_session=True,
            )
        await self._wait_healthy()
        self.ready = True
        log.info("the vLLM engine is ready (pid %s)", self._process.pid)

    async def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.settings.engine_start_timeout_s
        while time.monotonic() < deadline:
            if self._process is None or self._process.returncode is not None:
                raise EngineUnavailable(f"the vLLM engine exited while starting:\n{self.log_tail()}")
            with contextlib.suppress(EngineError):
                await self.client.health()
                return
            await asyncio.sleep(0.2)  # a loopback GET; every 0.1 s of it is on every start's critical path
        await self._terminate()
        raise EngineUnavailable(
            f"the vLLM engine was not healthy after {self.settings.engine_start_timeout_s:g}s:\n{self.log_tail()}"
        )

    async def _until_unhealthy(self) -> str:
        """Returns why the engine must be replaced: it exited, or it stopped answering its health probe."""
        assert self._process is not None
        exited = asyncio.ensure_future(self._process.wait())
        healthy_since = time.monotonic()
        misses = 0
        try:
            while True:
                done, _ = await asyncio.wait({exited}, timeout=self.settings.engine_health_interval_s)
                if done:
                    return f"the vLLM engine exited with {exited.result()}"
                try:
                    await self.client.health()
                except EngineError as exc:
                    misses += 1
                    log.warning("the vLLM engine's health probe failed (%d/%d): %s",
                                misses, self.settings.engine_health_failures, exc)
                    if misses >= self.settings.engine_health_failures:
                        return f"the vLLM engine stopped answering its health probe ({exc})"
                    continue
                misses = 0
                if self.restart_streak and time.monotonic() - healthy_since >= self.settings.engine_healthy_reset_s:
                    log.info("the vLLM engine has been healthy for %gs; restart back-off reset",
                             self.settings.engine_healthy_reset_s)
                    self.restart_streak = 0
        finally:
            exited.cancel()

    async def _watch(self) -> None:
        while not self._stopping:
            try:
                if self.ready:
                    reason = await self._until_unhealthy()
                    if self._stopping:
                        return
                    self.ready = False
                    log.error("%s; restarting it:\n%s", reason, self.log_tail())
                    if not self.settings.engine_restart:
                        await self._terminate(grace_s=0)
                        return
                    # A hung engine cannot shut down gracefully: the whole group is killed at once, which
                    # also breaks every in-flight connection (those requests get a 503 now, not later).
                    await self._terminate(grace_s=0)
                    # Hand-written on purpose: this is a supervisor's restart pacing, not a retried call; no
                    # pinned dependency offers backoff (botocore's is for its own requests).
                    await asyncio.sleep(min(30.0, 2.0 ** min(self.restart_streak, 5)) if self.restart_streak else 0.5)
                    self.restarts += 1
                    self.restart_streak += 1
                await self._spawn_and_wait()
                for listener in self._listeners:
                    try:
                        await listener()
                    except Exception:
                        log.exception("an engine-restart listener failed")
            except asyncio.CancelledError:
                raise
            except Exception:
                # The supervisor must not die silently: log, wait, try again.
                log.exception("supervising the vLLM engine failed; trying again")
                self.ready = False
                await self._terminate(grace_s=0)
                await asyncio.sleep(min(30.0, 2.0 ** min(self.restart_streak, 5)))
                self.restarts += 1
                self.restart_streak += 1

    async def stop(self) -> None:
        self._stopping = True
        self.ready = False
        if self._watch_task:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
        await self._terminate()
        await self.client.aclose()

    async def _terminate(self, grace_s: float = 20.0) -> None:
        process = self._process
        if process is None:
            return
        if grace_s > 0 and process.returncode is None:
            self._signal_group(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), grace_s)
            except asyncio.TimeoutError:
                log.warning("the vLLM engine did not stop in %gs; killing it", grace_s)
        # Whatever is left of the group (engine core, workers; stopped ones too) goes.
        self._signal_group(process.pid, signal.SIGKILL)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(process.wait(), 5.0)

    @staticmethod
    def _signal_group(pgid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)

    def log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as log_file:
                log_file.seek(0, os.SEEK_END)
                log_file.seek(max(0, log_file.tell() - _LOG_TAIL_BYTES))
                return log_file.read().decode(errors="replace")
        except OSError:
            return "(no engine log)"
