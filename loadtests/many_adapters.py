"""Many adapters: Zipf traffic (s = 1.1) over 10 / 100 / 1,000 registered adapters against uniform traffic over 4,
side by side on one server per engine configuration, alternating round by round.

    HF_HUB_OFFLINE=1 .venv/bin/python -m loadtests.many_adapters --out loadtests/results/2026-12-02-many-adapters \
        --config slots4:QUIVER_MAX_LORAS=4 --config slots16:QUIVER_MAX_LORAS=16,QUIVER_MAX_CPU_LORAS=1024

Each configuration gets a fresh server (engine settings as given) over one shared store: the 1,000 adapters are
made once (`servers.make_adapters`: random rank-8 q/k/v/o tensors, milliseconds each) and registered through the
API once, in parallel; later servers find them in the store. Traffic is the comparisons' shape (32 requests x
64 output tokens, ~32-token prompts, concurrency 16). Per side: output tok/s, p99 TTFT, errors and the peak
summed RSS of the gateway and its engine processes; ratios against uniform-over-4 use the medians over rounds.
Writes `<out>/many-adapters.json`, `.md` (the table) and `.png` (throughput and p99 TTFT against the count).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import typer

from loadtests import report
from loadtests.loadgen import Workload, run_workload
from loadtests.servers import ADMIN_KEY, API_KEY, DEFAULT_MODEL_DIR, PeakRss, make_adapters, quiver_server
from quiver.testing import free_port, register_adapter

app = typer.Typer(add_completion=False)
BASE_NAME = "SmolLM2-135M-Instruct"
COUNTS = (10, 100, 1000)


def register_all(base_url: str, folders: list[Path], workers: int = 4) -> list[str]:
    """Every folder as adapter `<folder name>`, unless the server has it already; returns pinned names."""
    # One client shared by the workers (httpx.Client is thread-safe), not a client and connection per adapter:
    # registering or looking up 1,000 adapters took 18-63 s that way.
    with httpx.Client(headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120,
                      limits=httpx.Limits(max_connections=workers)) as client:
        def one(folder: Path) -> str:
            existing = client.get(f"{base_url}/v1/adapters/{folder.name}")
            if existing.status_code == 200:
                return f"{folder.name}@{existing.json()['current_version']}"
            response = register_adapter(base_url, folder.name, folder, ADMIN_KEY, client=client)
            response.raise_for_status()
            return response.json()["id"]

        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(one, folders))


class EngineQueue:
    """Samples the engine's own scheduler gauges (vllm:num_requests_running / _waiting) every 0.5 s: how many
    requests the scheduler held back, e.g. because their adapter had no free slot in the batch."""

    def __init__(self, engine_url: str, engine_key: str) -> None:
        self.url, self.headers = f"{engine_url}/metrics", {"Authorization": f"Bearer {engine_key}"}
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                try:
                    text = client.get(self.url, headers=self.headers).text
                    gauges = {name: float(value) for name, value in re.findall(
                        r"^vllm:num_requests_(running|waiting)\{[^}]*\} ([0-9.e+-]+)$", text, re.MULTILINE)}
                    if gauges:
                        self.samples.append((gauges.get("running", 0.0), gauges.get("waiting", 0.0)))
                except httpx.HTTPError:
                    pass
                self._stop.wait(0.5)

    def summary(self) -> dict:
        busy = [s for s in self.samples if s[0] + s[1] > 0]
        if not busy:
            return {"mean_running": None, "mean_waiting": None}
        return {"mean_running": round(statistics.mean(s[0] for s in busy), 1),
                "mean_waiting": round(statistics.mean(s[1] for s in busy), 1)}

    def __enter__(self) -> "EngineQueue":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_side(work: Workload, pid: int, engine: tuple[str, str]) -> dict:
    with PeakRss(pid) as rss, EngineQueue(*engine) as queue:
        result = asyncio.run(run_workload(work))
    result["peak_rss_gib"] = rss.peak_gib
    result["engine_queue"] = queue.summary()
    o = result["overall"]
    typer.echo(f"  {work.label:<28} {o['output_tok_s']:>7} tok/s  TTFT p99 {o['ttft_ms']['p99']} ms  "
               f"errors {o['errors'] or 0}  distinct {len(result['per_model'])}  RSS {rss.peak_gib} GiB  "
               f"engine running/waiting {queue.summary()}  "
               f"load {result['machine']['before']['loadavg_1_5_15']}")
    return result


def one_config(name: str, env: dict[str, str], root: Path, adapters: list[Path], rounds: int,
               work: Workload, counts: tuple[int, ...], model_dir: Path = DEFAULT_MODEL_DIR) -> dict:
    server = quiver_server(root / f"server-{name}", free_port(), env=env, model_dir=model_dir)
    server.store_dir = root / "store"  # shared by every configuration: register once
    typer.echo(f"== {name}: {env} (log {server.log_path})")
    with server:
        started = time.monotonic()
        names = register_all(server.base_url, adapters)
        typer.echo(f"  {len(names)} adapters registered/found in {time.monotonic() - started:.1f} s")
        work = replace(work, base_url=server.base_url, api_key=API_KEY)
        # Warm the uniform side's four (as compare.py's scale does); Zipf's cold ones load as traffic asks.
        asyncio.run(run_workload(replace(work, shape="distinct", adapters=names[:4], requests=4, concurrency=4,
                                         max_tokens=2, label="warm-up")))
        sides = {"uniform-4": replace(work, shape="uniform", adapters=names[:4])}
        sides |= {f"zipf-{n}": replace(work, shape="zipf", adapters=names[:n]) for n in counts}
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        engine = (server.engine_url, server.engine_key)
        for r in range(rounds):
            for side, side_work in sides.items():
                runs[side].append(run_side(replace(side_work, label=f"{name} {side} #{r + 1}", seed=r),
                                           server.process.pid, engine))
    return runs


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    def med(side: str, pick) -> float:
        return statistics.median(pick(r) for r in runs[side])

    rows = {}
    for side in runs:
        rows[side] = {
            "tok_s": med(side, lambda r: r["overall"]["output_tok_s"]),
            "ttft_p99_ms": med(side, lambda r: r["overall"]["ttft_ms"]["p99"]),
            "errors": sum(r["overall"]["errors"] for r in runs[side]),
            "peak_rss_gib": max(r["peak_rss_gib"] for r in runs[side]),
            "distinct_per_run": [len(r["per_model"]) for r in runs[side]],
            "engine_waiting_mean": [r["engine_queue"]["mean_waiting"] for r in runs[side]],
        }
    base = rows["uniform-4"]
    for row in rows.values():
        row["tok_s_ratio"] = round(row["tok_s"] / base["tok_s"], 3)
        row["ttft_p99_ratio"] = round(row["ttft_p99_ms"] / base["ttft_p99_ms"], 2)
    return rows


def table(results: dict[str, dict[str, dict]]) -> str:
    lines = ["| config | traffic | tok/s | × uniform-4 | TTFT p99 ms | × uniform-4 | errors | distinct a run | "
             "engine waiting (mean, per run) | peak RSS GiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for config, rows in results.items():
        for side, row in rows.items():
            lines.append(f"| {config} | {side} | {row['tok_s']} | {row['tok_s_ratio']} | {row['ttft_p99_ms']} | "
                         f"{row['ttft_p99_ratio']} | {row['errors']} | {row['distinct_per_run']} | {row['engine_waiting_mean']} | "
                         f"{row['peak_rss_gib']} |")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, dict]], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for config, rows in results.items():
        counts = [int(side.split("-")[1]) for side in rows if side.startswith("zipf-")]
        zipf = [rows[f"zipf-{n}"] for n in counts]
        ax1.plot(counts, [z["tok_s_ratio"] for z in zipf], marker="o", label=config)
        ax2.plot(counts, [z["ttft_p99_ratio"] for z in zipf], marker="o", label=config)
    for ax, title, target in ((ax1, "output tok/s, × uniform over 4", 0.8), (ax2, "TTFT p99, × uniform over 4", 3)):
        ax.set_xscale("log")
        ax.set_xlabel("registered adapters (Zipf s=1.1)")
        ax.set_title(title)
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)


@app.command()
def run(out: Path = typer.Option(...), config: list[str] = typer.Option(
            ["slots4:QUIVER_MAX_LORAS=4"], help="NAME:SETTING=VALUE,SETTING=VALUE (one server each)"),
        rounds: int = 2, counts: str = ",".join(map(str, COUNTS)), requests: int = 32, concurrency: int = 16,
        max_tokens: int = 64, prompt_tokens: int = 32, scratch: Path = Path("/tmp/quiver-many-adapters"),
        model_dir: Path = DEFAULT_MODEL_DIR) -> None:
    numbers = tuple(int(c) for c in counts.split(",") if c)  # "" = uniform over 4 only
    # A stopped benchmark must stop its server too (the `with`/`finally` blocks run on SystemExit).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    adapters = make_adapters(model_dir, scratch / "adapters", max(numbers, default=4))
    work = Workload(base_url="", model=BASE_NAME, requests=requests, concurrency=concurrency,
                    max_tokens=max_tokens, prompt_tokens=prompt_tokens)
    results, raw = {}, {}
    started = report.machine_state()
    for item in config:
        name, _, settings = item.partition(":")
        env = dict(pair.split("=", 1) for pair in settings.split(",") if pair)
        raw[name] = one_config(name, env, scratch, adapters, rounds, work, numbers, model_dir)
        results[name] = summarise(raw[name])
        out.mkdir(parents=True, exist_ok=True)
        text = table(results)
        typer.echo(text)
        (out / "many-adapters.md").write_text(
            f"# Many adapters: Zipf over N vs uniform over 4\n\nStarted {started}; finished {report.machine_state()}. "
            f"The machine was shared with other engineers' work: compare ratios within a configuration.\n\n"
            f"Settings: {json.dumps({k: v for k, v in (i.partition(':')[::2] for i in config)})}; rounds {rounds}; "
            f"{requests} requests x {max_tokens} tokens, concurrency {concurrency}.\n\n{text}\n")
        (out / "many-adapters.json").write_text(json.dumps(
            {"started": started, "config": config, "summary": results,
             "runs": {c: {s: [{k: v for k, v in r.items() if k != "requests"} for r in rs] for s, rs in sides.items()}
                      for c, sides in raw.items()}}, indent=1, default=str))
        plot(results, out / "many-adapters.png")


if __name__ == "__main__":
    app()
