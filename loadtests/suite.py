"""The whole comparison suite in one command, on the device this machine has (CUDA if torch sees one, else CPU):

    HF_HUB_OFFLINE=1 .venv/bin/python -m loadtests.suite --out loadtests/results/$(date +%F)-suite
    .venv/bin/python -m loadtests.suite --dry-run          # print the device, settings and commands only

It runs, one after the other, each in its own process and with its own server (never two engines at once):
  1. cold_start      fresh starts to /ready with the engine's phases
  2. compare all     mixed, gateway, peft (transformers + PEFT on the same device and dtype), hot, scale
  3. many_adapters   Zipf over 10 / 100 / 1,000 adapters vs uniform over 4, with 4 engine slots and with 16

On CUDA the servers serve in bfloat16 (`QUIVER_DTYPE`, as the Helm chart's GPU default) and the PEFT baseline
runs on the GPU in the same dtype; on CPU both stay float32 with the settings' KV cache. Everything else (the
traffic, the alternation of sides, the reports) is the same code on both. `--quick` shrinks every count (a
smoke run of the same code path: the test suite runs it on CPU).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import typer

from loadtests.peft_baseline import device_and_dtype
from loadtests.servers import DEFAULT_MODEL_DIR
from quiver.common.base_model import is_prepared, prepare_default_model

REPO = Path(__file__).resolve().parents[1]
app = typer.Typer(add_completion=False)


def settings_for(device: str) -> dict[str, str]:
    """The quiver settings of every server the suite starts on `device`."""
    _, dtype = device_and_dtype(device)
    return {"QUIVER_DTYPE": dtype}  # the KV cache: the settings' size on CPU, vLLM's share of memory on a GPU


def commands(out: Path, quick: bool) -> list[tuple[str, list[str]]]:
    py = [sys.executable, "-m"]
    if quick:
        shape = ["--requests", "4", "--concurrency", "2", "--max-tokens", "4", "--prompt-tokens", "8"]
        return [
            ("cold_start", [*py, "loadtests.cold_start", "run", "--runs", "1", "--json", str(out / "cold-start.json")]),
            ("compare", [*py, "loadtests.compare", "mixed,gateway,peft,hot,scale", "--out", str(out / "compare"),
                         "--rounds", "1", "--pairs", "10", "--scale-adapters", "6", "--scratch", str(out / "scratch"),
                         *shape]),
            ("many_adapters", [*py, "loadtests.many_adapters", "--out", str(out / "many-adapters"), "--rounds", "1",
                               "--counts", "6", "--config", "slots4:QUIVER_MAX_LORAS=4",
                               "--scratch", str(out / "scratch-many"), *shape]),
        ]
    return [
        ("cold_start", [*py, "loadtests.cold_start", "run", "--runs", "2", "--json", str(out / "cold-start.json")]),
        ("compare", [*py, "loadtests.compare", "all", "--out", str(out / "compare"), "--rounds", "3"]),
        ("many_adapters", [*py, "loadtests.many_adapters", "--out", str(out / "many-adapters"), "--rounds", "2",
                           "--config", "slots4:QUIVER_MAX_LORAS=4",
                           "--config", "slots16:QUIVER_MAX_LORAS=16,QUIVER_MAX_CPU_LORAS=1024"]),
    ]


@app.command()
def main(out: Path = typer.Option(Path("loadtests/results/latest-suite")),
         device: str = typer.Option("auto", help="auto (CUDA if present) | cpu | cuda"),
         quick: bool = typer.Option(False, help="tiny counts: the same code path in minutes"),
         dry_run: bool = typer.Option(False, help="print what would run, run nothing")) -> None:
    device, dtype = device_and_dtype(device)
    env = {**os.environ, **settings_for(device), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    if quick and device == "cpu":
        env["QUIVER_KV_CACHE_GIB"] = "1"  # a smoke run beside other engines (the tests' size)
    typer.echo(f"device {device}, dtype {dtype}; settings {settings_for(device)}; results in {out}")
    plan = commands(out.resolve(), quick)
    if dry_run:
        for name, command in plan:
            typer.echo(f"{name}: {' '.join(command)}")
        return
    out.mkdir(parents=True, exist_ok=True)
    if not is_prepared(DEFAULT_MODEL_DIR):  # the scripts build adapters from the base model before any server
        typer.echo(f"preparing the default model in {DEFAULT_MODEL_DIR}")
        prepare_default_model(DEFAULT_MODEL_DIR)
    failed = []
    for name, command in plan:
        started = time.monotonic()
        typer.echo(f"== {name}: {' '.join(command)}")
        with open(out / f"{name}.log", "w") as log:
            code = subprocess.run(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
        typer.echo(f"   {'ok' if code == 0 else f'FAILED ({code})'} in {time.monotonic() - started:.0f} s "
                   f"(log {out / f'{name}.log'})")
        if code:
            failed.append(name)
    (out / "suite.txt").write_text(f"device {device}, dtype {dtype}\nfailed: {failed or 'none'}\n")
    if failed:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
