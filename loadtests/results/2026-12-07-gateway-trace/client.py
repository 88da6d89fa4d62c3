# Written for this measurement (kept with its figures, not a maintained tool). Run from the repo root with PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python <this file>
import asyncio, json, sys, time, random
import aiohttp
gw, gkey, direct, dkey, models, n, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5].split(","), int(sys.argv[6]), sys.argv[7]
async def one(s, url, key, model, prompt):
    t0 = time.monotonic_ns()
    async with s.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 4,
                            "temperature": 0, "ignore_eos": True, "stream": True}) as r:
        first = None
        async for line in r.content:
            if first is None and line.startswith(b"data: {"):
                first = time.monotonic_ns()
        return t0, first
async def main():
    rng = random.Random(3)
    recs = []
    async with aiohttp.ClientSession() as sg, aiohttp.ClientSession() as sd:
        for i in range(n + 10):
            model = models[i % len(models)]; prompt = " ".join(rng.choice(["alpha", "river", "stone", "cloud", "seven"]) for _ in range(30))
            if i % 2:
                d = await one(sd, direct, dkey, model, prompt); g = await one(sg, gw, gkey, model, prompt)
            else:
                g = await one(sg, gw, gkey, model, prompt); d = await one(sd, direct, dkey, model, prompt)
            if i >= 10:
                recs.append({"g_send": g[0], "g_first": g[1], "d_send": d[0], "d_first": d[1]})
    json.dump(recs, open(out, "w"))
asyncio.run(main())
