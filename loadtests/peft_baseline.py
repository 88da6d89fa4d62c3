"""The baseline a small team would hand-write instead of quiver: transformers + PEFT in one process.

Same base model, same adapters, float32, the same number of threads as the engine uses, and the same
traffic as the load generator's mixed run (each "round" is --concurrency requests that arrive together,
their models drawn uniformly over base + adapters, ~N-token prompts, exactly --max-tokens new tokens):

  swap   one request at a time, `set_adapter(name)` before each (`disable_adapter()` for the base)
  mixed  PEFT's best: each round as one batched `generate(..., adapter_names=[...])` ("__base__" = base)

Each mode runs in a fresh process so that its peak RSS is its own.

    python -m loadtests.peft_baseline --adapters /tmp/qlg/adapters/lt-0,... --mode both --json out.json
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from loadtests.loadgen import make_prompt
from loadtests.servers import DEFAULT_MODEL_DIR

BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names
app = typer.Typer(add_completion=False)


def peak_rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # ru_maxrss is KiB on Linux


def device_and_dtype(device: str = "auto") -> tuple[str, str]:
    """The device this machine has (auto: CUDA when torch sees one) and the dtype quiver serves in there
    (float32 on CPU, the settings' default; bfloat16 on a GPU, as the Helm chart sets): both sides the same."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device, "float32" if device == "cpu" else "bfloat16"


def run_mode(mode: str, model_dir: Path, adapter_dirs: list[Path], requests: int, concurrency: int,
             prompt_tokens: int, max_tokens: int, threads: int, seed: int, device: str = "auto") -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device, dtype = device_and_dtype(device)
    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"  # decoder-only batching
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device)
    names = [f"a{i}" for i in range(len(adapter_dirs))]
    load_started = time.perf_counter()
    model = PeftModel.from_pretrained(model, adapter_dirs[0], adapter_name=names[0])
    for name, folder in zip(names[1:], adapter_dirs[1:]):
        model.load_adapter(folder, adapter_name=name)
    model.to(device)
    load_s = time.perf_counter() - load_started
    model.eval()

    # The same prompts and model mix as `loadgen` (uniform over base + adapters, same seeds).
    rng, pick = random.Random(seed + 1), random.Random(seed)
    pool = [BASE, *names]
    models = [pick.choice(pool) for _ in range(requests)]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": make_prompt(rng, prompt_tokens)}],
                                             tokenize=False, add_generation_prompt=True) for _ in range(requests)]
    generate = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                    pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)

    def warm_up() -> None:
        batch = tokenizer(prompts[:2], return_tensors="pt", padding=True).to(device)
        with torch.inference_mode():
            model.generate(**batch, adapter_names=[BASE, names[0]], **{**generate, "max_new_tokens": 2,
                                                                       "min_new_tokens": 2})

    warm_up()
    latencies: list[float] = []
    tokens = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, requests, concurrency):
            round_started = time.perf_counter()  # the round's requests all arrive now
            batch_models, batch_prompts = models[first:first + concurrency], prompts[first:first + concurrency]
            if mode == "swap":
                for name, prompt in zip(batch_models, batch_prompts):
                    inputs = tokenizer(prompt, return_tensors="pt").to(device)
                    if name == BASE:
                        with model.disable_adapter():
                            out = model.generate(**inputs, **generate)
                    else:
                        model.set_adapter(name)
                        out = model.generate(**inputs, **generate)
                    tokens += out.shape[1] - inputs["input_ids"].shape[1]
                    latencies.append(time.perf_counter() - round_started)
            else:
                inputs = tokenizer(batch_prompts, return_tensors="pt", padding=True).to(device)
                out = model.generate(**inputs, adapter_names=batch_models, **generate)
                tokens += (out.shape[1] - inputs["input_ids"].shape[1]) * len(batch_prompts)
                latencies += [time.perf_counter() - round_started] * len(batch_prompts)
    wall = time.perf_counter() - started
    import numpy as np

    return {
        "mode": mode, "device": device, "dtype": dtype, "requests": requests, "concurrency": concurrency, "threads": threads,
        "adapters": len(adapter_dirs), "prompt_tokens": prompt_tokens, "max_tokens": max_tokens,
        "output_tokens": int(tokens), "wall_s": round(wall, 2), "output_tok_s": round(tokens / wall, 2),
        "e2e_ms": {f"p{p}": round(float(np.percentile(latencies, p)) * 1000, 1) for p in (50, 90, 99)},
        "adapter_load_s": round(load_s, 2), "peak_rss_gib": peak_rss_gib(),
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }


@app.command()
def main(
    adapters: Annotated[str, typer.Option(help="comma-separated PEFT adapter folders")],
    model_dir: Annotated[Path, typer.Option()] = DEFAULT_MODEL_DIR,
    mode: Annotated[str, typer.Option(help="swap | mixed | both (each in its own process)")] = "both",
    requests: Annotated[int, typer.Option()] = 32,
    concurrency: Annotated[int, typer.Option()] = 16,
    prompt_tokens: Annotated[int, typer.Option()] = 32,
    max_tokens: Annotated[int, typer.Option()] = 64,
    threads: Annotated[int, typer.Option(help="torch threads (vLLM binds every core)")] = os.cpu_count() or 1,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option(help="auto (CUDA if present) | cpu | cuda")] = "auto",
    json_out: Annotated[Optional[Path], typer.Option("--json")] = None,
) -> None:
    folders = [Path(p) for p in adapters.split(",") if p]
    if mode == "both":
        results = []
        for each in ("swap", "mixed"):
            command = [sys.executable, "-m", "loadtests.peft_baseline", "--adapters", adapters, "--model-dir",
                       str(model_dir), "--mode", each, "--requests", str(requests), "--concurrency",
                       str(concurrency), "--prompt-tokens", str(prompt_tokens), "--max-tokens", str(max_tokens),
                       "--threads", str(threads), "--seed", str(seed), "--device", device]
            out = subprocess.run(command, check=True, capture_output=True, text=True,
                                 cwd=Path(__file__).resolve().parents[1]).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
    else:
        results = [run_mode(mode, model_dir, folders, requests, concurrency, prompt_tokens, max_tokens, threads,
                            seed, device)]
    if json_out:
        json_out.write_text(json.dumps(results, indent=1))
    for result in results:
        print(json.dumps(result))


if __name__ == "__main__":
    app()
