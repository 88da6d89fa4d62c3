"""What the comparisons need around the load generator: a quiver server of their own, many adapters, memory."""

from __future__ import annotations

import re
import shutil
import threading
from pathlib import Path

import psutil

from quiver.settings import Settings
from quiver.testing import QuiverServer, random_adapter, register_adapter

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = Settings().model_dir  # where `quiver serve` prepares the default model
ADMIN_KEY = "loadtest-admin"
API_KEY = "loadtest-inference"


def quiver_server(root: Path, port: int, env: dict[str, str] | None = None,
                  model_dir: Path = DEFAULT_MODEL_DIR) -> QuiverServer:
    """`quiver serve` (gateway + engine) with throwaway store and state folders under `root`, the load tests'
    keys, and the engine's default KV cache (the one launcher: `quiver.testing.QuiverServer`)."""
    server = QuiverServer(model_dir=model_dir, store_dir=root / "store", state_dir=root / "state",
                          extra_env=dict(env or {}), port=port, cwd=REPO, kv_cache_gib=None)
    server.admin_key, server.api_key = ADMIN_KEY, API_KEY
    return server


def engine_url_from_log(log_path: Path) -> str:
    found = re.findall(r"starting the vLLM engine on (http://127\.0\.0\.1:\d+)", log_path.read_text(errors="replace"))
    if not found:
        raise RuntimeError(f"no engine URL in {log_path}")
    return found[-1]  # the latest start, if the engine was restarted


# ------------------------------------------------------------------------------------------ adapters


def make_adapters(model_dir: Path, out_dir: Path, count: int, prefix: str = "lt-", seed: int = 100,
                  rank: int = 8) -> list[Path]:
    """`count` distinct PEFT adapters. The first is built by PEFT (quiver.testing); the rest are the
    same file with fresh random tensors of the same shapes and scale, which takes milliseconds instead of a
    model load each (100 adapters in seconds)."""
    import torch
    from safetensors.torch import load_file, save_file

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
    response = register_adapter(base_url, name, folder, admin_key)
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
