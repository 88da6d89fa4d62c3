"""Engine configurations side by side: cold start, base-only and mixed throughput, peak RSS, one fresh server per
side and round, sides alternating (A B A B ...), so a shared machine's noise hits them alike.

    HF_HUB_OFFLINE=1 .venv/bin/python -m loadtests.engine_configs --rounds 3 \\
        --config 3-procs:QUIVER_ENGINE_WORKER_IN_CORE=false --config 2-procs:QUIVER_ENGINE_WORKER_IN_CORE=true \\
        --out loadtests/results/2026-12-02-engine-configs

What a setting that changes the engine's processes or priority costs or buys cannot be compared on one server;
this starts a server per side (`QUIVER_MAX_LORAS=4`, the default 2 GiB KV cache unless a config sets it), times
its start to /ready, registers and warms 4 adapters, then runs the comparisons' traffic (32 requests x 64 tokens,
concurrency 16): base only, then base + 4 adapters, then one request at a time (4 tokens) through the gateway
and straight to its engine in turn. Ratios are of medians over rounds, against the first config.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import psutil
import typer

from loadtests.compare import BASE_NAME
from loadtests.loadgen import Workload, run_workload
from loadtests.servers import DEFAULT_MODEL_DIR, PeakRss, make_adapters, quiver_server, register
from quiver.testing import free_port

app = typer.Typer(add_completion=False)
PROBE_ROUNDS = 5  # x 4 requests a side, alternating gateway / direct


def parse_config(text: str) -> tuple[str, dict[str, str]]:
    """`name:NAME=VALUE,NAME=VALUE` (values may not hold commas)."""
    name, _, rest = text.partition(":")
    settings = dict(item.split("=", 1) for item in rest.split(",") if item)
    return name, settings


def engine_cpu_s(gateway_pid: int) -> float:
    """User + system CPU seconds so far of the gateway's descendants (the engine's processes)."""
    total = 0.0
    for proc in psutil.Process(gateway_pid).children(recursive=True):
        try:
            total += sum(proc.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def one_side(name: str, env: dict[str, str], adapters_dir: Path, work: Workload, seed: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix=f"quiver-cfg-{name}-"))
    server = quiver_server(root, free_port(), env={"QUIVER_MAX_LORAS": "4", **env})
    load_before = os.getloadavg()
    started = time.monotonic()
    server.start()
    ready_s = time.monotonic() - started
    try:
        names = [register(server.base_url, folder.name, folder)["id"]
                 for folder in make_adapters(DEFAULT_MODEL_DIR, adapters_dir, 4)]
        base = replace(work, base_url=server.base_url, api_key=server.api_key, seed=seed)
        asyncio.run(run_workload(replace(base, shape="distinct", adapters=[BASE_NAME, *names], requests=5,
                                         concurrency=4, max_tokens=2, label="warm-up")))
        with PeakRss(server.process.pid) as rss:
            cpu_before = engine_cpu_s(server.process.pid)
            base_run = asyncio.run(run_workload(replace(base, shape="base", label=f"{name} base")))
            cpu_base = engine_cpu_s(server.process.pid)
            mixed_run = asyncio.run(run_workload(replace(base, shape="uniform", adapters=names, include_base=True,
                                                         label=f"{name} mixed")))
            cpu_mixed = engine_cpu_s(server.process.pid)
        # One request at a time, through the gateway and straight to the engine in turn: what the gateway adds
        # to the first token when nothing else is queued (the engine's priority decides who gets the core).
        solo = replace(base, shape="uniform", adapters=names, include_base=True, concurrency=1, requests=4,
                       max_tokens=4)
        gateway_c1, direct_c1 = [], []
        for i in range(PROBE_ROUNDS):
            for side, target in ((gateway_c1, solo), (direct_c1, replace(solo, base_url=server.engine_url,
                                                                          api_key=server.engine_key))):
                result = asyncio.run(run_workload(replace(target, seed=seed * 100 + i, label="c1")))
                side.extend(r["ttft_s"] * 1e3 for r in result["records"] if r.get("ttft_s") is not None)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    side = {
        "config": name, "env": env, "ready_s": round(ready_s, 2),
        "base_tok_s": base_run["overall"]["output_tok_s"], "mixed_tok_s": mixed_run["overall"]["output_tok_s"],
        # CPU seconds of the engine's processes per 1,000 output tokens: what a token costs, much less swayed
        # by other users of the machine than tok/s (time waiting for a core is not counted).
        "base_cpu_s_per_1k_tok": round((cpu_base - cpu_before) / base_run["overall"]["output_tokens"] * 1e3, 2),
        "mixed_cpu_s_per_1k_tok": round((cpu_mixed - cpu_base) / mixed_run["overall"]["output_tokens"] * 1e3, 2),
        "base_ttft_p50_ms": base_run["overall"]["ttft_ms"]["p50"],
        "mixed_ttft_p50_ms": mixed_run["overall"]["ttft_ms"]["p50"],
        "errors": (base_run["overall"]["errors"] or 0) + (mixed_run["overall"]["errors"] or 0),
        "c1_ttft_p50_gateway_ms": round(statistics.median(gateway_c1), 2),
        "c1_ttft_p50_direct_ms": round(statistics.median(direct_c1), 2),
        "peak_rss_gib": rss.peak_gib, "load_before": load_before, "load_after": os.getloadavg(),
    }
    typer.echo(f"  {name:<14} ready {side['ready_s']:>6} s  base {side['base_tok_s']:>7} tok/s  "
               f"mixed {side['mixed_tok_s']:>7} tok/s  CPU s/1k tok base {side['base_cpu_s_per_1k_tok']} mixed "
               f"{side['mixed_cpu_s_per_1k_tok']}  c1 TTFT gateway/direct {side['c1_ttft_p50_gateway_ms']}/"
               f"{side['c1_ttft_p50_direct_ms']} ms  errors {side['errors']}  RSS {side['peak_rss_gib']} GiB  "
               f"load {load_before[0]:.1f}")
    return side


def summarize(configs: list[str], sides: list[dict]) -> list[str]:
    def med(name: str, key: str) -> float:
        return round(statistics.median(s[key] for s in sides if s["config"] == name), 2)

    first = configs[0]
    lines = ["| config | ready s (median) | base tok/s | mixed tok/s | mixed/base | base vs first | mixed vs first "
             "| engine CPU s / 1k tok, base / mixed | c1 TTFT p50 gateway - direct, ms | peak RSS GiB | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in configs:
        base, mixed = med(name, "base_tok_s"), med(name, "mixed_tok_s")
        lines.append(
            f"| {name} | {med(name, 'ready_s')} ({', '.join(str(s['ready_s']) for s in sides if s['config'] == name)})"
            f" | {base} | {mixed} | {mixed / base:.3f} | {base / med(first, 'base_tok_s'):.3f}"
            f" | {mixed / med(first, 'mixed_tok_s'):.3f}"
            f" | {med(name, 'base_cpu_s_per_1k_tok')} / {med(name, 'mixed_cpu_s_per_1k_tok')}"
            f" | {med(name, 'c1_ttft_p50_gateway_ms') - med(name, 'c1_ttft_p50_direct_ms'):+.1f}"
            f" | {max(s['peak_rss_gib'] for s in sides if s['config'] == name)}"
            f" | {sum(s['errors'] for s in sides if s['config'] == name)} |")
    loads = [s["load_before"][0] for s in sides]
    lines.append(f"\nLoad average (1 min) before each side: {min(loads):.1f}-{max(loads):.1f}.")
    return lines


@app.command()
def main(config: Annotated[list[str], typer.Option(help="name:NAME=VALUE,... (first = the reference)")],
         rounds: int = 3, out: Path = Path("loadtests/results/latest-engine-configs"),
         requests: int = 32, concurrency: int = 16, max_tokens: int = 64, prompt_tokens: int = 32,
         scratch: Path = Path("/tmp/quiver-loadtests")) -> None:
    parsed = [parse_config(c) for c in config]
    work = Workload(base_url="", model=BASE_NAME, requests=requests, concurrency=concurrency,
                    max_tokens=max_tokens, prompt_tokens=prompt_tokens)
    sides = []
    for r in range(rounds):
        typer.echo(f"round {r + 1}")
        for name, env in parsed:
            sides.append(one_side(name, env, scratch / "adapters", work, seed=r))
            out.mkdir(parents=True, exist_ok=True)
            (out / "engine-configs.json").write_text(json.dumps({"sides": sides}, indent=1))
    lines = summarize([name for name, _ in parsed], sides)
    (out / "engine-configs.md").write_text("\n".join(lines) + "\n")
    typer.echo("\n".join(lines))


if __name__ == "__main__":
    app()
