# Written for this measurement (kept as it ran). Run from the repo root with OMP_NUM_THREADS=2 (and =1).
"""sim_bf16.py timing the kernel calls alone (perf_counter around each of the 60 a step), float32 vs bfloat16."""
import os, statistics, time, sys
import torch
from quiver.engine_plugin import lora_kernel
from quiver.engine_plugin.grouped_ops import FusedLoRA, bind_kernel, build_plan
torch.manual_seed(0)
T, S, R, L = 16, 4, 8, 30
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
K = {"f32": [0.0], "bf16": [0.0]}
pc = time.perf_counter
def run(variant):
    h = x
    acc = 0.0
    for w, binds in layers:
        y = h @ w["qkv"]
        if variant:
            t = pc(); binds["qkv"][variant](y, h); acc += pc() - t
        z = y[:, :576].contiguous()
        o = z @ w["o"]
        if variant:
            t = pc(); binds["o"][variant](o, z); acc += pc() - t
        g = o @ w["gu"]
        h2 = torch.nn.functional.silu(g[:, :1536]) * g[:, 1536:]
        h = (h2 @ w["d"]) * 0.1 + h
    return acc
for _ in range(5): run("f32"); run("bf16")
res = {"f32": [], "bf16": []}
for r in range(100):
    for s in (("f32", "bf16") if r % 2 == 0 else ("bf16", "f32")):
        res[s].append(run(s))
for s in res: print(s, "kernel ms/step", round(statistics.median(res[s]) * 1e3, 3))
