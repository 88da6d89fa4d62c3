"""Cold start of `quiver serve`: wall time to /ready and the engine's phases, read from its log.

    HF_HUB_OFFLINE=1 .venv/bin/python -m loadtests.cold_start run --runs 2 --json /tmp/cold.json
    HF_HUB_OFFLINE=1 .venv/bin/python -m loadtests.cold_start run --env QUIVER_ENGINE_EXTRA_ARGS=--enforce-eager

Each run starts a fresh server (fresh store and state folders, the model already converted), waits for /ready,
stops it. The phases come from the timestamps vLLM (and quiver's gateway) log; `phases` prints them for any
existing engine.log.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psutil
import typer

from loadtests.servers import DEFAULT_MODEL_DIR, quiver_server
from quiver.testing import free_port

app = typer.Typer(add_completion=False)

# vLLM's log lines: "(EngineCore pid=123) INFO 12-02 15:40:01 [file.py:12] message"; the year is not logged.
_STAMP = re.compile(r"(?P<md>\d\d-\d\d) (?P<hms>\d\d:\d\d:\d\d)(?:\.(?P<ms>\d+))? \[[^\]]+\] (?P<msg>.*)")

# (phase name, regex on the message): the first line matching each marks the phase's end.
MARKS: list[tuple[str, str]] = [
    ("api_server_up", r"vLLM API server version|non-default args"),
    ("config_resolved", r"Resolved architecture|Initializing a V1 LLM engine"),
    ("engine_core_started", r"Initializing a V1 LLM engine|EngineCore"),
    ("plugin_loaded", r"quiver CPU LoRA plugin active"),
    ("model_loaded", r"Model loading took|Loading weights took"),
    ("kv_cache_allocated", r"GPU KV cache size|KV cache size|num_gpu_blocks|Maximum concurrency"),
    ("compiled", r"torch.compile takes|Compiling a graph|compilation.*took|Graph capturing finished"),
    ("warmed_up", r"init engine .* took|warming up|Warming up"),
    ("routes_ready", r"Starting vLLM API server|Available routes"),
    ("app_startup", r"Application startup complete"),
]


@dataclass
class Line:
    t: float  # seconds since the first stamped line
    msg: str


def stamped_lines(text: str) -> list[Line]:
    lines, first = [], None
    for raw in text.splitlines():
        m = _STAMP.search(raw)
        if not m:
            continue
        stamp = datetime.strptime(f"2000-{m['md']} {m['hms']}", "%Y-%m-%d %H:%M:%S").timestamp()
        stamp += float(f"0.{m['ms']}") if m["ms"] else 0.0
        first = stamp if first is None else first
        lines.append(Line(stamp - first, m["msg"].strip()))
    return lines


def phases(text: str) -> dict[str, float]:
    """Seconds from the engine log's first line to the first line of each phase mark."""
    lines = stamped_lines(text)
    found: dict[str, float] = {}
    for name, pattern in MARKS:
        for line in lines:
            if re.search(pattern, line.msg):
                found[name] = round(line.t, 2)
                break
    # vLLM's own summaries of the expensive steps, verbatim (seconds and memory).
    found_lines = [line.msg for line in lines if re.search(r"took [\d.]+ ?s|takes [\d.]+ ?s|seconds", line.msg)]
    found["_summaries"] = found_lines  # type: ignore[assignment]
    return found


def ready_from_log(gateway_log: str, process_started: float) -> float | None:
    """Seconds from the gateway process's creation to its "Application startup complete" line (engine ready)."""
    for line in gateway_log.splitlines():
        if "Application startup complete" in line:
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            return round(stamp - process_started, 2)
    return None


def one_run(env: dict[str, str], model_dir: Path, keep: Path | None, fresh_cache: bool = False,
            label: str = "") -> dict:
    root = Path(tempfile.mkdtemp(prefix="quiver-cold-"))
    if fresh_cache:  # what every start did before the cache was kept: an empty VLLM_CACHE_ROOT
        env = {**env, "QUIVER_ENGINE_CACHE_DIR": str(root / "vllm-cache")}
    server = quiver_server(root, free_port(), env=env, model_dir=model_dir)
    server.kv_cache_gib = env.get("QUIVER_KV_CACHE_GIB", "1")
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    server.start()
    try:
        ready_s = time.monotonic() - started
        # The launcher polls /ready once a second; the gateway's own log says to the millisecond when it was.
        ready_log_s = ready_from_log(server.log_path.read_text(errors="replace"),
                                     psutil.Process(server.process.pid).create_time())
        # First token after ready: what the first caller sees (lazy work after /ready shows here).
        t0 = time.monotonic()
        server.openai(key=server.api_key).chat.completions.create(
            model=server.model_name, max_tokens=1, messages=[{"role": "user", "content": "hi"}])
        first_token_s = time.monotonic() - t0
    finally:
        server.stop()
    engine_log = (root / "state" / "engine.log").read_text(errors="replace")
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / "state" / "engine.log", keep / f"engine-{int(time.time())}.log")
    shutil.rmtree(root, ignore_errors=True)
    return {"ready_s": round(ready_s, 2), "ready_log_s": ready_log_s, "first_request_s": round(first_token_s, 3), "fresh_cache": fresh_cache,
            "label": label, "env": env,
            "load_avg_before": load_before, "load_avg": os.getloadavg()[0], "phases": phases(engine_log)}


@app.command()
def run(runs: int = 1, env: list[str] = typer.Option([], help="NAME=VALUE settings for the server"),
        model_dir: Path = DEFAULT_MODEL_DIR, json_out: Path | None = typer.Option(None, "--json"),
        keep_logs: Path | None = None,
        compare_cache: bool = typer.Option(False, help="alternate runs with an empty vLLM cache (the old way)"),
        compare_env: list[str] = typer.Option(
            [], help="NAME=VALUE: alternate runs with these settings added (side B) against --env alone (side A)")) -> None:
    """Start a fresh server `runs` times; print ready time, first-request time and the engine's phases."""
    settings = dict(item.split("=", 1) for item in env)
    other = {**settings, **dict(item.split("=", 1) for item in compare_env)}
    # A stopped benchmark must stop its server too (the `with`/`finally` blocks run on SystemExit).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = []
    sides = 2 if (compare_cache or compare_env) else 1
    for i in range(runs * sides):
        second = sides == 2 and i % 2 == 1
        fresh = compare_cache and second
        label = ("B" if second else "A") if compare_env else ""
        result = one_run(other if (compare_env and second) else settings, model_dir, keep_logs, fresh_cache=fresh,
                         label=label)
        results.append(result)
        summaries = result["phases"].pop("_summaries")
        print(f"run {i + 1}{' (empty vLLM cache)' if fresh else ''}{f' side {label}' if label else ''}: "
              f"ready {result['ready_s']} s (gateway log: {result['ready_log_s']} s), "
              f"first request {result['first_request_s']} s, load average {result['load_avg']:.1f}")
        print("  phases (s from the engine's first log line):", json.dumps(result["phases"]))
        for line in summaries:
            print("   ", line[:200])
        result["phases"]["_summaries"] = summaries
    if compare_cache:
        kept = sorted(r["ready_s"] for r in results if not r["fresh_cache"])
        empty = sorted(r["ready_s"] for r in results if r["fresh_cache"])
        print(f"median ready: kept cache {kept[len(kept) // 2]} s, empty cache {empty[len(empty) // 2]} s")
    if compare_env:
        for side in "AB":
            times = sorted(r["ready_log_s"] or r["ready_s"] for r in results if r["label"] == side)
            print(f"side {side} ({'--env' if side == 'A' else '--env + --compare-env'}): ready "
                  f"{times}, median {statistics.median(times)} s")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"env": settings, "runs": results}, indent=1))


@app.command("phases")
def phases_cmd(engine_log: Path) -> None:
    """Print the phases of an existing engine.log."""
    print(json.dumps(phases(engine_log.read_text(errors="replace")), indent=1))


if __name__ == "__main__":
    app()
