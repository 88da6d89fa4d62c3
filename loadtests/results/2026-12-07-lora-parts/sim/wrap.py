"""A decode step in miniature through the wrapper itself (add_lora_linear for qkv, o, and the MLP's two idle
layers), cold as in the engine (the base GEMMs in between); the previous commit's wrapper vs this one."""
import os, statistics, sys, time, torch
sys.path.insert(0, "/tmp/oldpkg")  # the previous commit's server/engine_plugin, copied to /tmp/oldpkg/oldplugin
from quiver.engine_plugin.punica_cpu import QuiverPunicaWrapperCPU as New
from quiver.engine_plugin import grouped_ops
from oldplugin.punica_cpu import QuiverPunicaWrapperCPU as Old
from oldplugin import grouped_ops as old_ops
torch.manual_seed(0)
T, S, R, L = 16, 4, 16, 30
slots = torch.arange(T, dtype=torch.int64) % S
wrappers = {}
for name, cls, ops in (("old", Old, old_ops), ("new", New, grouped_ops)):
    w = cls(4096, 16, "cpu")
    w._plan = ops.build_plan(slots); w._step.set(w._plan.slots); w._slot_ids = (1, 2, 3, 4)
    wrappers[name] = w
def stacked(outs, din, active):
    a = tuple(torch.zeros(S, 1, R, din) for _ in outs)
    b = tuple(torch.zeros(S, 1, o, R) for o in outs)
    if active:
        for t in a: t[:, :, :8] = torch.randn(S, 1, 8, din) * 0.05
        for t in b: t[:, :, :, :8] = torch.randn(S, 1, t.shape[2], 8) * 0.05
    return a, b
layers = []
for _ in range(L):
    w = {"qkv": torch.randn(576, 960) * .02, "o": torch.randn(576, 576) * .02, "gu": torch.randn(576, 3072) * .02,
         "d": torch.randn(1536, 576) * .02}
    lw = {"qkv": ((576, 192, 192),) + stacked((576, 192, 192), 576, True), "o": ((576,),) + stacked((576,), 576, True),
          "gu": ((1536, 1536),) + stacked((1536, 1536), 576, False), "d": ((576,),) + stacked((576,), 1536, False)}
    layers.append((w, lw))
x = torch.randn(T, 576)
def run(side):
    wr = wrappers.get(side)
    h = x
    for w, lw in layers:
        y = h @ w["qkv"]
        if wr: outs, a, b = lw["qkv"]; wr.add_lora_linear(y, h, a, b, 1.0, outs)
        z = y[:, :576].contiguous()
        o = z @ w["o"]
        if wr: outs, a, b = lw["o"]; wr.add_lora_linear(o, z, a, b, 1.0, outs)
        g = o @ w["gu"]
        if wr: outs, a, b = lw["gu"]; wr.add_lora_linear(g, o, a, b, 1.0, outs)
        h2 = torch.nn.functional.silu(g[:, :1536]) * g[:, 1536:]
        dn = h2 @ w["d"]
        if wr: outs, a, b = lw["d"]; wr.add_lora_linear(dn, h2, a, b, 1.0, outs)
        h = dn * 0.1 + h
    return h
ref = run("old"); assert torch.equal(ref, run("new"))
sides = [None, "old", "new"]
times = {s: [] for s in sides}
for _ in range(5): [run(s) for s in sides]
for r in range(int(os.environ.get("ROUNDS", 200))):
    for s in (sides if r % 2 == 0 else sides[::-1]):
        t = time.perf_counter(); run(s); times[s].append(time.perf_counter() - t)
base = statistics.median(times[None])
print("bound", {k: len(w._bound) for k, w in wrappers.items()}, "base", round(base * 1e3, 3))
for s in sides[1:]:
    d = statistics.median(a - b for a, b in zip(times[s], times[None]))
    print(f"{s:4s} extra {d*1e3:.3f} ms ({d/base*100:.2f} %)")
d = [a - b for a, b in zip(times["new"], times["old"])]
print(f"new - old: median {statistics.median(d)*1e3:+.3f} ms")
