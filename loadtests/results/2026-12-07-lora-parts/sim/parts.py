"""sim.py's step with each kernel call timed: cold (as in the engine), then the same call again at once (warm)."""
import os, statistics, time, torch
exec(open(__import__("pathlib").Path(__file__).with_name("sim.py")).read().split("x = torch.randn(T, 576)")[0])
x = torch.randn(T, 576)
cold, warm, empty = [], [], []
def run():
    h = x
    for w, binds in layers:
        y = h @ w["qkv"]
        for name, out, inp in (("qkv", y, h),):
            k = binds[name]["shipped"]
            t0 = time.perf_counter(); k(out, inp); t1 = time.perf_counter(); k(out, inp); t2 = time.perf_counter()
            cold.append(t1 - t0); warm.append(t2 - t1)
        z = y[:, :576].contiguous()
        o = z @ w["o"]
        g = o @ w["gu"]
        h2 = torch.nn.functional.silu(g[:, :1536]) * g[:, 1536:]
        h = (h2 @ w["d"]) * 0.1 + h
for _ in range(50): run()
print(f"qkv call: cold {statistics.median(cold)*1e6:.1f} us, warm {statistics.median(warm)*1e6:.1f} us")
