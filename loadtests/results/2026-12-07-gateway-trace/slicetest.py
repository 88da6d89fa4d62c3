# Written for this measurement (kept with its figures, not a maintained tool). Run from the repo root with PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python <this file>
"""Does a short EEVDF slice for the gateway's threads (sched_setattr's sched_runtime, Linux >= 6.12) cut its
one-at-a-time overhead? Blocks of paired probes on one server, the gateway at the default slice and at a short one."""
import asyncio, ctypes, os, statistics, sys
from dataclasses import replace
from pathlib import Path
import psutil
from loadtests.servers import quiver_server, register, make_adapters, DEFAULT_MODEL_DIR, API_KEY, engine_url_from_log
from quiver.testing import free_port
from loadtests.compare import BASE_NAME, paired_ttft
from loadtests.loadgen import Workload
SLICE_US = int(sys.argv[1]) if len(sys.argv) > 1 else 100
BLOCKS = int(sys.argv[2]) if len(sys.argv) > 2 else 6
PAIRS = int(sys.argv[3]) if len(sys.argv) > 3 else 100
WHO = sys.argv[4] if len(sys.argv) > 4 else "gateway"
libc = ctypes.CDLL(None, use_errno=True)
class SchedAttr(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("sched_policy", ctypes.c_uint32), ("sched_flags", ctypes.c_uint64),
                ("sched_nice", ctypes.c_int32), ("sched_priority", ctypes.c_uint32), ("sched_runtime", ctypes.c_uint64),
                ("sched_deadline", ctypes.c_uint64), ("sched_period", ctypes.c_uint64),
                ("sched_util_min", ctypes.c_uint32), ("sched_util_max", ctypes.c_uint32)]
def set_slice(tid, ns):
    attr = SchedAttr(size=ctypes.sizeof(SchedAttr), sched_policy=0, sched_runtime=ns)
    if libc.syscall(314, tid, ctypes.byref(attr), 0) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
def get_slice(tid):
    attr = SchedAttr()
    libc.syscall(315, tid, ctypes.byref(attr), ctypes.sizeof(SchedAttr), 0)
    return attr.sched_runtime
folders = make_adapters(DEFAULT_MODEL_DIR, Path("/tmp/quiver-loadtests/adapters"), 4)
server = quiver_server(Path("/tmp/runs/slice"), free_port(), env={"QUIVER_MAX_LORAS": "4"})
with server:
    names = [register(server.base_url, f.name, f)["id"] for f in folders]
    gw = psutil.Process(server.process.pid)
    kids = gw.children(recursive=True)
    api = [p for p in kids if "api_server" in " ".join(p.cmdline())]
    targets = [gw] + (api if WHO == "both" else [])
    default_ns = get_slice(gw.pid)
    print("default slice ns", default_ns, "targets", [p.pid for p in targets], flush=True)
    probe = Workload(base_url=server.base_url, model=BASE_NAME, api_key=API_KEY, shape="uniform", adapters=names,
                     include_base=True, concurrency=1, requests=20, max_tokens=4)
    direct = replace(probe, base_url=engine_url_from_log(server.log_path), api_key=server.engine_key)
    asyncio.run(paired_ttft(probe, direct, 10))
    results = {"default": [], "short": []}
    for b in range(BLOCKS):
        label = "short" if b % 2 else "default"
        for p in targets:
            for t in os.listdir(f"/proc/{p.pid}/task"):
                set_slice(int(t), SLICE_US * 1000 if label == "short" else default_ns)
        pairs = asyncio.run(paired_ttft(probe, direct, PAIRS))
        d = [(a - c) * 1e3 for a, c in pairs]
        results[label] += d
        print(f"block {b} {label}: median extra {statistics.median(d):.2f} ms, direct TTFT median "
              f"{statistics.median(c for _, c in pairs)*1e3:.1f} ms, gateway {statistics.median(a for a, _ in pairs)*1e3:.1f}", flush=True)
    for label, d in results.items():
        print(f"{label}: paired median extra {statistics.median(d):.2f} ms quartiles "
              f"{[round(q, 1) for q in statistics.quantiles(d, n=4)]} n={len(d)}")
