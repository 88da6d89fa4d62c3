# Written for this measurement (kept with its figures, not a maintained tool). Run from the repo root with PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python <this file>
"""Where the gateway's one-at-a-time TTFT overhead goes: client-seen TTFT through the gateway and direct, and the
gateway's own view (quiver_time_to_first_token_seconds: from the handler's start to the engine's first chunk)."""
import asyncio, re, statistics, sys
from dataclasses import replace
from pathlib import Path
import httpx
from loadtests.servers import quiver_server, register, make_adapters, DEFAULT_MODEL_DIR, API_KEY, ADMIN_KEY, engine_url_from_log
from quiver.testing import free_port
from loadtests.compare import BASE_NAME, paired_ttft
from loadtests.loadgen import Workload
PAIRS = int(sys.argv[1]) if len(sys.argv) > 1 else 300
folders = make_adapters(DEFAULT_MODEL_DIR, Path("/tmp/quiver-loadtests/adapters"), 4)
server = quiver_server(Path("/tmp/runs/gwdecomp"), free_port(), env={"QUIVER_MAX_LORAS": "4"})
def ttft_metric(url):
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
    s = sum(float(m) for m in re.findall(r'^quiver_time_to_first_token_seconds_sum\{[^}]*\} (\S+)', text, re.M))
    c = sum(float(m) for m in re.findall(r'^quiver_time_to_first_token_seconds_count\{[^}]*\} (\S+)', text, re.M))
    return s, c
with server:
    names = [register(server.base_url, f.name, f)["id"] for f in folders]
    probe = Workload(base_url=server.base_url, model=BASE_NAME, api_key=API_KEY, shape="uniform", adapters=names,
                     include_base=True, concurrency=1, requests=20, max_tokens=4)
    direct = replace(probe, base_url=engine_url_from_log(server.log_path), api_key=server.engine_key)
    asyncio.run(paired_ttft(probe, direct, 20))
    s0, c0 = ttft_metric(server.base_url)
    pairs = asyncio.run(paired_ttft(probe, direct, PAIRS))
    s1, c1 = ttft_metric(server.base_url)
    gw = [a * 1e3 for a, _ in pairs]; d = [b * 1e3 for _, b in pairs]
    inner = (s1 - s0) / (c1 - c0) * 1e3
    print(f"pairs {len(pairs)}: paired median extra {statistics.median(a - b for a, b in zip(gw, d)):.2f} ms")
    print(f"means: client via gateway {statistics.mean(gw):.2f} ms, direct {statistics.mean(d):.2f} ms, "
          f"gateway's own (handler start -> first engine chunk) {inner:.2f} ms over {c1 - c0:.0f}")
    print(f"=> before the handler + after the first chunk: {statistics.mean(gw) - inner:.2f} ms; "
          f"the hop to the engine and back (gateway's own - direct): {inner - statistics.mean(d):.2f} ms")
