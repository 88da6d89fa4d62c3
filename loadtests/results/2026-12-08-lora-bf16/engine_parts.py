# Written for this measurement (kept with its figures, not a maintained tool); from 2026-12-07-lora-parts'
# engine_parts.py, plus the bfloat16 variant (VARIANTS=bf16). Run from the repo root: PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python <this file>
"""Where the adapter-only LoRA path's time in a decode step goes: the whole wrapper (every add_lora_* call
and the metadata update), the compiled kernel's calls inside it, and the rest (Python around the kernel).
Variants taken in turns in one process: base-only; adapter-only with the kernel as shipped (OpenMP passes);
with the same source built serial (VARIANTS=serial), swapped into every bound layer between runs; with the
kernel reading bfloat16 copies of every bound layer's weights (VARIANTS=bf16: what --lora-dtype bfloat16 gives the
kernel, the same code path; only the bytes it reads differ), swapped in the same way; with no slot in use
(VARIANTS=empty: every call made, no pass). TARGETS=q_proj,k_proj,v_proj,o_proj: vLLM wraps only those layers
(--lora-target-modules), for the whole process. MIXED=1: also base and the four adapters in turn, as
`compare mixed` sends them."""
import ctypes, os, random, statistics, sys, time
os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="2", OMP_PLACES="{0,1}", OMP_PROC_BIND="true",
                  VLLM_CPU_OMP_THREADS_BIND="0-1", VLLM_CPU_KVCACHE_SPACE="2", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1")
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from pathlib import Path
REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
from loadtests.loadgen import make_prompt
from loadtests.servers import DEFAULT_MODEL_DIR, make_adapters
from quiver.engine_plugin import lora_kernel, punica_cpu
from quiver.engine_plugin.punica_cpu import QuiverPunicaWrapperCPU

LORA, KERNEL, MANAGE = [0.0], [0.0], [0.0]
STEPS: list[tuple[float, float, float, float]] = []

def timed(fn, acc):
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            acc[0] += time.perf_counter() - t
    return wrapper

for name in ("add_lora_linear", "add_lora_logits", "add_lora_embedding", "update_metadata"):
    setattr(QuiverPunicaWrapperCPU, name, timed(getattr(QuiverPunicaWrapperCPU, name), LORA))
lora_kernel.Layer.__call__ = timed(lora_kernel.Layer.__call__, KERNEL)
LAYERS: list = []
_bind = lora_kernel.bind
def bind(*a, **k):
    layer = _bind(*a, **k)
    if layer is not None:
        LAYERS.append(layer)
    return layer
lora_kernel.bind = bind
punica_cpu.bind_kernel.__globals__["lora_kernel"].bind = bind

_execute = GPUModelRunner.execute_model
def execute_model(self, *a, **k):
    l0, k0, m0, t = LORA[0], KERNEL[0], MANAGE[0], time.perf_counter()
    r = _execute(self, *a, **k)
    STEPS.append((time.perf_counter() - t, LORA[0] - l0, KERNEL[0] - k0, MANAGE[0] - m0))
    return r
GPUModelRunner.execute_model = execute_model
# vLLM's own per-step LoRA bookkeeping (the batch's adapters and token mapping handed to its manager)
GPUModelRunner.set_active_loras = timed(GPUModelRunner.set_active_loras, MANAGE)

LIBS = {"omp": lora_kernel.load()}
def load_variant(flags, source=lora_kernel.SOURCE):
    lib = ctypes.CDLL(str(lora_kernel._compile("gcc", flags, source.read_bytes(), source)))
    lib.quiver_lora_f32_layer.argtypes = LIBS["omp"].quiver_lora_f32_layer.argtypes
    lib.quiver_lora_f32_layer.restype = ctypes.c_int
    return lib
if "serial" in os.environ.get("VARIANTS", ""):
    LIBS["serial"] = load_variant(lora_kernel.FLAGS)
for name in ("bf16", "empty"):
    if name in os.environ.get("VARIANTS", ""):
        LIBS[name] = None
if os.environ.get("VARIANT_SOURCE"):  # another build of the kernel, e.g. with prefetches
    LIBS["variant"] = load_variant(lora_kernel.FLAGS + ("-fopenmp",), Path(os.environ["VARIANT_SOURCE"]))
WEIGHTS: dict[int, tuple] = {}  # id(layer) -> (a, b, a16, b16)
IN_USE: dict[int, tuple] = {}  # id(layer) -> (its in_use pointer, an all-zero in_use)
import torch
def use(lib_name):
    for layer in LAYERS:
        layer._fn = LIBS["omp" if lib_name in ("bf16", "empty") else lib_name].quiver_lora_f32_layer
        a, b = layer._keep[:2]
        if id(layer) not in WEIGHTS:
            WEIGHTS[id(layer)] = (a, b, a.bfloat16().contiguous(), b.bfloat16().contiguous())
        a, b, a16, b16 = WEIGHTS[id(layer)]
        args = layer._args.contents
        wide = lib_name != "bf16"
        args.a, args.b = (a.data_ptr(), b.data_ptr()) if wide else (a16.data_ptr(), b16.data_ptr())
        args.weight_bf16 = 0 if wide else 1
        # VARIANTS=empty: the same calls with no slot in use, so the kernel makes no pass (the outputs are the
        # base model's): what a call costs in the engine before any LoRA arithmetic or weight read
        if id(layer) not in IN_USE:
            IN_USE[id(layer)] = (args.in_use, torch.zeros(args.num_slots, dtype=torch.uint8))
        args.in_use = IN_USE[id(layer)][1].data_ptr() if lib_name == "empty" else IN_USE[id(layer)][0]

ads = make_adapters(DEFAULT_MODEL_DIR, Path("/tmp/quiver-loadtests/adapters"), 4)  # compare's adapters
llm = LLM(model=str(DEFAULT_MODEL_DIR), dtype="float32", max_model_len=2048, enable_lora=True, max_loras=4,
          max_lora_rank=16, generation_config="auto", max_num_seqs=16,
          **({"lora_target_modules": os.environ["TARGETS"].split(",")} if os.environ.get("TARGETS") else {}))
params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
loras = [LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(ads)]
N = 32
SHAPES = {"base": ([None], "omp"), "adapters": (loras, "omp")}
if os.environ.get("MIXED"):  # compare's mixed traffic: base and the four adapters in turn
    SHAPES["mixed"] = ([None, *loras], "omp")
for v in LIBS:
    if v != "omp":
        SHAPES[f"adapters-{v}"] = (loras, v)

def run(shape: str, seed: int) -> dict:
    rng = random.Random(seed)
    prompts = [[{"role": "user", "content": make_prompt(rng, 32)}] for _ in range(N)]
    pool, lib = SHAPES[shape]
    use(lib)
    STEPS.clear()
    t = time.perf_counter()
    outs = llm.chat(prompts, params, lora_request=[pool[i % len(pool)] for i in range(N)], use_tqdm=False)
    wall = time.perf_counter() - t
    assert sum(len(o.outputs[0].token_ids) for o in outs) == N * 64
    median = statistics.median(x[0] for x in STEPS)
    decode = [x for x in STEPS if x[0] <= 3 * median]
    n = len(decode)
    return {"tok_s": N * 64 / wall, "decode_step_ms": statistics.median(x[0] for x in decode) * 1e3,
            "wrapper_ms": sum(x[1] for x in decode) / n * 1e3, "kernel_ms": sum(x[2] for x in decode) / n * 1e3,
            "manage_ms": sum(x[3] for x in decode) / n * 1e3,
            "wrapper_share": sum(x[1] for x in decode) / sum(x[0] for x in decode)}

for shape in SHAPES:
    run(shape, 99)
huge = [l for l in Path("/proc/self/smaps_rollup").read_text().splitlines() if l.startswith(("Rss", "AnonHuge"))]
print("bound layers", len(LAYERS), "THP_MEM_ALLOC_ENABLE", os.environ.get("THP_MEM_ALLOC_ENABLE"), huge)
res = {shape: [] for shape in SHAPES}
for r in range(int(os.environ.get("ROUNDS", "6"))):
    for shape in (SHAPES if r % 2 == 0 else list(SHAPES)[::-1]):
        res[shape].append(run(shape, r))
        print(shape, r, {k: round(v, 4) for k, v in res[shape][-1].items()}, flush=True)
print()
for key in res["base"][0]:
    row = {s: statistics.median(x[key] for x in res[s]) for s in SHAPES}
    print(f"{key:16s} " + "  ".join(f"{s} {v:9.4f}" for s, v in row.items()))
for s in [name for name in SHAPES if name != "base"]:
    ratios = [y["decode_step_ms"] / x["decode_step_ms"] for x, y in zip(res["base"], res[s])]
    print(f"{s}/base decode_step_ms: median {statistics.median(ratios):.3f}  per round {[round(v, 3) for v in ratios]}")
