"""What pinning the hottest adapter buys: Zipf traffic (s = 1.1) over 100 registered adapters on one server with
4 engine slots, one of them kept for pins (`QUIVER_PINNED_SLOTS=1`), the most popular adapter (`lt-0`) pinned
vs not, alternating round by round on the same server (so the machine's drift hits both sides alike).

    HF_HUB_OFFLINE=1 .venv/bin/python -m loadtests.pin_effect --out loadtests/results/2026-12-03-pinning --rounds 2

Per side: total output tok/s, p99 TTFT overall and of the pinned adapter's own requests, errors, the engine
scheduler's running/waiting gauges. The load generator, the adapters and the registration are many_adapters'.
Writes `<out>/pin-effect.json` and `.md`.
"""

from __future__ import annotations

import asyncio
import json
import signal
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx
import typer

from loadtests import report
from loadtests.loadgen import Workload
from loadtests.many_adapters import BASE_NAME, register_all, run_side
from loadtests.servers import ADMIN_KEY, API_KEY, DEFAULT_MODEL_DIR, make_adapters, quiver_server
from quiver.testing import free_port

app = typer.Typer(add_completion=False)


def set_pin(base_url: str, name: str, pinned: bool) -> None:
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120) as admin:
        state = admin.get(f"/v1/adapters/{name}").json()["pin"]
        if (state is not None) != pinned:
            admin.post(f"/v1/adapters/{name}/{'pin' if pinned else 'unpin'}").raise_for_status()


def summarise(runs: list[dict], hot: str) -> dict:
    def med(pick) -> float | None:
        values = [v for v in map(pick, runs) if v is not None]
        return statistics.median(values) if values else None

    return {
        "tok_s": med(lambda r: r["overall"]["output_tok_s"]),
        "ttft_p99_ms": med(lambda r: r["overall"]["ttft_ms"]["p99"]),
        "ttft_p50_ms": med(lambda r: r["overall"]["ttft_ms"]["p50"]),
        "hot_ttft_p99_ms": med(lambda r: r["per_model"].get(hot, {}).get("ttft_ms", {}).get("p99")),
        "hot_ttft_p50_ms": med(lambda r: r["per_model"].get(hot, {}).get("ttft_ms", {}).get("p50")),
        "hot_requests": [r["per_model"].get(hot, {}).get("requests") for r in runs],
        "errors": sum(r["overall"]["errors"] or 0 for r in runs),
        "engine_waiting_mean": [r["engine_queue"]["mean_waiting"] for r in runs],
        "per_round_tok_s": [r["overall"]["output_tok_s"] for r in runs],
        "per_round_hot_ttft_p99_ms": [r["per_model"].get(hot, {}).get("ttft_ms", {}).get("p99") for r in runs],
    }


@app.command()
def run(out: Path = typer.Option(...), rounds: int = 2, count: int = 100, requests: int = 64, concurrency: int = 16,
        max_tokens: int = 64, prompt_tokens: int = 32, settings: str = "QUIVER_MAX_LORAS=4,QUIVER_PINNED_SLOTS=1",
        scratch: Path = Path("/tmp/quiver-many-adapters"), model_dir: Path = DEFAULT_MODEL_DIR) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped benchmark stops its server too
    adapters = make_adapters(model_dir, scratch / "adapters", count)
    env = dict(pair.split("=", 1) for pair in settings.split(",") if pair)
    server = quiver_server(scratch / "server-pin-effect", free_port(), env=env, model_dir=model_dir)
    server.store_dir = scratch / "store"  # many_adapters' store: registered once
    started = report.machine_state()
    typer.echo(f"== {env} (log {server.log_path}), load {started['loadavg_1_5_15']}")
    runs: dict[str, list[dict]] = {"unpinned": [], "pinned": []}
    with server:
        t0 = time.monotonic()
        names = register_all(server.base_url, adapters)
        typer.echo(f"  {len(names)} adapters registered/found in {time.monotonic() - t0:.1f} s")
        hot = names[0]  # Zipf's most popular (`lt-0@1`)
        work = Workload(base_url=server.base_url, api_key=API_KEY, model=BASE_NAME, shape="zipf", adapters=names,
                        requests=requests, concurrency=concurrency, max_tokens=max_tokens, prompt_tokens=prompt_tokens)
        engine = (server.engine_url, server.engine_key)
        for r in range(rounds):
            # Alternate which side goes first, so neither always follows the other's cache state.
            for side in (("unpinned", "pinned") if r % 2 == 0 else ("pinned", "unpinned")):
                set_pin(server.base_url, hot.partition("@")[0], side == "pinned")
                runs[side].append(run_side(replace(work, label=f"{side} #{r + 1}", seed=r), server.process.pid,
                                           engine))
        set_pin(server.base_url, hot.partition("@")[0], False)
    summary = {side: summarise(side_runs, hot) for side, side_runs in runs.items()}
    finished = report.machine_state()
    lines = ["| side | tok/s (median) | per round | TTFT p99 ms | TTFT p50 ms | pinned adapter's TTFT p99 ms | per round "
             "| its p50 ms | its requests a run | errors | engine waiting (mean) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for side, s in summary.items():
        lines.append(f"| {side} | {s['tok_s']} | {s['per_round_tok_s']} | {s['ttft_p99_ms']} | {s['ttft_p50_ms']} | "
                     f"{s['hot_ttft_p99_ms']} | {s['per_round_hot_ttft_p99_ms']} | {s['hot_ttft_p50_ms']} | "
                     f"{s['hot_requests']} | {s['errors']} | {s['engine_waiting_mean']} |")
    text = "\n".join(lines)
    typer.echo(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pin-effect.md").write_text(
        f"# Pinning the hottest adapter: Zipf s=1.1 over {count} adapters, `{hot}` pinned vs not\n\n"
        f"Started {started}; finished {finished}. Settings: {env}; rounds {rounds} (alternating); {requests} requests "
        f"x {max_tokens} tokens, concurrency {concurrency}.\n\n{text}\n")
    (out / "pin-effect.json").write_text(json.dumps(
        {"started": started, "finished": finished, "settings": env, "hot": hot, "summary": summary,
         "runs": {side: [{k: v for k, v in r.items() if k != "requests"} for r in rs] for side, rs in runs.items()}},
        indent=1, default=str))


if __name__ == "__main__":
    app()
