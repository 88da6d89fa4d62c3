# Written for this measurement (kept with its figures, not a maintained tool). Run from the repo root with PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python <this file>
import json, os, statistics, subprocess, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from loadtests.servers import make_adapters, register, DEFAULT_MODEL_DIR, ADMIN_KEY, API_KEY, engine_url_from_log
from quiver.testing import free_port
import httpx
root = Path("/tmp/runs/trace"); os.system(f"rm -rf {root}"); (root / "state").mkdir(parents=True)
port = free_port(); trace = root / "trace.jsonl"
env = dict(os.environ, HF_HUB_OFFLINE="1", QUIVER_PORT=str(port), QUIVER_MODEL_CACHE_DIR=str(DEFAULT_MODEL_DIR.parent),
           QUIVER_STORE_DIR=str(root / "store"), QUIVER_STATE_DIR=str(root / "state"), QUIVER_FINETUNING_DIR=str(root / "ft"),
           QUIVER_ADMIN_KEYS=ADMIN_KEY, QUIVER_API_KEYS=API_KEY, QUIVER_MAX_LORAS="4", TRACE_OUT=str(trace), PYTHONPATH=str(Path(__file__).resolve().parents[3]))
log = open(root / "state" / "gateway.log", "ab")
proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("gw_traced.py"))], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
base = f"http://127.0.0.1:{port}"
try:
    for _ in range(600):
        try:
            if httpx.get(base + "/ready").status_code == 200: break
        except httpx.HTTPError: pass
        time.sleep(0.5)
    if os.environ.get("RT"):  # 2026-12-07, later: the gateway's threads on SCHED_FIFO at this priority once ready
        subprocess.run(["chrt", "-f", "-a", "-p", os.environ["RT"], str(proc.pid)], check=True)
    folders = make_adapters(DEFAULT_MODEL_DIR, Path("/tmp/quiver-loadtests/adapters"), 4)
    names = [register(base, f.name, f)["id"] for f in folders]
    key = open(root / "state" / "gateway.log").read()
    direct = engine_url_from_log(root / "state" / "gateway.log")
    import re
    from quiver.testing import QuiverServer
    # the engine's key: as QuiverServer.engine_key reads it
    srv = QuiverServer(model_dir=DEFAULT_MODEL_DIR, store_dir=root / "store", state_dir=root / "state"); srv.process = proc
    dkey = srv.engine_key
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    trace.write_text("")
    subprocess.run([sys.executable, str(Path(__file__).with_name("client.py")), base, API_KEY, direct, dkey,
                    ",".join(["SmolLM2-135M-Instruct", *names]), str(n), str(root / "client.json")], check=True)
finally:
    os.killpg(proc.pid, 15); proc.wait(30)
client = json.load(open(root / "client.json"))
server = [json.loads(l) for l in open(trace) if l.strip()][-len(client):]
ms = lambda a, b: (b - a) / 1e6
rows = {"client send -> asgi entry": [], "asgi -> handler": [], "handler -> post": [], "post -> engine headers": [],
        "headers -> first chunk in": [], "chunk in -> chunk out (send called)": [], "send call duration": [],
        "chunk out -> client first": [], "gateway TTFT (client)": [], "direct TTFT": [], "paired extra": [],
        "gateway's engine leg (post -> chunk in) - direct TTFT": []}
for c, s in zip(client, server):
    rows["client send -> asgi entry"].append(ms(c["g_send"], s["asgi"]))
    rows["asgi -> handler"].append(ms(s["asgi"], s["handler"]))
    rows["handler -> post"].append(ms(s["handler"], s["post"]))
    rows["post -> engine headers"].append(ms(s["post"], s["headers"]))
    rows["headers -> first chunk in"].append(ms(s["headers"], s["chunk_in"]))
    rows["chunk in -> chunk out (send called)"].append(ms(s["chunk_in"], s["out"]))
    rows["send call duration"].append(ms(s["out"], s["out_done"]))
    rows["chunk out -> client first"].append(ms(s["out"], c["g_first"]))
    rows["gateway TTFT (client)"].append(ms(c["g_send"], c["g_first"]))
    rows["direct TTFT"].append(ms(c["d_send"], c["d_first"]))
    rows["paired extra"].append(ms(c["d_send"], c["d_first"]) * -1 + ms(c["g_send"], c["g_first"]))
    rows["gateway's engine leg (post -> chunk in) - direct TTFT"].append(ms(s["post"], s["chunk_in"]) - ms(c["d_send"], c["d_first"]))
for k, v in rows.items():
    q = statistics.quantiles(v, n=4)
    print(f"{k:55s} median {statistics.median(v):8.3f} ms  quartiles {q[0]:8.3f} {q[2]:8.3f}  mean {statistics.mean(v):8.3f}")
