"""Profile the engine core under mixed traffic with the LoRA kernel on and off (py-spy --native)."""
import asyncio, subprocess, sys, gzip, collections
from dataclasses import replace
from pathlib import Path
import psutil
from loadtests.servers import quiver_server, register, make_adapters, DEFAULT_MODEL_DIR, API_KEY
from quiver.testing import free_port
from loadtests.compare import BASE_NAME
from loadtests.loadgen import Workload, run_workload
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
folders = make_adapters(DEFAULT_MODEL_DIR, Path("/tmp/quiver-loadtests/adapters"), 4)

def share(path):
    tot = lora = 0
    for line in gzip.open(path, "rt"):
        stack, _, n = line.rstrip().rpartition(" "); n = int(n); tot += n
        if "add_lora_linear" in stack: lora += n
    return tot, lora

for side, env in (("kernel", {}), ("torch-ops", {"QUIVER_CPU_LORA_KERNEL": "0"})):
    server = quiver_server(Path(f"/tmp/runs/prof-{side}"), free_port(), env={"QUIVER_MAX_LORAS": "4", **env})
    with server:
        names = [register(server.base_url, f.name, f)["id"] for f in folders]
        core = [p for p in psutil.process_iter(["name", "cmdline"]) if "EngineCore" in (p.info["name"] or "") or any("EngineCore" in c for c in (p.info["cmdline"] or []))]
        pid = core[0].pid
        work = Workload(base_url=server.base_url, model=BASE_NAME, api_key=API_KEY, requests=96, concurrency=16, max_tokens=64, prompt_tokens=32)
        asyncio.run(run_workload(replace(work, shape="uniform", adapters=names, include_base=True, requests=16, label="warm")))
        for label, w in (("base", replace(work, shape="base", label="base")),
                         ("mixed", replace(work, shape="uniform", adapters=names, include_base=True, label="mixed"))):
            raw = out / f"{side}-{label}-native.txt"
            spy = subprocess.Popen(["/tmp/pyspy/bin/py-spy", "record", "-p", str(pid), "-d", "25", "-r", "100", "-f", "raw",
                                    "--native", "-o", str(raw)], env={"PYTHONPATH": "/tmp/pyspy"},
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            r = asyncio.run(run_workload(w))
            spy.wait()
            subprocess.run(["gzip", "-f", str(raw)])
            tot, lora = share(str(raw) + ".gz")
            print(f"{side} {label}: {r['overall']['output_tok_s']} tok/s; add_lora_linear {lora}/{tot} = {lora / max(tot, 1):.1%} of samples", flush=True)
