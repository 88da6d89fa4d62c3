# Written for this measurement (kept as it ran). Run from the repo root with OMP_NUM_THREADS=2 (and =1) and the
# venv's python.
"""One qkv-shaped kernel call (16 tokens, 4 slots, rank 8), warm and cold (a 64 MB write between calls evicts
every cache), with float32 and bfloat16 weights of the same values; then a call with no slot in use (no pass: the
call's fixed cost alone)."""
import time, statistics, torch
from quiver.engine_plugin import lora_kernel
from quiver.engine_plugin.grouped_ops import FusedLoRA, bind_kernel, build_plan
T,S,R=16,4,8
lib = lora_kernel.load()
step = lora_kernel.Step(build_plan(torch.arange(T, dtype=torch.int64) % S).slots)
outs=(576,192,192)
a = tuple((torch.randn(S, 1, R, 576) * .05).bfloat16() for _ in outs)
b = tuple((torch.randn(S, 1, o, R) * .05).bfloat16() for o in outs)
Ls = {"f32": bind_kernel(lib, FusedLoRA(tuple(t.float() for t in a), tuple(t.float() for t in b),outs,torch.float32),1.0,step),
      "bf16": bind_kernel(lib, FusedLoRA(a,b,outs,torch.float32),1.0,step)}
x = torch.randn(T,576); y = torch.randn(T,960)
big = torch.randn(64*1024*1024//4)
for mode in ("warm", "cold"):
  for k, L in Ls.items():
    ts=[]
    for i in range(300 if mode == "cold" else 3000):
        if mode == "cold": big.add_(1.0)
        t=time.perf_counter()
        L(y,x)
        ts.append(time.perf_counter()-t)
    print(mode, k, "median us", round(statistics.median(ts)*1e6, 2))
za = tuple(torch.zeros(S, 1, R, 576) for _ in outs); zb = tuple(torch.zeros(S, 1, o, R) for o in outs)
Z = bind_kernel(lib, FusedLoRA(za, zb, outs, torch.float32), 1.0, step)
for mode in ("warm", "cold"):
    ts=[]
    for i in range(300 if mode == "cold" else 3000):
        if mode == "cold": big.add_(1.0)
        t=time.perf_counter(); Z(y,x); ts.append(time.perf_counter()-t)
    print(mode, "empty call median us", round(statistics.median(ts)*1e6, 2))
