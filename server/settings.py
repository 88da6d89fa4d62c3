"""All of quiver's settings, read from `QUIVER_*` environment variables and an optional YAML file."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from quiver.adapters.s3_url import parse_s3_url
from quiver.common.base_model import BaseModelSettings, cache_home

# vLLM accepts only these LoRA ranks for --max-lora-rank.
ENGINE_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

KeyList = Annotated[list[str], NoDecode]
# Adapter names are `^[a-z0-9][a-z0-9._-]{0,63}$`; a tenant pattern is such a name with shell wildcards.
_TENANT_PATTERN = re.compile(r"^[a-z0-9._\-*?\[\]!]{1,64}$")


class Settings(BaseModelSettings):
    """Everything the gateway reads. The base model's part (`model`, `served_model_name`, `model_cache_dir`, where
    the settings come from, `model_dir`, `base_model_name`) is `BaseModelSettings`, shared with the trainer."""

    # hide_input_in_errors: a bad setting must not print the keys it holds.
    model_config = SettingsConfigDict(env_prefix="QUIVER_", extra="forbid", validate_default=True,
                                      hide_input_in_errors=True)

    # Where the gateway listens.
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)

    # The base model: a local Hugging Face folder (`model`), or empty for the embedded default
    # (SmolLM2-135M-Instruct), converted once into model_cache_dir; fields and checks in BaseModelSettings.
    model_cache_dir: Path = Field(default_factory=lambda: cache_home() / "models")

    # The adapter store (source of truth for the registry) and the engine's scratch space.
    store_dir: Path = Path("adapters")
    state_dir: Path = Field(default_factory=lambda: cache_home() / "run")
    # Instead of store_dir, an S3-compatible bucket shared by every replica: s3://bucket[/prefix].
    # Credentials come from the standard AWS chain (AWS_* variables, shared config, pod/instance roles).
    store_url: str | None = None
    s3_endpoint_url: str | None = Field(None, description="e.g. http://minio:9000; empty for AWS S3")
    s3_addressing_style: Literal["path", "virtual"] | None = Field(
        None, description="empty: path-style with s3_endpoint_url, the SDK's choice on AWS")
    # With store_url: this replica's copies of the versions it serves (the engine loads local folders).
    store_cache_dir: Path | None = Field(None, description="empty: <state_dir>/adapter-cache")
    # How often to re-read the store for changes made by other replicas sharing it (0: never).
    store_poll_s: float = Field(2.0, ge=0)
    # Uploaded training files and fine-tuning jobs (persistent, like the store).
    # With store_url the files and jobs live in the bucket instead, beside the adapters (<prefix>.finetuning/).
    finetuning_dir: Path = Path("finetuning")
    # Who trains the jobs this server accepts: `local`, a worker process on this machine (the default: one
    # machine, or replicas that each may take a queued job); `off`, someone else (a `quiver worker` Deployment
    # on GPU nodes claiming them from the shared store): this server only accepts, lists and cancels them.
    finetuning_runner: Literal["local", "off"] = "local"
    # How often a runner looks in the shared store for jobs accepted by other replicas (0: only its own).
    finetuning_poll_s: float = Field(5.0, ge=0)
    # A running job whose runner has not renewed its claim for this long is failed as interrupted.
    finetuning_lease_s: float = Field(60.0, ge=5)
    # Data-parallel training processes per job (torchrun), one per GPU the runner's machine gives training.
    finetuning_processes: int = Field(1, ge=1, le=64)

    # Auth: with no keys at all the server only binds to loopback. repr=False keeps keys out of any log.
    admin_keys: KeyList = Field(default_factory=list, repr=False)
    api_keys: KeyList = Field(default_factory=list, repr=False)
    # Tenant keys: inference keys that see and call only the base model and the adapters whose names match
    # their glob patterns, e.g. {"key-of-acme": ["acme-*"], "key-of-globex": ["globex-bot"]} (JSON or YAML).
    tenant_keys: Annotated[dict[str, list[str]], NoDecode] = Field(default_factory=dict, repr=False)
    # "No auth, I know": serve without any key on a non-loopback host (e.g. a container behind a trusted proxy).
    allow_no_auth: bool = False

    # Limits.
    max_upload_bytes: int = Field(256 * 1024 * 1024, gt=0)
    max_request_bytes: int = Field(4 * 1024 * 1024, gt=0)
    # The one switch for /metrics: false (the default) serves it without a key, for scrapers inside the
    # cluster; true asks for an admin key (the Helm chart's `metrics.requireKey` sets this).
    metrics_require_key: bool = False
    # Per API/tenant key, on generation (admin keys are not limited): 429 with Retry-After for that key only.
    key_requests_per_minute: int | None = Field(None, ge=1, description="generation requests per key per minute")
    key_max_concurrent: int | None = Field(None, ge=1, description="generation requests in flight per key")
    max_running_requests: int = Field(256, ge=1, description="generation requests in flight at once")
    max_waiting_requests: int = Field(1024, ge=0, description="requests that may wait for a slot before 429s")
    max_completion_tokens: int | None = Field(None, ge=1, description="cap on max_tokens; default max_model_len")
    max_n: int = Field(8, ge=1, description="cap on `n` (choices per request)")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM, how long in-flight requests may finish")
    # The usage ledger (GET /v1/usage): per-minute buckets in <state_dir>/usage.sqlite3, kept this long.
    usage_retention_days: int = Field(90, ge=1, le=3650, description="how long per-minute usage is kept")
    # A canary's quality trigger (rollback.live_sample_rate): sampled requests waiting for replay, replays at once.
    canary_sample_queue: int = Field(16, ge=1, le=1024, description="sampled canary requests waiting to be scored")
    canary_sample_concurrency: int = Field(1, ge=1, le=16, description="sampled canary requests replayed at once")

    # The vLLM engine.
    engine_port: int | None = Field(None, ge=1, le=65535, description="private loopback port; free one if unset")
    dtype: str = "float32"
    lora_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="the dtype the engine holds adapter weights in (vLLM's --lora-dtype); auto: the model's dtype. "
                    "bfloat16 on a float32 CPU engine: adapters in half the memory and a decode step ~0.3 % "
                    "faster; adapters saved in bfloat16 give bit-identical results, float32 ones are rounded once "
                    "when loaded")
    lora_target_modules: KeyList = Field(
        default_factory=list,
        description="the layers the engine applies LoRA to (vLLM's --lora-target-modules), as adapters name them: "
                    "e.g. q_proj,k_proj,v_proj,o_proj; empty: every layer vLLM supports. Layers left out are not "
                    "wrapped at all, which takes their per-step LoRA overhead off every request (base-only too); "
                    "adapters that train other layers are refused at registration (target_module_not_served)")
    max_model_len: int = Field(2048, gt=0)
    max_loras: int = Field(4, ge=1)
    max_cpu_loras: int | None = Field(None, ge=1)
    pinned_slots: int = Field(
        0, ge=0,
        description="engine slots (of max_loras) kept for pinned adapters (POST /v1/adapters/{name}/pin): the "
                    "scheduler batches at most max_loras - pinned_slots distinct adapters; 0 turns pinning off")
    max_lora_rank: int = 16
    kv_cache_gib: float = Field(2.0, gt=0, description="CPU engines only: KV cache size (VLLM_CPU_KVCACHE_SPACE)")
    cpu_threads_bind: str = Field("all", description="CPU engines only: VLLM_CPU_OMP_THREADS_BIND; 'all' binds every core")
    engine_nice: int = Field(
        0, ge=0, le=19,
        description="how far below the gateway the engine's CPU priority is (a Unix nice increment). 0: with the "
                    "model in the engine-core process, 10 bought nothing measurable for the gateway here (one "
                    "request at a time +4.3 ms TTFT over direct at 10, +2.2 ms at 0) while on a shared machine "
                    "it hands every other process ~9x the engine's share of the cores (CFS weights 1024 vs 110)")
    engine_extra_args: KeyList = Field(default_factory=list)
    engine_cache_dir: Path = Field(
        default_factory=lambda: cache_home() / "vllm-cache",
        description="vLLM's cache (VLLM_CACHE_ROOT), kept across starts: with it, vLLM skips inspecting the "
                    "model class in a fresh subprocess (~9 s of a 36 s cold start here)")
    engine_worker_in_core: bool = Field(
        True, description="with one device (tensor_parallel_size 1), the model runs inside vLLM's engine-core "
                          "process instead of a worker process of its own (VLLM_ENABLE_V1_MULTIPROCESSING=0, the "
                          "`uni` executor): one process less importing vLLM and torch at every start (~8 s of "
                          "a cold start on CPU here) and no per-step hand-off between the two")
    engine_start_timeout_s: float = Field(600.0, gt=0)
    engine_restart: bool = True
    # A hung engine must never hold a request forever, nor stay in place (see quiver.engine).
    engine_connect_timeout_s: float = Field(5.0, gt=0)
    engine_read_timeout_s: float = Field(
        300.0, gt=0, description="longest silence from the engine: between stream chunks, or before a whole "
                                 "non-streamed answer")
    engine_health_interval_s: float = Field(5.0, gt=0, description="how often the engine's /health is probed")
    engine_health_timeout_s: float = Field(10.0, gt=0, description="deadline of one health probe")
    engine_health_failures: int = Field(3, ge=1, description="missed probes in a row before the engine is restarted")
    engine_healthy_reset_s: float = Field(
        300.0, gt=0, description="after this long healthy, the restart back-off starts from zero again")
    # Scale-up knobs for GPU engines (vLLM's own flags): shard the model over N GPUs of the pod, and the share
    # of each GPU's memory the engine may take (empty: vLLM's default, 0.9).
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs the engine shards the model over (--tensor-parallel-size)")
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1, description="--gpu-memory-utilization; empty: vLLM's default")

    # Operability (server/observability.py).
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object a line, with request ids")
    otlp_endpoint: str | None = Field(None, description="OTLP/HTTP collector, e.g. http://otel-collector:4318; "
                                                        "turns tracing on (the otel extra); OTEL_EXPORTER_OTLP_* work too")

    @field_validator("admin_keys", "api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str) and value.lstrip().startswith("["):
            # A JSON list, as pydantic-settings reads other list settings: else `["k"]` would silently become a
            # key with brackets and quotes. The message never quotes the value (it holds keys).
            try:
                keys = yaml.safe_load(value)
            except yaml.YAMLError:
                keys = None
            if not (isinstance(keys, list) and all(isinstance(key, str) and key for key in keys)):
                raise ValueError("expected comma-separated keys or a JSON list of strings")
            return keys
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("tenant_keys", mode="before")
    @classmethod
    def _tenant_mapping(cls, value: Any) -> Any:
        # Messages here never quote a key: they name the tenant by its position in the mapping.
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value) if value.strip() else {}
            except yaml.YAMLError:
                # YAML's own message quotes the offending text, which may be a key.
                raise ValueError("is not a JSON or YAML mapping of key -> adapter patterns") from None
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError("must be a mapping of key -> adapter patterns")
        tenants: dict[str, list[str]] = {}
        for position, (key, patterns) in enumerate(value.items(), start=1):
            if not isinstance(key, str) or not key.strip() or key != key.strip() or any(c.isspace() for c in key):
                raise ValueError(f"tenant #{position}: a key must be a non-empty string without spaces")
            if isinstance(patterns, str):
                patterns = [patterns]
            if not isinstance(patterns, list) or not patterns:
                raise ValueError(f"tenant #{position}: give a list of adapter names or glob patterns")
            for pattern in patterns:
                if not isinstance(pattern, str) or not _TENANT_PATTERN.match(pattern):
                    raise ValueError(f"tenant #{position}: {pattern!r} can match no adapter name "
                                     "(lower-case letters, digits, `.`, `_`, `-` and the wildcards `*?[]!`)")
            tenants[key] = list(patterns)
        return tenants

    @field_validator("engine_extra_args", mode="before")
    @classmethod
    def _split_args(cls, value: Any) -> Any:
        return shlex.split(value) if isinstance(value, str) else value

    @field_validator("lora_target_modules", mode="before")
    @classmethod
    def _split_modules(cls, value: Any) -> Any:
        return [name for name in re.split(r"[,\s]+", value) if name] if isinstance(value, str) else value

    @field_validator("lora_target_modules")
    @classmethod
    def _module_names(cls, value: list[str]) -> list[str]:
        bad = [name for name in value if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", name)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a module name (letters, digits and '_', such as q_proj)")
        return list(dict.fromkeys(value))

    @field_validator("max_lora_rank")
    @classmethod
    def _engine_rank(cls, value: int) -> int:
        if value not in ENGINE_LORA_RANKS:
            raise ValueError(f"must be one of {ENGINE_LORA_RANKS} (what vLLM accepts)")
        return value

    @field_validator("store_url", "s3_endpoint_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return value.strip() or None if isinstance(value, str) else value

    @field_validator("store_url")
    @classmethod
    def _store_url(cls, value: str | None) -> str | None:
        if value is not None:
            parse_s3_url(value)
        return value

    @field_validator("s3_endpoint_url")
    @classmethod
    def _endpoint_url(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"https?://[^\s/@]+(/\S*)?", value):
            raise ValueError("must be an http:// or https:// URL without credentials, e.g. http://minio:9000")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras must be at least max_loras")
        if self.pinned_slots >= self.max_loras:
            raise ValueError("pinned_slots must be below max_loras: pins must leave a slot for the other adapters")
        if set(self.tenant_keys) & set(self.admin_keys + self.api_keys):
            # One key with two meanings would silently widen (or narrow) what it may see.
            raise ValueError("a tenant key is also an admin or API key; each key must have one role")
        return self

    @property
    def auth_enabled(self) -> bool:
        return bool(self.admin_keys or self.api_keys or self.tenant_keys)

    @property
    def adapter_cache_dir(self) -> Path:
        return self.store_cache_dir if self.store_cache_dir is not None else self.state_dir / "adapter-cache"
