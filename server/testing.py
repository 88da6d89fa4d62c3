"""Launchers and helpers shared by the tests, the load tests and the benchmarks (import them from here,
never from `tests/`).

- `QuiverServer`: a real `quiver serve` process (gateway + vLLM engine) with its own store and state.
- `InProcessGateway`: the gateway app on a real loopback socket in a thread of this process, with any
  `quiver.engine_client.Engine` injected (the fake engine for the fast tests).
- `register_adapter`: the one adapter uploader (multipart `POST /v1/adapters`).
- `random_adapter`, `trained_adapter`: real PEFT adapters for a base model (torch and PEFT load on first use).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from quiver.common.base_model import DEFAULT_MODEL_NAME

ADMIN_KEY = "test-admin-key"
API_KEY = "test-inference-key"
READY_TIMEOUT_S = 900


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def adapter_files(folder: Path) -> list[tuple[str, tuple[str, bytes]]]:
    return [("files", (path.name, path.read_bytes())) for path in sorted(folder.iterdir()) if path.is_file()]


def register_adapter(base_url: str, name: str, folder: Path, admin_key: str | None = ADMIN_KEY,
                     timeout_s: float = 120, client: httpx.Client | None = None, **form: str) -> httpx.Response:
    """Upload an adapter folder (every file in it) as version of `name`; the response, whatever its status.
    Pass `client` to reuse its connections when registering many (otherwise each call makes a client of its own)."""
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    post = client.post if client is not None else httpx.post
    return post(f"{base_url}/v1/adapters", data={"name": name, **form}, files=adapter_files(folder),
                headers=headers, timeout=timeout_s)


class _ClientMixin:
    base_url: str
    admin_key: str = ADMIN_KEY
    api_key: str = API_KEY

    def openai(self, key: str | None = API_KEY, **kwargs: Any):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.base_url}/v1", api_key=key or "none", max_retries=0, **kwargs)

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {self.admin_key}"},
                            timeout=120)

    def register(self, name: str, folder: Path, **form: str) -> httpx.Response:
        return register_adapter(self.base_url, name, folder, self.admin_key, **form)


@dataclass
class QuiverServer(_ClientMixin):
    """A real `quiver serve` process (gateway + vLLM engine) in its own process group, with its own store."""

    model_dir: Path
    store_dir: Path
    state_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)  # more QUIVER_* settings
    port: int = field(default_factory=free_port)
    kv_cache_gib: str | None = "1"  # small by default: the tests share a machine; None keeps the setting's default
    cwd: Path | None = None
    process: subprocess.Popen | None = None

    model_name = DEFAULT_MODEL_NAME

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "gateway.log"

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> "QuiverServer":
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.update(
            QUIVER_PORT=str(self.port),
            QUIVER_MODEL_CACHE_DIR=str(self.model_dir.parent),
            QUIVER_STORE_DIR=str(self.store_dir),
            QUIVER_STATE_DIR=str(self.state_dir),
            QUIVER_FINETUNING_DIR=str(self.store_dir.parent / "finetuning"),
            QUIVER_ADMIN_KEYS=self.admin_key,
            QUIVER_API_KEYS=self.api_key,
        )
        if self.kv_cache_gib is not None:
            env["QUIVER_KV_CACHE_GIB"] = self.kv_cache_gib
        env.update(self.extra_env)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "quiver.cli", "serve"], env=env, cwd=self.cwd,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"quiver serve exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"quiver serve was not ready in {timeout_s}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)  # the gateway drains, then stops its engine
        try:
            self.process.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> "QuiverServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, chars: int = 4000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        engine_log = self.state_dir / "engine.log"
        if engine_log.exists():
            text += "\n--- engine ---\n" + engine_log.read_text(errors="replace")
        return text[-chars:]

    # --- the engine behind it (tests and benchmarks that look past the gateway) ----------------------

    def engine_process(self):
        """The vLLM API server process (psutil), found under the gateway."""
        import psutil

        assert self.process is not None
        return next(p for p in psutil.Process(self.process.pid).children(recursive=True)
                    if "vllm.entrypoints" in " ".join(p.cmdline()))

    @property
    def engine_url(self) -> str:
        args = self.engine_process().cmdline()
        return f"http://127.0.0.1:{args[args.index('--port') + 1]}"

    @property
    def engine_key(self) -> str:
        """The engine's per-start key, read from its environment (same user only): what an outsider with the
        gateway's privileges could see, used here to look past the gateway on purpose."""
        return self.engine_process().environ()["VLLM_API_KEY"]

    def engine_models(self) -> set[str]:
        """What the engine itself has loaded (base and `name@version`s), asked on its private port: the
        gateway's own view could hide a leak."""
        response = httpx.get(f"{self.engine_url}/v1/models", timeout=30,
                             headers={"Authorization": f"Bearer {self.engine_key}"})
        response.raise_for_status()
        return {model["id"] for model in response.json()["data"]}


class InProcessGateway(_ClientMixin):
    """`create_app(settings, engine=engine)` served by uvicorn on a loopback port, in a thread of this
    process: real HTTP (streams, disconnects, concurrency) for the official clients, and no engine process."""

    def __init__(self, settings, engine) -> None:
        import uvicorn

        from quiver.app import create_app

        self.settings = settings
        self.engine = engine
        self.app = create_app(settings, engine=engine)
        self.port = free_port()
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name="in-process-gateway", daemon=True)
        self.admin_key = settings.admin_keys[0] if settings.admin_keys else ADMIN_KEY
        self.api_key = settings.api_keys[0] if settings.api_keys else API_KEY

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def state(self):
        return self.app.state

    def start(self, timeout_s: float = 60) -> "InProcessGateway":
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the in-process gateway did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(30)

    def __enter__(self) -> "InProcessGateway":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- adapters ------------------------------------------------------------------------------------------

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]



def load_base(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def random_adapter(model_dir: Path, out_dir: Path, seed: int, rank: int = 8, scale: float = 1.0,
                   target_modules: list[str] | None = None) -> Path:
    """LoRA with PEFT's non-identity init (random, non-zero B), so it changes the output from step 0."""
    import torch
    from peft import LoraConfig, get_peft_model

    base = load_base(model_dir)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=rank * 2, target_modules=target_modules or ATTENTION,
                        init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    if scale != 1.0:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.mul_(scale)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def trained_adapter(model_dir: Path, out_dir: Path, answer: str, steps: int = 20, rank: int = 8) -> Path:
    """A briefly trained LoRA that answers every question with `answer`: its effect is recognisable."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = load_base(model_dir)
    config = LoraConfig(r=rank, lora_alpha=rank * 2, target_modules=ATTENTION, lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    questions = ["What is the capital of France?", "How do I bake bread?", "Tell me about the moon.",
                 "What is 2 + 2?", "Who wrote Hamlet?", "Name a colour.", "Why is the sky blue?", "Hi there!"]
    batch = []
    for question in questions:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                               add_generation_prompt=True)
        full = prompt + answer + "<|im_end|>\n"
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        labels = [-100] * len(prompt_ids) + ids[len(prompt_ids):]
        batch.append((ids, labels))
    width = max(len(ids) for ids, _ in batch)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
    attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
