# Written for this measurement (kept with its figures, not a maintained tool). Run from the repo root with PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python <this file>
"""Does a lower CPU priority for the engine's processes cut the gateway's one-at-a-time overhead?
Blocks of paired probes on one server, the engine's threads at nice 0 and nice N in turn."""
import asyncio, os, statistics, sys
from dataclasses import replace
from pathlib import Path
import psutil
from loadtests.servers import quiver_server, register, make_adapters, DEFAULT_MODEL_DIR, API_KEY, engine_url_from_log
from quiver.testing import free_port
from loadtests.compare import BASE_NAME, paired_ttft
from loadtests.loadgen import Workload
NICE = int(sys.argv[1]) if len(sys.argv) > 1 else 10
BLOCKS = int(sys.argv[2]) if len(sys.argv) > 2 else 6
PAIRS = int(sys.argv[3]) if len(sys.argv) > 3 else 100
folders = make_adapters(DEFAULT_MODEL_DIR, Path("/tmp/quiver-loadtests/adapters"), 4)
server = quiver_server(Path("/tmp/runs/nice"), free_port(), env={"QUIVER_MAX_LORAS": "4"})

def renice(procs, value):
    for p in procs:
        for t in os.listdir(f"/proc/{p.pid}/task"):
            os.setpriority(os.PRIO_PROCESS, int(t), value)

with server:
    names = [register(server.base_url, f.name, f)["id"] for f in folders]
    gw = psutil.Process(server.process.pid)
    kids = gw.children(recursive=True)
    probe = Workload(base_url=server.base_url, model=BASE_NAME, api_key=API_KEY, shape="uniform", adapters=names,
                     include_base=True, concurrency=1, requests=20, max_tokens=4)
    direct = replace(probe, base_url=engine_url_from_log(server.log_path), api_key=server.engine_key)
    asyncio.run(paired_ttft(probe, direct, 10))
    results = {0: [], NICE: []}
    for b in range(BLOCKS):
        value = NICE if b % 2 else 0
        renice(gw.children(recursive=True), value)
        pairs = asyncio.run(paired_ttft(probe, direct, PAIRS))
        d = [(a - c) * 1e3 for a, c in pairs]
        results[value] += d
        print(f"block {b} nice {value}: median extra {statistics.median(d):.2f} ms, direct TTFT median "
              f"{statistics.median(c for _, c in pairs)*1e3:.1f} ms", flush=True)
    for value, d in results.items():
        print(f"nice {value}: paired median extra {statistics.median(d):.2f} ms quartiles "
              f"{[round(q, 1) for q in statistics.quantiles(d, n=4)]} n={len(d)}")
