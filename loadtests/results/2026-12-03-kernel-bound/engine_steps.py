# Written for this measurement (kept with its figures, not a maintained tool). Run: PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python <this file>
"""Per-step engine time, base vs mixed, in one process: decode steps of 16 tokens, median per run."""
import os, sys, time, random, statistics, collections
os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="2", OMP_PLACES="{0,1}", OMP_PROC_BIND="true",
                  VLLM_CPU_OMP_THREADS_BIND="0-1", VLLM_CPU_KVCACHE_SPACE="2", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1")
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
sys.path.insert(0, "/work/main")
from loadtests.loadgen import make_prompt
TIMES = collections.defaultdict(list)
def timed(name, fn):
    def w(self, *a, **k):
        t = time.perf_counter(); r = fn(self, *a, **k); TIMES[name].append(time.perf_counter() - t); return r
    return w
for name in ("execute_model", "_model_forward", "sample_tokens", "_prepare_inputs"):
    if hasattr(GPUModelRunner, name):
        setattr(GPUModelRunner, name, timed(name, getattr(GPUModelRunner, name)))
from quiver.engine_plugin.punica_cpu import QuiverPunicaWrapperCPU
from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
from vllm.model_executor.layers.linear import UnquantizedLinearMethod
SUMS = collections.Counter()
def summed(name, fn):
    def w(*a, **k):
        t = time.perf_counter(); r = fn(*a, **k); SUMS[name] += time.perf_counter() - t; return r
    return w
_orig = QuiverPunicaWrapperCPU.add_lora_linear
def _lin(self, y, x, *a, **k):
    t = time.perf_counter(); r = _orig(self, y, x, *a, **k); dt = time.perf_counter() - t
    key = "lora16" if x.shape[0] <= 16 else "loraBig"
    SUMS[key] += dt; SUMS[key + "_n"] += 1e-3
    return r
QuiverPunicaWrapperCPU.add_lora_linear = _lin
from quiver.engine_plugin import lora_kernel as _lk
_ob = _lk.bind
def _bind(*a):
    SUMS["binds_n"] += 1e-3; return _ob(*a)
_lk.bind = _bind
_oc = _lk.Layer.__call__
def _call(self, y, x):
    t = time.perf_counter(); r = _oc(self, y, x); dt = time.perf_counter() - t
    key = "kcall16" if x.shape[0] <= 16 else "kcallBig"
    SUMS[key] += dt; SUMS[key + "_n"] += 1e-3
    return r
_lk.Layer.__call__ = _call
_um = QuiverPunicaWrapperCPU.update_metadata
def _upd(self, *a, **k):
    SUMS["update_metadata_n"] += 1e-3; t = time.perf_counter(); r = _um(self, *a, **k); SUMS["update_metadata"] += time.perf_counter() - t; return r
QuiverPunicaWrapperCPU.update_metadata = _upd
BaseLinearLayerWithLoRA.apply = summed("lora_layer.apply", BaseLinearLayerWithLoRA.apply)
UnquantizedLinearMethod.apply = summed("base_gemm", UnquantizedLinearMethod.apply)
model = "/root/.cache/quiver/models/SmolLM2-135M-Instruct"
ads = [f"/tmp/quiver-loadtests/adapters/lt-{i}" for i in range(4)]
llm = LLM(model=model, dtype="float32", max_model_len=2048, enable_lora=True, max_loras=4, max_lora_rank=16,
          generation_config="auto", max_num_seqs=16)
sp = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
loras = [LoRARequest(f"a{i}", i + 1, p) for i, p in enumerate(ads)]
N = 32
def run(shape, seed):
    rng = random.Random(seed)
    prompts = [[{"role": "user", "content": make_prompt(rng, 32)}] for _ in range(N)]
    pool = [None] + loras
    reqs = [None] * N if shape == "base" else [pool[i % 5] for i in range(N)]
    TIMES.clear(); SUMS.clear()
    t = time.perf_counter()
    llm.chat(prompts, sp, lora_request=reqs, use_tqdm=False)
    wall = time.perf_counter() - t
    # decode steps: the fast ones (prefill steps take far longer); use the lower 80 %
    ex = sorted(TIMES["execute_model"]); fw = sorted(TIMES["_model_forward"])
    keep = lambda v: statistics.median(v[: int(len(v) * 0.8)])
    per_step = {k + "_ms/step": v / len(ex) * 1e3 for k, v in SUMS.items()}
    med = statistics.median(ex)
    big = [v for v in ex if v > 3 * med]
    per_step["prefill_steps_n"] = len(big); per_step["prefill_s_total"] = sum(big); per_step["decode_s_total"] = sum(v for v in ex if v <= 3 * med)
    return {**per_step, "wall": wall, "exec_ms": keep(ex) * 1e3, "fwd_ms": keep(fw) * 1e3, "steps": len(ex),
            **{k: statistics.median(v) * 1e3 for k, v in TIMES.items() if k not in ("execute_model", "_model_forward")}}
run("mixed", 99)
res = {"base": [], "mixed": []}
for r in range(int(os.environ.get("ROUNDS", "6"))):
    for shape in res:
        res[shape].append(run(shape, r)); print(shape, r, {k: round(v, 2) for k, v in res[shape][-1].items()}, flush=True)
for key in res["base"][0]:
    b = statistics.median(x[key] for x in res["base"]); m = statistics.median(x[key] for x in res["mixed"])
    print(f"{key:16s} base {b:8.2f} mixed {m:8.2f} mixed/base {m / b:.3f}  per round {[round(y[key] / x[key], 3) for x, y in zip(res['base'], res['mixed'])]}")
