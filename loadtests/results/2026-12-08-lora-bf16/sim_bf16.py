# Written for this measurement (kept as it ran, with the kernel-only timing of a second script folded in as
# TIME=kernel). Run from the repo root with OMP_NUM_THREADS=2 (or 1) and the venv's python.
"""A decode step in miniature (as 2026-12-07-lora-parts/sim/sim.py): SmolLM2-135M's 30 layers of fp32 GEMMs
(16 tokens) with the LoRA kernel after qkv and o (4 slots, rank 8, 4 tokens a slot), against the same GEMMs alone;
the kernel reading float32 weights, and bfloat16 copies of them (--lora-dtype bfloat16), in alternating turns.
TIME=kernel: the 60 kernel calls of a step timed alone (perf_counter around each), float32 against bfloat16."""
import os, statistics, time
import torch
from quiver.engine_plugin import lora_kernel
from quiver.engine_plugin.grouped_ops import FusedLoRA, bind_kernel, build_plan
torch.manual_seed(0)
T, S, R, L = 16, 4, 8, 30
KERNEL_ONLY = os.environ.get("TIME") == "kernel"
lib = lora_kernel.load()
step = lora_kernel.Step(build_plan(torch.arange(T, dtype=torch.int64) % S).slots)
layers = []
for _ in range(L):
    w = {"qkv": torch.randn(576, 960) * .02, "o": torch.randn(576, 576) * .02, "gu": torch.randn(576, 3072) * .02,
         "d": torch.randn(1536, 576) * .02}
    binds = {}
    for name, outs in (("qkv", (576, 192, 192)), ("o", (576,))):
        a = tuple((torch.randn(S, 1, R, 576) * .05).bfloat16() for _ in outs)
        b = tuple((torch.randn(S, 1, o, R) * .05).bfloat16() for o in outs)
        binds[name] = {"f32": bind_kernel(lib, FusedLoRA(tuple(t.float() for t in a), tuple(t.float() for t in b),
                                                         outs, torch.float32), 1.0, step),
                       "bf16": bind_kernel(lib, FusedLoRA(a, b, outs, torch.float32), 1.0, step)}
    layers.append((w, binds))
x = torch.randn(T, 576)
pc = time.perf_counter
def run(variant):
    """The step's output, and the time its kernel calls took."""
    h, spent = x, 0.0
    for w, binds in layers:
        y = h @ w["qkv"]
        if variant:
            t = pc(); binds["qkv"][variant](y, h); spent += pc() - t
        z = y[:, :576].contiguous()
        o = z @ w["o"]
        if variant:
            t = pc(); binds["o"][variant](o, z); spent += pc() - t
        g = o @ w["gu"]
        h2 = torch.nn.functional.silu(g[:, :1536]) * g[:, 1536:]
        h = (h2 @ w["d"]) * 0.1 + h
    return h, spent
assert torch.equal(run("f32")[0], run("bf16")[0])
sides = ["f32", "bf16"] if KERNEL_ONLY else [None, "f32", "bf16"]
times = {s: [] for s in sides}
for _ in range(5): [run(s) for s in sides]
for r in range(int(os.environ.get("ROUNDS", 100 if KERNEL_ONLY else 200))):
    for s in (sides if r % 2 == 0 else sides[::-1]):
        t = pc(); spent = run(s)[1]; times[s].append(spent if KERNEL_ONLY else pc() - t)
if KERNEL_ONLY:
    for s in sides:
        print(s, "kernel ms/step", round(statistics.median(times[s]) * 1e3, 3))
else:
    base = statistics.median(times[None])
    print(f"torch threads {torch.get_num_threads()}  base step {base*1e3:.3f} ms")
    for s in sides[1:]:
        m = statistics.median(times[s])
        d = statistics.median(a - b for a, b in zip(times[s], times[None]))
        print(f"{s:6s} step {m*1e3:.3f} ms  extra {d*1e3:.3f} ms ({d/base*100:.2f} %)")
