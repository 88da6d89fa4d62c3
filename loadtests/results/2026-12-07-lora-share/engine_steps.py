# Written for this measurement (kept with its figures, not a maintained tool); from 2026-12-03-kernel-bound's
# engine_steps.py. Run from the repo root: PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python <this file>
"""The LoRA path's share of a decode step, in one process (vLLM's LLM, no HTTP): base-only, mixed (base + 4
adapters) and adapter-only (4 adapters, no base) runs of 32 requests x 64 tokens, 16 at a time, taking turns.
Each engine step is timed, and so is the plugin's wrapper inside it (every add_lora_* call, and the per-step
metadata update), so a step's LoRA share is measured in the step itself, not inferred from throughput."""
import collections, os, random, statistics, sys, time
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
from quiver.engine_plugin import punica_cpu
from quiver.engine_plugin.punica_cpu import QuiverPunicaWrapperCPU

# Later the same day: the wrapper skips layers no slot has weights for (`_BoundLinear.idle`). With IDLE_AB=1
# the adapter-only runs are taken twice a round, the skip on and off (every bound layer's `idle` forced False),
# side by side in this one process.
BOUND: dict[int, tuple[object, bool]] = {}
if hasattr(punica_cpu._BoundLinear, "idle"):
    _bound_init = punica_cpu._BoundLinear.__init__
    def bound_init(self, *a, **k):
        _bound_init(self, *a, **k)
        BOUND[id(self)] = (self, self.idle)
    punica_cpu._BoundLinear.__init__ = bound_init
def skip_idle(on: bool) -> None:
    for layer, idle in BOUND.values():
        layer.idle = idle and on

LORA = [0.0]  # seconds inside the wrapper, running total
STEPS: list[tuple[float, float]] = []  # (step, LoRA path inside it) per execute_model call

def lora_timed(fn):
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            LORA[0] += time.perf_counter() - t
    return wrapper

for name in ("add_lora_linear", "add_lora_logits", "add_lora_embedding", "update_metadata"):
    setattr(QuiverPunicaWrapperCPU, name, lora_timed(getattr(QuiverPunicaWrapperCPU, name)))
_execute = GPUModelRunner.execute_model
def execute_model(self, *a, **k):
    lora0, t = LORA[0], time.perf_counter()
    r = _execute(self, *a, **k)
    STEPS.append((time.perf_counter() - t, LORA[0] - lora0))
    return r
GPUModelRunner.execute_model = execute_model

ads = make_adapters(DEFAULT_MODEL_DIR, Path("/tmp/quiver-loadtests/adapters"), 4)  # compare's adapters
llm = LLM(model=str(DEFAULT_MODEL_DIR), dtype="float32", max_model_len=2048, enable_lora=True, max_loras=4,
          max_lora_rank=16, generation_config="auto", max_num_seqs=16)
params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
loras = [LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(ads)]
N = 32
SHAPES = {"base": [None], "mixed": [None, *loras], "adapters": loras}
if os.environ.get("IDLE_AB"):
    SHAPES["adapters-noskip"] = loras

def run(shape: str, seed: int) -> dict:
    rng = random.Random(seed)
    prompts = [[{"role": "user", "content": make_prompt(rng, 32)}] for _ in range(N)]
    pool = SHAPES[shape]
    skip_idle(shape != "adapters-noskip")
    STEPS.clear()
    t = time.perf_counter()
    outs = llm.chat(prompts, params, lora_request=[pool[i % len(pool)] for i in range(N)], use_tqdm=False)
    wall = time.perf_counter() - t
    assert sum(len(o.outputs[0].token_ids) for o in outs) == N * 64
    median = statistics.median(s for s, _ in STEPS)
    decode = [(s, l) for s, l in STEPS if s <= 3 * median]  # prefill steps take several times longer
    step_s, lora_s = sum(s for s, _ in decode), sum(l for _, l in decode)
    return {"tok_s": N * 64 / wall, "decode_step_ms": statistics.median(s for s, _ in decode) * 1e3,
            "decode_lora_ms": lora_s / len(decode) * 1e3, "decode_lora_share": lora_s / step_s,
            "all_lora_share": sum(l for _, l in STEPS) / sum(s for s, _ in STEPS), "decode_steps": len(decode),
            "steps": len(STEPS)}

for shape in SHAPES:
    run(shape, 99)  # warm-up: every adapter loaded, every layer bound
res = {shape: [] for shape in SHAPES}
for r in range(int(os.environ.get("ROUNDS", "6"))):
    for shape in (SHAPES if r % 2 == 0 else list(SHAPES)[::-1]):
        res[shape].append(run(shape, r))
        print(shape, r, {k: round(v, 4) for k, v in res[shape][-1].items()}, flush=True)
print()
for key in res["base"][0]:
    row = {s: statistics.median(x[key] for x in res[s]) for s in SHAPES}
    print(f"{key:18s} " + "  ".join(f"{s} {v:9.4f}" for s, v in row.items()))
print("bound layers", len(BOUND), "idle", sum(idle for _, idle in BOUND.values()))
for s in [name for name in SHAPES if name != "base"]:
    for key in ("tok_s", "decode_step_ms"):
        ratios = [y[key] / x[key] for x, y in zip(res["base"], res[s])]
        print(f"{s}/base {key}: median {statistics.median(ratios):.3f}  per round {[round(v, 3) for v in ratios]}")
