"""Build and load `lora_kernel.c`, the engine plugin's one-call CPU LoRA path.

The source is compiled once per machine (about half a second) with the system C compiler (`$CC`, else cc,
gcc or clang; the CPU image has gcc for torch's inductor already), for this CPU's instruction set, into a
cache keyed by the source, the flags and the CPU's feature flags, so a cache on a volume shared by different
CPUs never loads code built for another. With GCC it is built with OpenMP (`openmp_flags`), so a call's passes
share the engine's own OpenMP threads; should that build fail, it is built serial. No compiler, a failed build or
`QUIVER_CPU_LORA_KERNEL=0`:
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
# What the kernel's weights may be (its activations are float32): bfloat16 slots (--lora-dtype) are read as they are.
WEIGHT_DTYPES = (torch.float32, torch.bfloat16)

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


def library_path(source: bytes, flags: tuple[str, ...] = FLAGS) -> Path:
    key = hashlib.sha256(source + " ".join(flags).encode() + _cpu_flags().encode()).hexdigest()[:16]
    return cache_dir() / f"quiver_lora_{key}.so"


def openmp_flags(compiler: str) -> tuple[str, ...]:
    """GCC's -fopenmp links libgomp.so.1, the OpenMP runtime torch's CPU build has already loaded: one runtime,
    so the kernel's passes run on the engine's own (bound, warm) OpenMP threads. Another compiler's OpenMP,
    or a process that preloads Intel's runtime instead, would start a second pool fighting the first for the
    same cores: the kernel is built serial there."""
    if "libiomp" in os.environ.get("LD_PRELOAD", ""):
        return ()
    try:
        macros = subprocess.run([compiler, "-dM", "-E", "-x", "c", os.devnull], capture_output=True, text=True,
                                timeout=BUILD_TIMEOUT_S, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return ("-fopenmp",) if "__GNUC__" in macros and "__clang__" not in macros else ()


def build(source_path: Path = SOURCE) -> Path:
    """The compiled library's path, building it first if it is not cached. Raises on failure.

    A build with OpenMP that fails (a GCC without libgomp's development files, say) is retried serial: a
    kernel on one thread still beats the torch ops."""
    source = source_path.read_bytes()
    names = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    compiler = next((found for found in map(shutil.which, names) if found), None)
    if compiler is None:
        raise RuntimeError(f"no C compiler on PATH (tried {', '.join(names)})")
    parallel = FLAGS + openmp_flags(compiler)
    if parallel == FLAGS:
        return _compile(compiler, FLAGS, source, source_path)
    try:
        return _compile(compiler, parallel, source, source_path)
    except RuntimeError as exc:
        logger.warning("quiver CPU LoRA kernel: the OpenMP build failed, building it serial: %s", exc)
        return _compile(compiler, FLAGS, source, source_path)


def _compile(compiler: str, flags: tuple[str, ...], source: bytes, source_path: Path) -> Path:
    target = library_path(source, flags)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: engines starting together never load a half-written file.
    fd, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, "-o", partial, str(source_path)], check=True, capture_output=True,
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
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    layer_fn = lib.quiver_lora_f32_layer
    layer_fn.argtypes = [ctypes.POINTER(_LayerArgs), ptr, i64, ptr, i64]
    layer_fn.restype = ctypes.c_int
    return lib


class _StepArgs(ctypes.Structure):
    """`struct quiver_lora_step` in lora_kernel.c."""

    _fields_ = [("slots", ctypes.c_void_p), ("num_tokens", ctypes.c_int64)]


class _LayerArgs(ctypes.Structure):
    """`struct quiver_lora_layer` in lora_kernel.c, field for field."""

    _fields_ = [("a", ctypes.c_void_p), ("b", ctypes.c_void_p), ("slice_sizes", ctypes.c_void_p),
                ("in_use", ctypes.c_void_p), ("step", ctypes.POINTER(_StepArgs)), ("din", ctypes.c_int64),
                ("num_slots", ctypes.c_int64), ("n_slices", ctypes.c_int64), ("rank", ctypes.c_int64),
                ("total_out", ctypes.c_int64), ("scale", ctypes.c_float), ("weight_bf16", ctypes.c_int32)]


class Step:
    """Which slot each token of the current step uses, for every layer bound to it. Set once when the step's
    mapping changes (a request joins or leaves the batch: most steps of real traffic); the layers' bindings
    stay valid, where re-binding all ~120 layers cost ~2.3 ms at every such change."""

    __slots__ = ("_args", "_slots", "num_tokens")

    def __init__(self, slots: torch.Tensor | None = None) -> None:
        self._args = _StepArgs(None, -1)
        self._slots: torch.Tensor | None = None
        self.num_tokens = -1
        self.set(slots)

    def set(self, slots: torch.Tensor | None) -> bool:
        """`slots`: int64, one per token, -1 for none. Anything else (or None) leaves no tokens, so that every
        bound call declines its rows (then the caller uses the torch ops)."""
        if not (isinstance(slots, torch.Tensor) and slots.dtype == torch.int64 and slots.dim() == 1
                and slots.is_contiguous() and slots.device.type == "cpu"):
            slots = None
        # tokens first to -1: a call between the two writes declines rather than reads a mismatched array
        self.num_tokens = self._args.num_tokens = -1
        self._slots = slots  # the kernel reads its pointer: kept alive as long as it is set
        if slots is None:
            self._args.slots = None
            return False
        self._args.slots = slots.data_ptr()
        self.num_tokens = self._args.num_tokens = slots.numel()
        return True


class Layer:
    """One LoRA linear's kernel call: the weights are checked and packed once (`bind`), the tokens' slots come
    from the shared `Step`, so each call checks only its input and output rows. The engine calls a layer ~120
    times a step with the same weights; unpacked, the checks and ctypes' conversions of 16 arguments cost more
    than the kernel's own work at decode sizes."""

    __slots__ = ("_keep", "_args", "_fn", "step", "din", "total_out")

    def __init__(self, lib: ctypes.CDLL, keep: tuple, args: _LayerArgs, step: Step) -> None:
        self._keep = keep  # the tensors the packed pointers point into
        self._args = ctypes.pointer(args)
        self._fn = lib.quiver_lora_f32_layer
        self.step = step
        self.din, self.total_out = args.din, args.total_out

    def __call__(self, y: torch.Tensor, x: torch.Tensor) -> bool:
        """y[t, :total_out] += the layer's delta for x[t]; False, with y untouched, when x or y are not
        float32 rows of unit stride of the bound widths, one per token of the step."""
        num_tokens, y_shape = self.step.num_tokens, y.shape
        if not (y.dtype is x.dtype is torch.float32 and x.shape == (num_tokens, self.din) and len(y_shape) == 2
                and y_shape[0] == num_tokens and y_shape[1] >= self.total_out):
            return False
        y_strides, x_strides = y.stride(), x.stride()
        if y_strides[1] != 1 or x_strides[1] != 1:
            return False
        return self._fn(self._args, y.data_ptr(), y_strides[0], x.data_ptr(), x_strides[0]) == 0


def bind(lib: ctypes.CDLL, a, b, slice_sizes, in_use, scale: float, step: Step) -> Layer | None:
    """The kernel call y[t, :total_out] += scale * x[t] @ A_s^T @ B_s^T for each token t whose slot s
    (`step`) is in use (`in_use`, uint8 per slot), with the weights laid out as FusedLoRA.kernel_weights gives
    them: `a` (slots, in, n_slices * rank), `b` (slots, rank, sum of `slice_sizes`), both float32 or both
    bfloat16. None when the tensors are not what the kernel reads (then the caller uses the torch ops)."""
    if not (a.dtype == b.dtype and a.dtype in WEIGHT_DTYPES and a.dim() == b.dim() == 3 and a.is_contiguous()
            and b.is_contiguous() and a.device.type == b.device.type == "cpu"
            and in_use.dtype == torch.uint8 and in_use.is_contiguous()
            and slice_sizes.dtype == torch.int64 and slice_sizes.dim() == 1 and slice_sizes.is_contiguous()):
        return None
    num_slots, din, k = a.shape
    n_slices, rank = slice_sizes.numel(), b.shape[1]
    # the kernel reads raw pointers: every extent it derives must be the tensors' own (a token's slot is only
    # ever compared with 0..num_slots-1, so any value in `step` is safe)
    if not (b.shape[0] == in_use.numel() == num_slots and n_slices * rank == k and k > 0
            and int(slice_sizes.sum()) == b.shape[2] and bool((slice_sizes >= 0).all())):
        return None
    args = _LayerArgs(a.data_ptr(), b.data_ptr(), slice_sizes.data_ptr(), in_use.data_ptr(),
                      ctypes.pointer(step._args), din, num_slots, n_slices, rank, b.shape[2], scale,
                      a.dtype == torch.bfloat16)
    return Layer(lib, (a, b, slice_sizes, in_use), args, step)


def add_lora_f32(lib: ctypes.CDLL, y, x, a, b, slice_sizes, slots, in_use, scale: float) -> bool:
    """`bind` and call once. False, with y untouched, when the tensors are not laid out as the kernel reads
    them (then the caller uses the torch ops)."""
    step = Step(slots)
    layer = bind(lib, a, b, slice_sizes, in_use, scale, step)
    return layer is not None and layer(y, x)
