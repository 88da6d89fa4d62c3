import asyncio, subprocess, sys, time
from dataclasses import replace
from pathlib import Path
import psutil
from loadtests.servers import quiver_server, register, API_KEY
from quiver.testing import free_port
from loadtests.compare import BASE_NAME
from loadtests.loadgen import Workload, run_workload
root = Path("/tmp/runs/prof-server")
server = quiver_server(root, free_port(), env={"QUIVER_MAX_LORAS": "4"})
with server:
    names = [register(server.base_url, f"lt-{i}", Path(f"/tmp/quiver-loadtests/adapters/lt-{i}"))["id"] for i in range(4)]
    core = [p for p in psutil.process_iter(["name", "cmdline"]) if "EngineCore" in (p.info["name"] or "") or any("EngineCore" in c for c in (p.info["cmdline"] or []))]
    pid = core[0].pid
    print("engine core", pid, names, flush=True)
    work = Workload(base_url=server.base_url, model=BASE_NAME, api_key=API_KEY, requests=96, concurrency=16, max_tokens=64, prompt_tokens=32)
    asyncio.run(run_workload(replace(work, shape="uniform", adapters=names, include_base=True, requests=16, label="warm")))
    for label, w in (("base", replace(work, shape="base", label="base")),
                     ("mixed", replace(work, shape="uniform", adapters=names, include_base=True, label="mixed"))):
        spy = subprocess.Popen(["/tmp/pyspy/bin/py-spy", "record", "-p", str(pid), "-d", "25", "-r", "100", "-f", "raw",
                                "-o", f"/tmp/runs/prof-{label}.txt", "--nonblocking"], env={"PYTHONPATH": "/tmp/pyspy"})
        r = asyncio.run(run_workload(w))
        spy.wait()
        print(label, r["overall"]["output_tok_s"], flush=True)
