# Written for this measurement (kept with its figures, not a maintained tool). Run: PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python <this file> [spy]  (py-spy in /tmp/pyspy: pip install --target /tmp/pyspy py-spy)
"""Where the gateway's one-at-a-time overhead goes: CPU per request of the gateway and vLLM's API server, and a py-spy of the gateway."""
import asyncio, subprocess, sys, time
from dataclasses import replace
from pathlib import Path
import psutil
from loadtests.servers import quiver_server, register, make_adapters, DEFAULT_MODEL_DIR, API_KEY, engine_url_from_log
from quiver.testing import free_port
from loadtests.compare import BASE_NAME, paired_ttft
from loadtests.loadgen import Workload
folders = make_adapters(DEFAULT_MODEL_DIR, Path("/tmp/quiver-loadtests/adapters"), 4)
server = quiver_server(Path("/tmp/runs/gwprof"), free_port(), env={"QUIVER_MAX_LORAS": "4"})
with server:
    names = [register(server.base_url, f.name, f)["id"] for f in folders]
    gw = psutil.Process(server.process.pid)
    kids = gw.children(recursive=True)
    api = [p for p in kids if "EngineCore" not in " ".join(p.cmdline()) and p.name() != "EngineCore"]
    print("gateway", gw.pid, "children", [(p.pid, p.name()) for p in kids], flush=True)
    probe = Workload(base_url=server.base_url, model=BASE_NAME, api_key=API_KEY, shape="uniform", adapters=names,
                     include_base=True, concurrency=1, requests=20, max_tokens=4)
    direct = replace(probe, base_url=engine_url_from_log(server.log_path), api_key=server.engine_key)
    asyncio.run(paired_ttft(probe, direct, 10))  # warm
    def cpu(p): return sum(p.cpu_times()[:2])
    before = {p.pid: cpu(p) for p in [gw, *kids]}
    spy = subprocess.Popen(["/tmp/pyspy/bin/py-spy", "record", "-p", str(gw.pid), "-r", "250", "-f", "raw", "-o",
                            "/tmp/off/gw-spy.txt", ], env={"PYTHONPATH": "/tmp/pyspy"},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) if len(sys.argv) > 1 else None
    n = 100
    pairs = asyncio.run(paired_ttft(probe, direct, n))
    if spy: import signal; spy.send_signal(signal.SIGINT); spy.wait()
    after = {p.pid: cpu(p) for p in [gw, *kids]}
    import statistics
    d = sorted((a - b) * 1e3 for a, b in pairs)
    print("paired median extra ms", round(statistics.median(d), 2), "quartiles", [round(q, 1) for q in statistics.quantiles(d, n=4)])
    for p in [gw, *kids]:
        print(p.pid, p.name(), "CPU ms per pair", round((after[p.pid] - before[p.pid]) / n * 1e3, 2))
