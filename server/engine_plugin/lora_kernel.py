"""Build and load `lora_kernel.c`, the engine plugin's one-call CPU LoRA path.

The source is compiled once per machine (about half a second) with the system C compiler (`$CC`, else cc,
gcc or clang; the CPU image has gcc for torch's inductor already), for this CPU's instruction set, into a
cache keyed by the source, the flags and the CPU's feature flags, so a cache on a volume shared by different
CPUs never loads code built for another. No compiler, a failed build or `QUIVER_CPU_LORA_KERNEL=0`:
`load()` returns None and the torch ops in grouped_ops run instead (same results within float rounding).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

from . import switch_on

ENV_SWITCH = "QUIVER_CPU_LORA_KERNEL"
ENV_CACHE = "QUIVER_KERNEL_CACHE"
SOURCE = Path(__file__).with_name("lora_kernel.c")
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-shared", "-fPIC")
BUILD_TIMEOUT_S = 120

logger = logging.getLogger("vllm.quiver_cpu_lora")


def enabled_by_env() -> bool:
    return switch_on(ENV_SWITCH)


def cache_dir() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "quiver" / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return os.uname().machine


def library_path(source: bytes) -> Path:
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + _cpu_flags().encode()).hexdigest()[:16]
    return cache_dir() / f"quiver_lora_{key}.so"


def build(source_path: Path = SOURCE) -> Path:
    """The compiled library's path, building it first if it is not cached. Raises on failure."""
    source = source_path.read_bytes()
    target = library_path(source)
    if target.exists():
        return target
    names = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    compiler = next((found for found in map(shutil.which, names) if found), None)
    if compiler is None:
        raise RuntimeError(f"no C compiler on PATH (tried {', '.join(names)})")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: engines starting together never load a half-written file.
    fd, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, "-o", partial, str(source_path)], check=True, capture_output=True,
                       text=True, timeout=BUILD_TIMEOUT_S)
        os.replace(partial, target)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"building {source_path.name} failed: {exc.stderr.strip()[-2000:]}") from exc
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


@cache
def load() -> ctypes.CDLL | None:
    """The kernel library, or None (switched off, or it could not be built: logged once)."""
    if not enabled_by_env():
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except Exception as exc:  # any failure means "use the torch ops", never a broken engine
        logger.warning("quiver CPU LoRA kernel unavailable, using torch ops: %s", exc)
        return None
    fn = lib.quiver_lora_f32
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, ptr, i64, i64, i64, ptr, ptr, i64, i64, i64, ptr, i64, ptr, ptr, ctypes.c_float]
    fn.restype = ctypes.c_int
    return lib


def add_lora_f32(lib: ctypes.CDLL, y, x, a_t, b_t, num_slots: int, n_slices: int, rank: int, slice_sizes, slots,
                 in_use, scale: float) -> bool:
    """y[t, :total_out] += scale * x[t] @ A_s^T @ B_s^T for each token t whose slot s (`slots`, int64, -1 for
    none) is in use (`in_use`, uint8 per slot), through the kernel. False, with y untouched, when the
    tensors are not laid out as the kernel reads them (then the caller uses the torch ops)."""
    f32 = torch.float32
    num_tokens, din = x.shape
    if not (y.dtype == x.dtype == a_t.dtype == b_t.dtype == f32 and y.dim() == x.dim() == 2
            and y.stride(1) == 1 and x.stride(1) == 1 and a_t.is_contiguous() and b_t.is_contiguous()
            and slots.dtype == torch.int64 and slots.is_contiguous() and slots.numel() == num_tokens
            and y.shape[0] == num_tokens and y.shape[1] >= b_t.shape[1] and a_t.shape[0] == din
            and in_use.numel() == num_slots and in_use.dtype == torch.uint8 and a_t.device.type == "cpu"
            # the kernel reads raw pointers: every extent it derives must be the tensors' own
            and a_t.shape[1] == b_t.shape[0] == num_slots * n_slices * rank
            and slice_sizes.dtype == torch.int64 and slice_sizes.numel() == n_slices):
        return False
    rc = lib.quiver_lora_f32(y.data_ptr(), y.stride(0), x.data_ptr(), x.stride(0), num_tokens, din,
                             a_t.data_ptr(), b_t.data_ptr(), num_slots, n_slices, rank, slice_sizes.data_ptr(),
                             b_t.shape[1], slots.data_ptr(), in_use.data_ptr(), scale)
    return rc == 0
