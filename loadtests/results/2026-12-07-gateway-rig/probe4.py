# Written for this measurement (kept with its figures, not a maintained tool). Run from the repo root with PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python <this file> ...
# Minimal shape, sides in rotating order: direct, a bare proxy, the gateway, and attached gateways (VARIANTS).
import asyncio, json, os, random, statistics, subprocess, sys, time
from pathlib import Path
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
import aiohttp, httpx
from loadtests.servers import quiver_server, make_adapters, register, DEFAULT_MODEL_DIR, API_KEY
from quiver.testing import free_port

sys.path.insert(0, str(Path(__file__).parent))
from rig import boot, one  # noqa: E402

async def run(sides_spec, models, n):
    rng = random.Random(3)
    words = ["alpha", "river", "stone", "cloud", "seven", "green", "table"]
    rows = []
    sessions = [aiohttp.ClientSession() for _ in sides_spec]
    try:
        sides = list(zip(sides_spec, sessions))
        for i in range(n + 10):
            model = models[i % len(models)]; prompt = rng.choice(words)
            k = i % len(sides); order = sides[k:] + sides[:k]
            if (i // len(sides)) % 2: order = order[::-1]
            rec = {}
            for (name, url, key), s in order:
                rec[name] = await one(s, url, key, prompt, model, ignore_eos=True)
            if i >= 10:
                rows.append(rec)
    finally:
        for s in sessions: await s.close()
    return rows

root = Path("/tmp/runs/probe4"); os.system(f"rm -rf {root}"); root.mkdir(parents=True)
n = int(sys.argv[1]); variants = sys.argv[2:]
procs = []
with quiver_server(root, free_port(), env={"QUIVER_MAX_LORAS": "4"}) as srv:
    folders = make_adapters(DEFAULT_MODEL_DIR, Path("/tmp/quiver-loadtests/adapters"), 4)
    names = [register(srv.base_url, f.name, f)["id"] for f in folders]
    models = ["SmolLM2-135M-Instruct", *names]
    sides = [("direct", srv.engine_url, srv.engine_key), ("gateway", srv.base_url, API_KEY)]
    bport = free_port()
    procs.append(subprocess.Popen([sys.executable, "-m", "loadtests.bare_proxy", "--port", str(bport), "--engine-url", srv.engine_url], env=dict(os.environ, BARE_PROXY_ENGINE_KEY=srv.engine_key)))
    sides.append(("bare", f"http://127.0.0.1:{bport}", srv.engine_key))
    for v in variants:
        p = free_port(); state = root / f"state-{v}"; state.mkdir()
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__).with_name("gw2.py")), str(p), srv.engine_url, srv.engine_key, str(root / "store"), str(state)],
                                      env=dict(os.environ, VARIANT=v.strip("_"), GW_KEY=API_KEY), stdout=open(state / "log", "w"), stderr=subprocess.STDOUT))
        sides.append((f"gw[{v}]", f"http://127.0.0.1:{p}", API_KEY))
    for _, url, key in sides[2:]:
        for _ in range(100):
            try:
                if httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code < 500: break
            except httpx.HTTPError: time.sleep(0.2)
    try:
        rows = asyncio.run(run(sides, models, n))
    finally:
        for p in procs: p.terminate()
json.dump(rows, open(root / "rows.json", "w"))
for a in rows[0]:
    if a == "direct": continue
    d = [(r[a] - r["direct"]) * 1e3 for r in rows]; lo, hi = boot(d)
    print(f"{a:22s} - direct: median {statistics.median(d):+.3f} ms (95% CI {lo:+.3f}..{hi:+.3f})")
for a in rows[0]:
    if a in ("direct", "bare"): continue
    d = [(r[a] - r["bare"]) * 1e3 for r in rows]; lo, hi = boot(d)
    print(f"{a:22s} - bare:   median {statistics.median(d):+.3f} ms (95% CI {lo:+.3f}..{hi:+.3f})")
print({k: round(statistics.median(r[k] for r in rows) * 1e3, 2) for k in rows[0]})
