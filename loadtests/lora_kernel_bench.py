"""The engine plugin's LoRA path per layer, outside the engine: torch ops vs the compiled kernel, side by side.

SmolLM2-135M's four LoRA linears (qkv, o, gate_up, down), rank 8, 4 adapter slots, float32, a random slot per
token (a quarter without an adapter from 16 tokens up), the same tensors on both sides; each timing is the best
of `--repeats` runs of `--calls` calls, the two sides alternating. Prints microseconds per call and the ratio,
and checks the two agree.

    .venv/bin/python -m loadtests.lora_kernel_bench --tokens 1,16,64,256,2048
"""

from __future__ import annotations

import argparse
import time

import torch

from quiver.engine_plugin import lora_kernel
from quiver.engine_plugin.grouped_ops import FusedLoRA, add_lora_linear, bind_kernel, build_plan

# name: (output slices, input width) of SmolLM2-135M's LoRA linears
LAYERS = {"qkv": ((576, 192, 192), 576), "o": ((576,), 576), "gate_up": ((1536, 1536), 576), "down": ((576,), 1536)}


def best_us(call, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,16,64,256,2048", help="step sizes, comma-separated")
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    kernel = lora_kernel.load()
    if kernel is None:
        raise SystemExit("the kernel did not build (see the warning above)")
    print(f"torch threads {torch.get_num_threads()}; the kernel's passes share torch's OpenMP threads")
    print(f"{'tokens':>6} {'layer':8} {'plan':8} {'torch ops µs':>12} {'kernel µs':>10} {'speed-up':>9}")
    for num_tokens in (int(t) for t in args.tokens.split(",")):
        for name, (outs, din) in LAYERS.items():
            g = torch.Generator().manual_seed(num_tokens)
            a = tuple(torch.randn(args.slots, 1, args.rank, din, generator=g) * 0.05 for _ in outs)
            b = tuple(torch.randn(args.slots, 1, o, args.rank, generator=g) * 0.05 for o in outs)
            fused = FusedLoRA(a, b, outs, torch.float32)
            low = 0 if num_tokens < 16 else -1
            plan = build_plan(torch.randint(low, args.slots, (num_tokens,), generator=g))
            x = torch.randn(num_tokens, din, generator=g)
            y0 = torch.randn(num_tokens, sum(outs), generator=g)
            y_ops, y_kernel = y0.clone(), y0.clone()
            add_lora_linear(y_ops, x, plan, fused)
            add_lora_linear(y_kernel, x, plan, fused, kernel=kernel)
            bound = bind_kernel(kernel, fused, 1.0, lora_kernel.Step(plan.slots))  # as the engine's wrapper keeps it
            torch.testing.assert_close(y_kernel, y_ops, rtol=1e-4, atol=1e-4)
            ops_us = kernel_us = float("inf")
            for _ in range(args.repeats):
                ops_us = min(ops_us, best_us(lambda: add_lora_linear(y_ops, x, plan, fused), args.calls))
                kernel_us = min(kernel_us, best_us(lambda: bound(y_kernel, x), args.calls))
            print(f"{num_tokens:>6} {name:8} {plan.kind:8} {ops_us:>12.1f} {kernel_us:>10.1f} {ops_us / kernel_us:>8.2f}x",
                  flush=True)


if __name__ == "__main__":
    main()
