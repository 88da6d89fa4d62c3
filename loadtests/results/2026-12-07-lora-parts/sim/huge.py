"""sim.py with the kernel's weights in one arena: with THP_MEM_ALLOC_ENABLE=1 torch backs it with 2 MB pages."""
import os, statistics, time, torch
exec(open(__import__("pathlib").Path(__file__).with_name("sim.py")).read().split("x = torch.randn(T, 576)")[0])
from quiver.engine_plugin import lora_kernel as lk
sizes = []
for w, binds in layers:
    for name in ("qkv", "o"):
        layer = binds[name]["shipped"]
        a, b, ss, iu = layer._keep
        sizes.append((a.numel(), b.numel()))
total = sum(x + y for x, y in sizes)
arena = torch.empty(total + 1024 * 1024)  # > 2 MB: huge pages when THP_MEM_ALLOC_ENABLE=1
off = 0
for w, binds in layers:
    for name in ("qkv", "o"):
        layer = binds[name]["shipped"]
        a, b, ss, iu = layer._keep
        av = arena[off:off + a.numel()].view(a.shape); off += a.numel(); av.copy_(a)
        bv = arena[off:off + b.numel()].view(b.shape); off += b.numel(); bv.copy_(b)
        binds[name]["arena"] = lk.bind(libs["shipped"], av, bv, ss, iu, layer._args.contents.scale, step)
x = torch.randn(T, 576)
exec("def run(variant):" + open(__import__("pathlib").Path(__file__).with_name("sim.py")).read().split("def run(variant):")[1].split("sides = [")[0])
sides = [None, "shipped", "arena"]
times = {s: [] for s in sides}
for _ in range(5): [run(s) for s in sides]
for r in range(int(os.environ.get("ROUNDS", 200))):
    for s in (sides if r % 2 == 0 else sides[::-1]):
        t = time.perf_counter(); run(s); times[s].append(time.perf_counter() - t)
base = statistics.median(times[None])
print("AnonHuge", [l for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHuge")], "base", round(base * 1e3, 3))
for s in sides[1:]:
    d = statistics.median(a - b for a, b in zip(times[s], times[None]))
    print(f"{s:10s} extra {d*1e3:.3f} ms ({d/base*100:.2f} %)")
