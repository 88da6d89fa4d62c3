# Written for this measurement (kept with its figures, not a maintained tool). Run: PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python <this file> [rounds]
"""Mixed vs base: one prefill wave (16 requests at once, max_tokens 1) and one-at-a-time TTFT, direct to the
engine and through the gateway, alternating, on one server."""
import asyncio, statistics, sys, time, json, random
from pathlib import Path
import aiohttp, psutil
from loadtests.servers import quiver_server, register, make_adapters, DEFAULT_MODEL_DIR, API_KEY, engine_url_from_log
from loadtests.loadgen import make_prompt
from quiver.testing import free_port

BASE = "SmolLM2-135M-Instruct"
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 20
folders = make_adapters(DEFAULT_MODEL_DIR, Path("/tmp/quiver-loadtests/adapters"), 4)
server = quiver_server(Path("/tmp/runs/prefill"), free_port(), env={"QUIVER_MAX_LORAS": "4"})
rng = random.Random(1)
prompts = [make_prompt(rng, 32) for _ in range(16)]

async def one(session, url, key, model, prompt, max_tokens=1):
    t0 = time.perf_counter()
    async with session.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                            json={"model": model, "messages": [{"role": "user", "content": prompt}],
                                  "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}) as r:
        assert r.status == 200, await r.text()
        first = None
        async for line in r.content:
            if first is None and line.startswith(b"data: {") and b'"content"' in line:
                first = time.perf_counter() - t0
        return first, time.perf_counter() - t0

async def wave(session, url, key, models):
    t0 = time.perf_counter()
    res = await asyncio.gather(*(one(session, url, key, m, p) for m, p in zip(models, prompts)))
    return time.perf_counter() - t0, statistics.median(r[0] for r in res)

async def main(names):
    direct, dkey = engine_url_from_log(server.log_path), server.engine_key
    sides = {"gw": (server.base_url, API_KEY), "direct": (direct, dkey)}
    base_models = [BASE] * 16
    mixed_models = [([BASE] + names)[i % 5] for i in range(16)]
    one_models = [names[0]] * 16
    out = {}
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            for m in (base_models, mixed_models, one_models):
                await wave(s, direct, dkey, m)
        for r in range(ROUNDS):
            for side in ("direct",):
                for label, models in (("base", base_models), ("mixed", mixed_models), ("one", one_models)):
                    w, ttft = await wave(s, *sides[side], models)
                    out.setdefault(f"wave-{side}-{label}", []).append(w * 1e3)
            # one at a time, base vs adapter, direct
            for label, m in (("base", BASE), ("adapter", names[r % 4])):
                t, _ = await one(s, direct, dkey, m, prompts[r % 16])
                out.setdefault(f"c1-{label}", []).append(t * 1e3)
    for k, v in out.items():
        print(f"{k:24s} median {statistics.median(v):8.1f} ms  min {min(v):8.1f}  (n={len(v)})")
    for side in ("direct",):
        b = out[f"wave-{side}-base"]
        for label in ("mixed", "one"):
            ratios = [x / y for x, y in zip(out[f"wave-{side}-{label}"], b)]
            print(f"{side} {label}/base wave time: median ratio {statistics.median(ratios):.3f}")

with server:
    names = [register(server.base_url, f.name, f)["id"] for f in folders]
    asyncio.run(main(names))
