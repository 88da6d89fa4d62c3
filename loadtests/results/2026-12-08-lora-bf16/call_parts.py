# Written for this measurement (kept as it ran; its two timing loops since folded into `measure`). Run from the repo root with OMP_NUM_THREADS=2 and the venv's python.
"""A kernel call with nothing to do (no slot in use), warm and cold (a 64 MB write between calls): the whole call, its Python
checks alone, its ctypes call alone; then the ctypes call with void* arguments instead of a typed pointer."""
import time, statistics, torch, ctypes
from quiver.engine_plugin import lora_kernel
from quiver.engine_plugin.grouped_ops import FusedLoRA, bind_kernel, build_plan
T,S,R=16,4,8
lib = lora_kernel.load()
step = lora_kernel.Step(build_plan(torch.arange(T, dtype=torch.int64) % S).slots)
outs=(576,192,192)
za = tuple(torch.zeros(S, 1, R, 576) for _ in outs); zb = tuple(torch.zeros(S, 1, o, R) for o in outs)
Z = bind_kernel(lib, FusedLoRA(za, zb, outs, torch.float32), 1.0, step)
x = torch.randn(T,576); y = torch.randn(T,960)
big = torch.randn(64*1024*1024//4)
F32 = torch.float32
def checks_only(self, y, x):
    num_tokens, y_shape = self.step.num_tokens, y.shape
    if not (y.dtype is x.dtype is F32 and x.shape == (num_tokens, self.din) and len(y_shape) == 2
            and y_shape[0] == num_tokens and y_shape[1] >= self.total_out):
        return False
    y_strides, x_strides = y.stride(), x.stride()
    if y_strides[1] != 1 or x_strides[1] != 1:
        return False
    return (self._args, y.data_ptr(), y_strides[0], x.data_ptr(), x_strides[0])
args = (Z._args, y.data_ptr(), y.stride(0), x.data_ptr(), x.stride(0))
fn = Z._fn
def measure(cases):
    for mode in ("warm", "cold"):
        for name, f in cases.items():
            ts = []
            for i in range(300 if mode == "cold" else 3000):
                if mode == "cold": big.add_(1.0)
                t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
            print(mode, f"{name:20s}", "median us", round(statistics.median(ts) * 1e6, 2))
cases = {"full call": lambda: Z(y, x), "python checks only": lambda: checks_only(Z, y, x), "ctypes call only": lambda: fn(*args),
         "nothing": lambda: None}
measure(cases)
lib2 = ctypes.CDLL(lib._name)
fn2 = lib2.quiver_lora_f32_layer
fn2.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
fn2.restype = ctypes.c_int
addr = ctypes.addressof(Z._args.contents)
args2 = (addr, y.data_ptr(), y.stride(0), x.data_ptr(), x.stride(0))
cases = {"ctypes void* args": lambda: fn2(*args2), "ctypes pointer arg": lambda: fn(*args)}
measure(cases)
