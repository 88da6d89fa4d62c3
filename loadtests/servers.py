"""What the comparisons need around the load generator: a quiver server of their own, many adapters, memory."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = Path("/tmp/qmodel/SmolLM2-135M-Instruct")
ADMIN_KEY = "loadtest-admin"
API_KEY = "loadtest-inference"


@dataclass
class QuiverProcess:
    """`quiver serve` (gateway + engine) in its own process group, with throwaway store and state folders."""

    root: Path
    port: int
    model_cache_dir: Path = DEFAULT_MODEL_DIR.parent
    env: dict[str, str] = field(default_factory=dict)  # extra QUIVER_* settings, e.g. QUIVER_MAX_LORAS
    process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.root / "gateway.log"

    def start(self, timeout_s: float = 900) -> "QuiverProcess":
        self.root.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, HF_HUB_OFFLINE="1", QUIVER_PORT=str(self.port),
                   QUIVER_MODEL_CACHE_DIR=str(self.model_cache_dir), QUIVER_STORE_DIR=str(self.root / "store"),
                   QUIVER_STATE_DIR=str(self.root / "state"), QUIVER_FINETUNING_DIR=str(self.root / "ft"),
                   QUIVER_ADMIN_KEYS=ADMIN_KEY, QUIVER_API_KEYS=API_KEY, **self.env)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "quiver.cli", "serve"], cwd=REPO, env=env,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"quiver serve exited ({self.process.returncode}); see {self.log_path}")
            try:
                if httpx.get(f"{self.base_url}/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"quiver serve not ready after {timeout_s}s; see {self.log_path}")

    @property
    def engine_url(self) -> str:
        """The engine's private loopback URL, as the gateway logged it (for gateway-vs-direct runs)."""
        return engine_url_from_log(self.log_path)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)  # the gateway drains, then stops its engine
        try:
            self.process.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> "QuiverProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def engine_url_from_log(log_path: Path) -> str:
    found = re.findall(r"starting the vLLM engine on (http://127\.0\.0\.1:\d+)", log_path.read_text(errors="replace"))
    if not found:
        raise RuntimeError(f"no engine URL in {log_path}")
    return found[-1]  # the latest start, if the engine was restarted


# ------------------------------------------------------------------------------------------ adapters


def make_adapters(model_dir: Path, out_dir: Path, count: int, prefix: str = "lt-", seed: int = 100,
                  rank: int = 8) -> list[Path]:
    """`count` distinct PEFT adapters. The first is built by PEFT (tests/lora_factory.py); the rest are the
    same file with fresh random tensors of the same shapes and scale, which takes milliseconds instead of a
    model load each (100 adapters in seconds)."""
    import torch
    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(REPO / "tests"))
    from lora_factory import random_adapter

    template = out_dir / f"{prefix}0"
    if not (template / "adapter_model.safetensors").exists():
        random_adapter(model_dir, template, seed=seed, rank=rank)
    tensors = load_file(template / "adapter_model.safetensors")
    paths = [template]
    for i in range(1, count):
        path = out_dir / f"{prefix}{i}"
        paths.append(path)
        if (path / "adapter_model.safetensors").exists():
            continue
        path.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator().manual_seed(seed + i)
        fresh = {k: torch.randn(v.shape, generator=generator, dtype=v.dtype) * v.float().std().clamp_min(1e-3)
                 for k, v in tensors.items()}
        save_file(fresh, path / "adapter_model.safetensors", metadata={"format": "pt"})
        shutil.copy(template / "adapter_config.json", path / "adapter_config.json")
    return paths


def register(base_url: str, name: str, folder: Path, admin_key: str = ADMIN_KEY) -> dict:
    files = [("files", (p.name, p.read_bytes())) for p in sorted(folder.iterdir()) if p.is_file()]
    response = httpx.post(f"{base_url}/v1/adapters", data={"name": name}, files=files,
                          headers={"Authorization": f"Bearer {admin_key}"}, timeout=120)
    response.raise_for_status()
    return response.json()


# ------------------------------------------------------------------------------------------ memory


class PeakRss:
    """Samples the summed RSS of a process and its children (gateway, engine API server, engine core, worker)
    in a background thread; `.peak_gib` is the highest sum seen. Shared pages count once per process, as `ps`
    shows them."""

    def __init__(self, pid: int, every_s: float = 0.5) -> None:
        self.pid, self.every_s = pid, every_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> int:
        try:
            root = psutil.Process(self.pid)
            total = 0
            for proc in [root, *root.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            return total
        except psutil.Error:
            return 0

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            self._stop.wait(self.every_s)

    @property
    def peak_gib(self) -> float:
        return round(self.peak / 2**30, 2)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
