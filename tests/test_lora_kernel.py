"""The compiled CPU LoRA kernel (quiver.engine_plugin.lora_kernel): its results against the per-token
definition and the torch ops, batch invariance, its build cache, and the fallbacks. Fast, no server."""

from __future__ import annotations

import ctypes
import os
import shutil

import pytest

torch = pytest.importorskip("torch")

from quiver.engine_plugin import lora_kernel  # noqa: E402
from quiver.engine_plugin import grouped_ops  # noqa: E402
from quiver.engine_plugin.grouped_ops import FusedLoRA, add_lora_linear, build_plan  # noqa: E402
from lora_reference import reference  # noqa: E402

SLOTS = 4
D_IN = 80


@pytest.fixture(scope="module")
def kernel() -> ctypes.CDLL:
    lib = lora_kernel.load()
    assert lib is not None, "the CPU LoRA kernel did not build (is `cc` installed?)"
    return lib


def layer(out_slices, ranks, seed=0, max_rank=16):
    """vLLM-shaped stacked weights: (S, 1, max_rank, in) and (S, 1, out, max_rank), zero past each rank;
    a rank of 0 leaves the slot empty."""
    g = torch.Generator().manual_seed(seed)
    a = tuple(torch.zeros(SLOTS, 1, max_rank, D_IN) for _ in out_slices)
    b = tuple(torch.zeros(SLOTS, 1, o, max_rank) for o in out_slices)
    for slot, r in enumerate(ranks):
        for i, o in enumerate(out_slices):
            a[i][slot, 0, :r] = torch.randn(r, D_IN, generator=g) / D_IN**0.5
            b[i][slot, 0, :, :r] = torch.randn(o, r, generator=g) / max(r, 1)**0.5
    return a, b


def random_slots(n, seed, p_none=0.25):
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, SLOTS, (n,), generator=g)
    s[torch.rand(n, generator=g) < p_none] = -1
    return s.tolist()


@pytest.mark.parametrize("num_tokens", [1, 3, 7, 16, 64, 200, 700])
@pytest.mark.parametrize("out_slices,ranks", [
    ((64, 16, 16), (8, 8, 8, 8)),   # qkv-like, every slot full
    ((48, 48), (5, 3, 0, 5)),       # gate_up-like, ranks not a multiple of the kernel's block, an empty slot
    ((40,), (16, 1, 12, 0)),        # o-like, one slice
], ids=["qkv", "gate_up-odd-ranks", "o"])
def test_matches_definition_and_torch_ops(kernel, num_tokens, out_slices, ranks):
    a, b = layer(out_slices, ranks, seed=num_tokens)
    fused = FusedLoRA(a, b, out_slices, torch.float32)
    slots = random_slots(num_tokens, seed=num_tokens)
    plan = build_plan(slots)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(num_tokens, D_IN, generator=g)
    y0 = torch.randn(num_tokens, sum(out_slices) + 3, generator=g)  # wider than the layer, like a padded output
    y_kernel, y_torch = y0.clone(), y0.clone()
    assert lora_kernel.add_lora_f32(kernel, y_kernel, x, *fused.kernel_weights(), fused.slice_sizes, plan.slots,
                                    fused.in_use_bytes(), 0.7)
    add_lora_linear(y_torch, x, plan, fused, 0.7)
    expected = reference(y0, x, a, b, slots, out_slices, 0.7)
    torch.testing.assert_close(y_kernel.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_kernel, y_torch, rtol=1e-5, atol=1e-5)
    untouched = [t for t, s in enumerate(slots) if s < 0 or ranks[s] == 0]
    assert torch.equal(y_kernel[untouched], y0[untouched])
    assert torch.equal(y_kernel[:, sum(out_slices):], y0[:, sum(out_slices):])


@pytest.mark.parametrize("num_tokens", [1, 3, 16, 200])
@pytest.mark.parametrize("out_slices,ranks", [
    ((64, 16, 16), (8, 8, 8, 8)),
    ((13, 35), (5, 3, 0, 5)),  # widths and ranks off the kernel's blocks: its one-value tails read bfloat16 too
], ids=["qkv", "odd"])
def test_bfloat16_weights_give_the_float32_result_bit_for_bit(kernel, num_tokens, out_slices, ranks):
    """vLLM's --lora-dtype bfloat16 slots: the kernel keeps them in bfloat16 (half the bytes) and widens each
    weight exactly, so a token's result equals the one from float32 slots of the same values, bit for bit."""
    a, b = layer(out_slices, ranks, seed=num_tokens)
    a16, b16 = tuple(w.bfloat16() for w in a), tuple(w.bfloat16() for w in b)
    fused16 = FusedLoRA(a16, b16, out_slices, torch.float32)
    fused32 = FusedLoRA(tuple(w.float() for w in a16), tuple(w.float() for w in b16), out_slices, torch.float32)
    assert {w.dtype for w in fused16.kernel_weights()} == {torch.bfloat16}
    assert {w.dtype for w in fused32.kernel_weights()} == {torch.float32}
    slots = random_slots(num_tokens, seed=num_tokens)
    plan = build_plan(slots)
    x = torch.randn(num_tokens, D_IN)
    y0 = torch.randn(num_tokens, sum(out_slices))
    y16, y32 = y0.clone(), y0.clone()
    for fused, y in ((fused16, y16), (fused32, y32)):
        assert lora_kernel.add_lora_f32(kernel, y, x, *fused.kernel_weights(), fused.slice_sizes, plan.slots,
                                        fused.in_use_bytes(), 0.7)
    assert torch.equal(y16, y32)
    torch.testing.assert_close(y16.double(), reference(y0, x, a16, b16, slots, out_slices, 0.7),
                               rtol=1e-5, atol=1e-5)


def test_a_tokens_result_does_not_depend_on_its_batch(kernel):
    """Each token multiplies only its own adapter's weights, the same way in any batch: bit for bit."""
    out_slices = (64, 16, 16)
    a, b = layer(out_slices, (8, 8, 8, 8))
    fused = FusedLoRA(a, b, out_slices, torch.float32)
    slots = random_slots(32, seed=3)
    x, y0 = torch.randn(32, D_IN), torch.randn(32, sum(out_slices))
    y_batch = y0.clone()
    add_lora_linear(y_batch, x, build_plan(slots), fused, kernel=kernel)
    for t in (0, 5, 31):
        y_alone = y0[t:t + 1].clone()
        add_lora_linear(y_alone, x[t:t + 1], build_plan(slots[t:t + 1]), fused, kernel=kernel)
        assert torch.equal(y_alone[0], y_batch[t])


def test_declines_what_it_cannot_read(kernel):
    """Not float32, or not rows of unit stride: False and y untouched, so the torch ops run instead."""
    out_slices = (32,)
    a, b = layer(out_slices, (8, 8, 8, 8))
    fused = FusedLoRA(a, b, out_slices, torch.float32)
    plan = build_plan([0, 1, 2, 3])
    a_k, b_k = fused.kernel_weights()
    args = (a_k, b_k, fused.slice_sizes, plan.slots, fused.in_use_bytes(), 1.0)
    y = torch.zeros(4, 32)
    assert not lora_kernel.add_lora_f32(kernel, y.bfloat16(), torch.randn(4, D_IN).bfloat16(), *args)
    assert not lora_kernel.add_lora_f32(kernel, y, torch.randn(D_IN, 4).t(), *args)  # column-major x
    assert not lora_kernel.add_lora_f32(kernel, y[:3], torch.randn(4, D_IN), *args)  # rows disagree
    x = torch.randn(4, D_IN)
    # every extent the kernel derives must be the tensors' own, or it would read or write past them
    assert not lora_kernel.add_lora_f32(kernel, y, x, a_k[:, :, :-1], b_k, *args[2:])  # not contiguous
    assert not lora_kernel.add_lora_f32(kernel, y, x, a_k[:, :, :-1].contiguous(), b_k, *args[2:])  # rank disagrees
    assert not lora_kernel.add_lora_f32(kernel, y, x, a_k[:3], b_k, *args[2:])  # fewer slots than the rest
    assert not lora_kernel.add_lora_f32(kernel, y, x, a_k, b_k, torch.tensor([16, 16]), *args[3:])  # 2 slices?
    assert not lora_kernel.add_lora_f32(kernel, y, x, a_k, b_k, torch.tensor([40]), *args[3:])  # past B's columns
    assert not lora_kernel.add_lora_f32(kernel, y, x, a_k, b_k, fused.slice_sizes, plan.slots,
                                        torch.ones(3, dtype=torch.uint8), 1.0)  # in_use for 3 slots of 4
    assert not lora_kernel.add_lora_f32(kernel, y, x, a_k.double(), b_k.double(), *args[2:])
    assert not lora_kernel.add_lora_f32(kernel, y, x, a_k.bfloat16(), b_k, *args[2:])  # one dtype for both
    assert not lora_kernel.add_lora_f32(kernel, y, x, a_k.half(), b_k.half(), *args[2:])
    assert torch.equal(y, torch.zeros(4, 32))


def test_build_is_cached_by_source_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv(lora_kernel.ENV_CACHE, str(tmp_path))
    first = lora_kernel.build()
    assert first.parent == tmp_path and first.exists()
    mtime = first.stat().st_mtime_ns
    assert lora_kernel.build() == first and first.stat().st_mtime_ns == mtime  # not rebuilt
    monkeypatch.setattr(lora_kernel, "_cpu_flags", lambda: "flags : another cpu")
    assert lora_kernel.build() != first  # another CPU's cache entry, never this one's code
    assert not list(tmp_path.glob("*.partial"))


def test_a_failed_build_says_why_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(lora_kernel.ENV_CACHE, str(tmp_path / "cache"))
    broken = tmp_path / "broken.c"
    broken.write_text("int quiver_lora_f32(void) { return }\n")
    with pytest.raises(RuntimeError, match="broken.c failed"):
        lora_kernel.build(broken)
    assert not list((tmp_path / "cache").iterdir())


def test_a_failed_openmp_build_is_retried_serial(tmp_path, monkeypatch):
    """A GCC whose -fopenmp cannot link (no libgomp development files) still gives a kernel, built serial."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("needs gcc (CI installs it: .ci/run)")
    no_openmp = tmp_path / "gcc-without-libgomp"
    no_openmp.write_text("#!/bin/sh\n"
                         'for arg in "$@"; do [ "$arg" = -fopenmp ] && { echo "cannot find -lgomp" >&2; exit 1; }; done\n'
                         f'exec {gcc} "$@"\n')
    no_openmp.chmod(0o755)
    monkeypatch.setenv("CC", str(no_openmp))
    monkeypatch.setenv(lora_kernel.ENV_CACHE, str(tmp_path / "cache"))
    assert lora_kernel.openmp_flags(str(no_openmp)) == ("-fopenmp",)  # it looks like GCC, so OpenMP is tried
    built = lora_kernel.build()
    assert built == lora_kernel.library_path(lora_kernel.SOURCE.read_bytes(), lora_kernel.FLAGS)  # the serial one
    assert [path.name for path in (tmp_path / "cache").iterdir()] == [built.name]  # nothing half-written left
    kernel = ctypes.CDLL(str(built))
    assert kernel.quiver_lora_f32_layer is not None


def test_no_compiler_or_switched_off_means_torch_ops(tmp_path, monkeypatch):
    monkeypatch.setenv(lora_kernel.ENV_CACHE, str(tmp_path))
    lora_kernel.load.cache_clear()
    try:
        monkeypatch.setenv("CC", "no-such-compiler")
        assert lora_kernel.load() is None
        lora_kernel.load.cache_clear()
        monkeypatch.delenv("CC")
        monkeypatch.setenv(lora_kernel.ENV_SWITCH, "0")
        assert lora_kernel.load() is None
    finally:
        lora_kernel.load.cache_clear()


def wrapper_for(slots, layout=(10, 11, 12, 13)):
    from vllm.lora.layers import LoRAMapping

    from quiver.engine_plugin.punica_cpu import QuiverPunicaWrapperCPU

    ids = [layout[s] if s >= 0 else 0 for s in slots]
    wrapper = QuiverPunicaWrapperCPU(2048, 256, "cpu")
    wrapper.update_metadata(LoRAMapping(tuple(ids), tuple(ids), is_prefill=True), list(layout), SLOTS + 1, 1000)
    return wrapper


def count_binds(monkeypatch) -> list[lora_kernel.Layer | None]:
    binds = []
    real = lora_kernel.bind
    monkeypatch.setattr(lora_kernel, "bind", lambda *args: binds.append(real(*args)) or binds[-1])
    return binds


def test_the_engine_wrapper_runs_its_linears_through_the_kernel(kernel, monkeypatch):
    """What the engine calls (QuiverPunicaWrapperCPU.add_lora_linear) reaches the kernel, not the fallback;
    a layer's call is bound once per weights, then reused."""
    binds = count_binds(monkeypatch)
    from quiver.engine_plugin import punica_cpu

    monkeypatch.setattr(punica_cpu, "add_lora_linear", lambda *args: pytest.fail("the torch ops ran"))
    slots = random_slots(40, seed=9)
    wrapper = wrapper_for(slots)
    out_slices = (64, 16, 16)
    a, b = layer(out_slices, (8, 8, 8, 8))
    x, y0 = torch.randn(40, D_IN), torch.randn(40, sum(out_slices))
    expected = reference(y0, x, a, b, slots, out_slices, 1.0)
    for _ in range(3):  # three steps of one plan: one bind
        y = y0.clone()
        wrapper.add_lora_linear(y, x, a, b, 1.0, out_slices)
        torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    assert len(binds) == 1 and binds[0] is not None


def test_a_bound_call_follows_its_weights_scale_and_the_steps_mapping(kernel, monkeypatch):
    """The bound call is only reused for what it was bound for: an in-place weight write (what vLLM's set_lora
    does) or another scale binds again. A new mapping binds nothing (every layer reads the wrapper's one
    Step), and its results follow it: every result matches the definition."""
    binds = count_binds(monkeypatch)
    slots = random_slots(16, seed=3)
    wrapper = wrapper_for(slots)
    out_slices = (48, 48)
    a, b = layer(out_slices, (8, 4, 8, 2))
    x, y0 = torch.randn(16, D_IN), torch.randn(16, sum(out_slices))

    def step(scale=1.0):
        y = y0.clone()
        wrapper.add_lora_linear(y, x, a, b, scale, out_slices)
        torch.testing.assert_close(y.double(), reference(y0, x, a, b, slots, out_slices, scale), rtol=1e-5, atol=1e-5)

    step()
    step()
    assert len(binds) == 1
    a[0][1, 0, :4].copy_(torch.randn(4, D_IN) / D_IN**0.5)  # a slot rewritten in place, same mapping
    step()
    assert len(binds) == 2
    step(scale=0.5)
    assert len(binds) == 3
    from vllm.lora.layers import LoRAMapping

    for seed, tokens in ((4, 16), (5, 16), (6, 40), (7, 1)):  # the next steps' mappings, some of other sizes
        slots = random_slots(tokens, seed=seed)
        ids = [10 + s if s >= 0 else 0 for s in slots]
        wrapper.update_metadata(LoRAMapping(tuple(ids), tuple(ids), is_prefill=True), [10, 11, 12, 13], SLOTS + 1,
                                1000)
        x, y0 = torch.randn(tokens, D_IN), torch.randn(tokens, sum(out_slices))
        step(scale=0.5)
    assert len(binds) == 3


def test_a_layer_no_slot_has_weights_for_is_skipped_until_one_has(kernel, monkeypatch):
    """Adapters trained on the attention projections leave the MLP's slots zero: such a layer adds nothing, so
    once bound its calls reach no kernel at all. Weights written into one of its slots (vLLM's set_lora, in
    place) bind it again, and its results follow them."""
    binds = count_binds(monkeypatch)
    kernel_calls = []
    real_call = lora_kernel.Layer.__call__
    monkeypatch.setattr(lora_kernel.Layer, "__call__",
                        lambda self, y, x: kernel_calls.append(1) or real_call(self, y, x))
    slots = random_slots(16, seed=3)
    wrapper = wrapper_for(slots)
    out_slices = (48, 48)
    a, b = layer(out_slices, (0, 0, 0, 0))  # every slot empty for this layer
    x, y0 = torch.randn(16, D_IN), torch.randn(16, sum(out_slices))

    for _ in range(3):
        y = y0.clone()
        wrapper.add_lora_linear(y, x, a, b, 1.0, out_slices)
        assert torch.equal(y, y0)
    assert len(binds) == 1 and len(kernel_calls) == 1  # the first call bound it; the next two were skipped

    g = torch.Generator().manual_seed(9)
    a[1][2, 0, :4].copy_(torch.randn(4, D_IN, generator=g) / D_IN**0.5)  # slot 2, second slice, rank 4
    b[1][2, 0, :, :4].copy_(torch.randn(48, 4, generator=g) / 2)
    for _ in range(2):
        y = y0.clone()
        wrapper.add_lora_linear(y, x, a, b, 1.0, out_slices)
        torch.testing.assert_close(y.double(), reference(y0, x, a, b, slots, out_slices, 1.0), rtol=1e-5, atol=1e-5)
    assert not torch.equal(y, y0) and len(binds) == 2 and len(kernel_calls) == 3


def test_a_bound_call_declines_rows_it_was_not_bound_for(kernel):
    """A bound call checks its input and output rows on every call (the kernel reads raw pointers)."""
    out_slices = (32,)
    a, b = layer(out_slices, (8, 8, 8, 8))
    fused = FusedLoRA(a, b, out_slices, torch.float32)
    plan = build_plan([0, 1, 2, 3])
    step = lora_kernel.Step(plan.slots)
    bound = grouped_ops.bind_kernel(kernel, fused, 1.0, step)
    y, x = torch.zeros(4, 32), torch.randn(4, D_IN)
    assert not bound(y, torch.randn(5, D_IN))  # more rows than the plan's tokens
    assert not bound(torch.zeros(5, 32), torch.randn(5, D_IN))
    assert not bound(y, torch.randn(4, D_IN + 1))  # another input width
    assert not bound(torch.zeros(4, 31), x)  # narrower than the layer's output
    assert not bound(y.double(), x.double())
    assert not bound(y, torch.randn(D_IN, 4).t())  # column-major x
    assert not bound(y.view(4, 32, 1), x)
    assert torch.equal(y, torch.zeros(4, 32))
    assert bound(y, x) and y.abs().sum() > 0
    y = torch.zeros(4, 32)
    assert not step.set(plan.slots.int())  # slots the kernel cannot read: no tokens, every call declines
    assert not bound(y, x) and torch.equal(y, torch.zeros(4, 32))
    assert step.set(torch.tensor([3, 3, -1, 3]))  # the next step's mapping: the same binding follows it
    assert bound(y, x) and torch.equal(y[2], torch.zeros(32)) and bool((y[[0, 1, 3]] != 0).all())


def test_one_openmp_runtime_in_the_process(kernel):
    """Built with GCC's OpenMP, the kernel binds to the libgomp.so.1 torch loaded (one thread pool) and never
    loads a second runtime. (Wheels' vendored, renamed copies such as sentencepiece's `libgomp-<hash>` are
    private to their own library: nothing of ours can bind to them.)"""
    mapped = {line.split()[-1] for line in open("/proc/self/maps") if "/" in line}
    runtimes = {path for path in mapped
                if os.path.basename(path).startswith(("libgomp.so", "libomp.so", "libiomp5.so"))}
    assert len(runtimes) == 1, runtimes


def test_openmp_only_with_gcc_and_without_intels_runtime(monkeypatch):
    macros = {"gcc": "#define __GNUC__ 12\n", "clang": "#define __GNUC__ 4\n#define __clang__ 1\n"}
    monkeypatch.setattr(lora_kernel.subprocess, "run",
                        lambda command, **kw: type("Done", (), {"stdout": macros[command[0]]})())
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert lora_kernel.openmp_flags("gcc") == ("-fopenmp",)
    assert lora_kernel.openmp_flags("clang") == ()  # LLVM's libomp would be a second pool
    monkeypatch.setenv("LD_PRELOAD", "/opt/intel/lib/libiomp5.so")
    assert lora_kernel.openmp_flags("gcc") == ()
