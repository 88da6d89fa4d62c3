# Written for this measurement (kept with its figures, not a maintained tool). Run: HF_HUB_OFFLINE=1 .venv/bin/python <this file>
"""The engine wrapper's cost of a new mapping: SmolLM2's 30 layers x 4 LoRA linears called through
QuiverPunicaWrapperCPU.add_lora_linear, 16 decode tokens over 4 adapters + base, one step after each
update_metadata (a request joined or left) vs a step of an unchanged mapping. Median of 200 steps each."""
import statistics, time
import torch
from vllm.lora.layers import LoRAMapping
from quiver.engine_plugin.punica_cpu import QuiverPunicaWrapperCPU

LINEARS = [((576, 192, 192), 576), ((576,), 576), ((1536, 1536), 576), ((576,), 1536)]
S, R, T = 4, 8, 16
g = torch.Generator().manual_seed(0)
layers = []
for _ in range(30):
    for outs, din in LINEARS:
        attention = len(outs) == 3 or outs == (576,) and din == 576  # adapters on q, k, v, o only
        a = tuple(torch.randn(S, 1, R, din, generator=g) * (0.05 if attention else 0) for _ in outs)
        b = tuple(torch.randn(S, 1, o, R, generator=g) * (0.05 if attention else 0) for o in outs)
        layers.append((a, b, outs, torch.randn(T, din, generator=g), torch.zeros(T, sum(outs))))
wrapper = QuiverPunicaWrapperCPU(2048, 256, "cpu")
layout = [10, 11, 12, 13]
def mapping(seed):
    r = torch.Generator().manual_seed(seed)
    return [([0] + layout)[int(i)] for i in torch.randint(0, 5, (T,), generator=r)]
def step():
    t0 = time.perf_counter()
    for a, b, outs, x, y in layers:
        wrapper.add_lora_linear(y, x, a, b, 1.0, outs)
    return time.perf_counter() - t0
def new_mapping(seed):
    ids = mapping(seed)
    wrapper.update_metadata(LoRAMapping(tuple(ids), tuple(ids), is_prefill=False), layout, S + 1, 1000)
new_mapping(0); step(); step()
changed, same = [], []
for i in range(200):
    new_mapping(i + 1)
    changed.append(step())
    same.append(step())
print(f"a step's 120 LoRA linear calls, 16 tokens: after a new mapping {statistics.median(changed) * 1e3:.2f} ms, "
      f"same mapping {statistics.median(same) * 1e3:.2f} ms")
