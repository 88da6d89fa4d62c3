# Written for this measurement (kept with its figures, not a maintained tool). Run from the repo root with PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python <this file> ...
# Gateway variants against a fake upstream (no engine jitter): direct, bare proxy, attached gateways.
# argv: n variant...   env THRASH_MB
import asyncio, json, os, random, statistics, subprocess, sys, time
from pathlib import Path
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
import aiohttp, httpx
from quiver.testing import free_port, API_KEY

async def one(s, url, key, prompt, model="SmolLM2-135M-Instruct", **extra):
    """One streamed 1-token completion; its time to the first data line (probe4.py uses it too)."""
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": True, **extra}
    t0 = time.perf_counter()
    async with s.post(url + "/v1/completions", headers={"Authorization": f"Bearer {key}"}, json=body) as r:
        assert r.status == 200, (url, await r.text())
        first = None
        async for line in r.content:
            if first is None and line.startswith(b"data: {"):
                first = time.perf_counter()
        return first - t0

async def run(sides_spec, n):
    rng = random.Random(3); words = ["alpha", "river", "stone", "cloud", "seven", "green", "table"]
    rows = []; sessions = [aiohttp.ClientSession() for _ in sides_spec]
    try:
        sides = list(zip(sides_spec, sessions))
        for i in range(n + 20):
            prompt = rng.choice(words); k = i % len(sides); order = sides[k:] + sides[:k]
            if (i // len(sides)) % 2: order = order[::-1]
            rec = {}
            for (name, url, key), s in order:
                rec[name] = await one(s, url, key, prompt)
                await asyncio.sleep(0.002)
            if i >= 20: rows.append(rec)
    finally:
        for s in sessions: await s.close()
    return rows

def boot(diffs, k=2000):
    rng = random.Random(1); meds = sorted(statistics.median(rng.choices(diffs, k=len(diffs))) for _ in range(k))
    return meds[int(0.025 * k)], meds[int(0.975 * k)]

def wait(url, key):
    for _ in range(300):
        try:
            if httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code < 500: return
        except httpx.HTTPError: pass
        time.sleep(0.1)
    raise RuntimeError(url)

if __name__ == "__main__":
    n = int(sys.argv[1]); variants = sys.argv[2:]
    root = Path("/tmp/runs/rig"); os.system(f"rm -rf {root}"); root.mkdir(parents=True)
    procs = []
    try:
        up = f"http://127.0.0.1:{(uport := free_port())}"
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__).with_name("fakeup.py")), str(uport)]))
        sides = [("direct", up, "k")]
        bport = free_port()
        procs.append(subprocess.Popen([sys.executable, "-m", "loadtests.bare_proxy", "--port", str(bport), "--engine-url", up], env=dict(os.environ, BARE_PROXY_ENGINE_KEY="k")))
        sides.append(("bare", f"http://127.0.0.1:{bport}", "k"))
        for v in variants:
            p = free_port(); state = root / f"state-{v}"; state.mkdir()
            procs.append(subprocess.Popen([sys.executable, str(Path(__file__).with_name("gw2.py")), str(p), up, "k", str(root / "store"), str(state)],
                                          env=dict(os.environ, VARIANT=v.strip("_"), GW_KEY=API_KEY), stdout=open(state / "log", "w"), stderr=subprocess.STDOUT))
            sides.append((f"gw[{v}]", f"http://127.0.0.1:{p}", API_KEY))
        for _, url, key in sides: wait(url, key)
        rows = asyncio.run(run(sides, n))
    finally:
        for p in procs: p.terminate()
    json.dump(rows, open(root / "rows.json", "w"))
    for base in ("direct", "bare"):
        for a in rows[0]:
            if a in ("direct", base): continue
            d = [(r[a] - r[base]) * 1e3 for r in rows]; lo, hi = boot(d)
            print(f"{a:22s} - {base:6s}: median {statistics.median(d):+.3f} ms (95% CI {lo:+.3f}..{hi:+.3f})")
    print({k: round(statistics.median(r[k] for r in rows) * 1e3, 3) for k in rows[0]})
    def stages(path):
        recs = [json.loads(l) for l in open(path) if l.strip()][-n:]
        keys = ["asgi", "reqid", "gate", "bodylimit", "route", "parsed", "handler", "post", "hdr", "returned", "respcall", "streamtask", "start", "chunk", "out", "end"]
        out = {}
        for a, b in zip(keys, keys[1:]):
            vals = [(r[b] - r[a]) / 1e3 for r in recs if a in r and b in r]
            if vals: out[f"{a}->{b}"] = round(statistics.median(vals), 1)
        return out
    for v in variants:
        if "trace" in v: print(v, "us", stages(root / f"state-{v}" / "trace.jsonl"))
