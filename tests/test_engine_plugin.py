"""Op-level equivalence of quiver's CPU LoRA plugin with vLLM's stock CPU ops.

Fast, no server: random stacked LoRA weights shaped like vLLM's (max_loras, 1,
rank, in) / (max_loras, 1, out, rank), random per-token slot mappings with
no-adapter (-1) tokens, and the same calls the LoRA layers make.
"""

from __future__ import annotations

import importlib

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from vllm.lora.layers import LoRAMapping  # noqa: E402
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU  # noqa: E402

from quiver.engine_plugin import grouped_ops, lora_kernel  # noqa: E402
from quiver.engine_plugin.grouped_ops import FusedLoRA, add_lora_linear, build_plan  # noqa: E402
from quiver.engine_plugin.punica_cpu import QuiverPunicaWrapperCPU  # noqa: E402
from lora_reference import reference  # noqa: E402

MAX_LORAS = 4
RANK = 16


@pytest.fixture(autouse=True, params=["kernel", "torch_ops"])
def lora_path(request, monkeypatch):
    """Every wrapper test runs twice: with the compiled kernel and with the torch ops alone (what runs
    where no C compiler is found, or for tensors that are not float32)."""
    if request.param == "torch_ops":
        monkeypatch.setattr(lora_kernel, "load", lambda: None)
    else:
        assert lora_kernel.load() is not None, "the CPU LoRA kernel did not build (is `cc` installed?)"
    return request.param
D_IN = 96
# (name, output slices): like Llama's qkv (GQA), gate_up, o/down
LAYOUTS = [("qkv", (96, 32, 32)), ("gate_up", (160, 160)), ("o", (96,))]


def make_layer(out_slices, *, dtype=torch.float32, occupied=(0, 1, 2), ranks=(16, 8, 12),
               seed=0):
    """Stacked weights as vLLM lays them out; unoccupied slots are zero, and
    adapters with rank < RANK are zero-padded like vLLM's set_lora does."""
    g = torch.Generator().manual_seed(seed)
    a = tuple(torch.zeros(MAX_LORAS, 1, RANK, D_IN, dtype=dtype) for _ in out_slices)
    b = tuple(torch.zeros(MAX_LORAS, 1, o, RANK, dtype=dtype) for o in out_slices)
    for slot, r in zip(occupied, ranks):
        for i, o in enumerate(out_slices):
            a[i][slot, 0, :r] = torch.randn(r, D_IN, generator=g).to(dtype) / D_IN**0.5
            b[i][slot, 0, :, :r] = torch.randn(o, r, generator=g).to(dtype) / r**0.5
    return a, b


def wrappers(slots, lora_index_to_id=None):
    """Stock and quiver wrappers fed the same mapping, as the model manager does."""
    if lora_index_to_id is None:
        lora_index_to_id = [10 + i for i in range(MAX_LORAS)]
    ids = [lora_index_to_id[s] if s >= 0 else 0 for s in slots]
    mapping = LoRAMapping(tuple(ids), tuple(ids), is_prefill=True)
    out = []
    for cls in (PunicaWrapperCPU, QuiverPunicaWrapperCPU):
        w = cls(2048, 256, "cpu")
        w.update_metadata(mapping, lora_index_to_id, MAX_LORAS + 1, 1000)
        out.append(w)
    return out


def run_both(slots, layout, *, scale=1.0, dtype=torch.float32, **layer_kw):
    _, out_slices = layout
    a, b = make_layer(out_slices, dtype=dtype, **layer_kw)
    g = torch.Generator().manual_seed(len(slots))
    x = torch.randn(len(slots), D_IN, generator=g).to(dtype)
    y0 = torch.randn(len(slots), sum(out_slices), generator=g).to(dtype)
    stock, quiver = wrappers(slots)
    y_stock, y_quiver = y0.clone(), y0.clone()
    stock.add_lora_linear(y_stock, x, a, b, scale, out_slices)
    quiver.add_lora_linear(y_quiver, x, a, b, scale, out_slices)
    return y0, y_stock, y_quiver, quiver


def random_slots(n, present, p_none, seed):
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(list(present))
    s = pool[torch.randint(len(present), (n,), generator=g)]
    s[torch.rand(n, generator=g) < p_none] = -1
    return s.tolist()


CASES = {
    # name: (slots, expected plan kind)
    "uniform": ([1] * 16, "uniform"),
    "all_none": ([-1] * 16, "none"),
    "decode_mixed": (random_slots(16, (0, 1, 2), 0.25, 1), "masked"),
    "decode_mixed_sparse_slots": ([2, -1, 0, 2, 2, -1, 0, 0, -1, 2, 0, 2, -1, -1, 2, 0],
                                  "masked"),
    "decode_one_adapter_plus_base": ([1, -1] * 8, "masked"),
    "decode_one_adapter_run_plus_base": ([1] * 8 + [-1] * 8, "grouped"),
    "decode_two_adapters_plus_base": (random_slots(16, (0, 2), 0.3, 3), "masked"),
    "single_token_adapter": ([2], "uniform"),
    "prefill_contiguous": ([0] * 40 + [-1] * 30 + [2] * 50, "grouped"),
    "prefill_interleaved": (random_slots(200, (0, 1, 2), 0.2, 2), "grouped"),
}


@pytest.mark.parametrize("layout", LAYOUTS, ids=[n for n, _ in LAYOUTS])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_stock_fp32(case, layout):
    slots, kind = CASES[case]
    y0, y_stock, y_quiver, quiver = run_both(slots, layout)
    assert quiver._plan.kind == kind
    torch.testing.assert_close(y_quiver, y_stock, rtol=1e-5, atol=1e-5)
    if kind == "none":
        assert torch.equal(y_quiver, y0)
    # tokens without an adapter are bit-for-bit untouched
    none_rows = [t for t, s in enumerate(slots) if s < 0]
    assert torch.equal(y_quiver[none_rows], y0[none_rows])


@pytest.mark.parametrize("case", ["uniform", "decode_mixed", "prefill_interleaved"])
def test_matches_reference_with_all_slots_full(case):
    """All max_loras slots occupied, -1 tokens in the batch: must add nothing to them."""
    slots, _ = CASES[case]
    name, out_slices = LAYOUTS[0]
    kw = dict(occupied=(0, 1, 2, 3), ranks=(16, 8, 12, 16))
    a, b = make_layer(out_slices, **kw)
    x = torch.randn(len(slots), D_IN)
    y0 = torch.randn(len(slots), sum(out_slices))
    _, quiver = wrappers(slots)
    y = y0.clone()
    quiver.add_lora_linear(y, x, a, b, 1.0, out_slices)
    torch.testing.assert_close(y.double(), reference(y0, x, a, b, slots, out_slices),
                               rtol=1e-5, atol=1e-5)


def test_stock_applies_last_slot_to_no_lora_tokens():
    """Documents why the stock comparisons keep the last slot empty: stock
    indexes weights with -1, i.e. the last slot. Skips if vLLM fixed that."""
    slots = [1, -1, 3, -1]
    out_slices = (96,)
    a, b = make_layer(out_slices, occupied=(1, 3), ranks=(16, 16))
    x, y0 = torch.randn(4, D_IN), torch.zeros(4, 96)
    stock, quiver = wrappers(slots)
    y_stock, y_quiver = y0.clone(), y0.clone()
    stock.add_lora_linear(y_stock, x, a, b, 1.0, out_slices)
    quiver.add_lora_linear(y_quiver, x, a, b, 1.0, out_slices)
    assert torch.equal(y_quiver[[1, 3]], y0[[1, 3]])
    if torch.equal(y_stock[[1, 3]], y0[[1, 3]]):
        pytest.skip("stock vLLM no longer applies the last slot to -1 tokens")
    # ... and what it adds is exactly slot 3's delta
    ref = reference(y0, x, a, b, [3, 3, 3, 3], out_slices)
    torch.testing.assert_close(y_stock[[1, 3]].double(), ref[[1, 3]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["uniform", "decode_mixed", "prefill_interleaved"])
def test_scale(case):
    slots, _ = CASES[case]
    _, y_stock, y_quiver, _ = run_both(slots, LAYOUTS[1], scale=0.37)
    torch.testing.assert_close(y_quiver, y_stock, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["uniform", "decode_mixed", "prefill_interleaved"])
def test_bfloat16_close_to_stock(case):
    slots, _ = CASES[case]
    _, y_stock, y_quiver, _ = run_both(slots, LAYOUTS[0], dtype=torch.bfloat16)
    assert y_quiver.dtype == torch.bfloat16
    torch.testing.assert_close(y_quiver.float(), y_stock.float(), rtol=2e-2, atol=2e-2)


def test_decode_path_is_same_as_prefill_path():
    """vLLM V1 always maps with is_prefill=True; the bgmv (decode) metadata
    must give the same plan too."""
    slots = CASES["decode_mixed"][0]
    ids = [10 + s if s >= 0 else 0 for s in slots]
    w = QuiverPunicaWrapperCPU(2048, 256, "cpu")
    w.update_metadata(LoRAMapping(tuple(ids), tuple(ids), is_prefill=False),
                      [10, 11, 12, 13], MAX_LORAS + 1, 1000)
    assert w._plan.kind == "masked"
    a, b = make_layer((96,))
    x, y0 = torch.randn(len(slots), D_IN), torch.randn(len(slots), 96)
    y = y0.clone()
    w.add_lora_linear(y, x, a, b, 1.0, (96,))
    torch.testing.assert_close(y.double(), reference(y0, x, a, b, slots, (96,)),
                               rtol=1e-5, atol=1e-5)


def test_fused_weights_follow_in_place_updates():
    """Loading an adapter into a slot writes the stacked tensors in place;
    the fused copy must be rebuilt, as it is for a new slot layout."""
    slots = CASES["decode_mixed"][0]
    out_slices = LAYOUTS[0][1]
    a, b = make_layer(out_slices)
    x, y0 = torch.randn(len(slots), D_IN), torch.randn(len(slots), sum(out_slices))
    stock, quiver = wrappers(slots)
    y = y0.clone()
    quiver.add_lora_linear(y, x, a, b, 1.0, out_slices)
    # what vLLM's set_lora / reset_lora do
    a[1][0, 0, :8].copy_(torch.randn(8, D_IN) / D_IN**0.5)  # scaled as make_layer's
    b[0][2] = 0
    y_stock, y_quiver = y0.clone(), y0.clone()
    stock.add_lora_linear(y_stock, x, a, b, 1.0, out_slices)
    quiver.add_lora_linear(y_quiver, x, a, b, 1.0, out_slices)
    torch.testing.assert_close(y_quiver, y_stock, rtol=1e-5, atol=1e-5)
    assert len(quiver._fused) == 1


def test_mapping_with_unordered_slot_layout():
    """lora ids are mapped to slots through lora_index_to_id, with gaps."""
    lora_index_to_id = [7, None, 3, 9]
    slots = [2, 0, -1, 3, 2, 0, 0, -1]
    out_slices = LAYOUTS[0][1]
    a, b = make_layer(out_slices, occupied=(0, 2), ranks=(16, 8))
    a[0][3, 0, :4] = 1.0  # slot 3 is "occupied" as well; last slot -> stock bug
    x, y0 = torch.randn(len(slots), D_IN), torch.randn(len(slots), sum(out_slices))
    _, quiver = wrappers(slots, lora_index_to_id)
    y = y0.clone()
    quiver.add_lora_linear(y, x, a, b, 1.0, out_slices)
    torch.testing.assert_close(y.double(), reference(y0, x, a, b, slots, out_slices),
                               rtol=1e-5, atol=1e-5)


def test_falls_back_to_stock_on_unexpected_shapes():
    slots = [0, 1, -1]
    out_slices = (96,)
    a, b = make_layer(out_slices)
    stock, quiver = wrappers(slots)
    x = torch.randn(5, D_IN)  # not the mapped token count
    with pytest.raises(Exception):
        stock.add_lora_linear(torch.zeros(5, 96), x, a, b, 1.0, out_slices)
    with pytest.raises(Exception):
        quiver.add_lora_linear(torch.zeros(5, 96), x, a, b, 1.0, out_slices)


def test_build_plan_kinds_and_groups():
    assert build_plan([]).kind == "none"
    assert build_plan([-1, -1]).kind == "none"
    p = build_plan([3, 3, 3])
    assert (p.kind, p.slot_lo, p.slot_hi) == ("uniform", 3, 3)
    p = build_plan([1, -1, 3])
    assert p.kind == "masked" and p.mask(4).shape == (3, 1, 4, 1)
    assert p.mask(4)[:, 0, :, 0].tolist() == [[0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]
    big = [0] * 70 + [-1] * 5 + [1, 0] * 10
    p = build_plan(big)
    assert p.kind == "grouped"
    groups = dict((s, r) for s, r in p.groups)
    assert isinstance(groups[1], torch.Tensor) and groups[1].tolist() == list(range(75, 95, 2))
    assert isinstance(groups[0], torch.Tensor)  # 0..69 and every other from 76
    p = build_plan([0] * 70 + [1] * 10)
    assert all(isinstance(r, slice) for _, r in p.groups)


@pytest.mark.parametrize("slots", [[3] * 16, [3, -1] * 8, [3, 0, -1, 3] * 4, [3] * 40 + [0] * 30],
                         ids=["uniform", "with_base", "with_adapter", "prefill"])
def test_slots_without_weights_for_the_layer_add_nothing(slots):
    """Slot 3 is all zero in this layer (an adapter that does not train the module): skipped, its rows
    untouched bit for bit, and the batch still matches stock."""
    y0, y_stock, y_quiver, quiver = run_both(slots, LAYOUTS[0])
    torch.testing.assert_close(y_quiver, y_stock, rtol=1e-5, atol=1e-5)
    rows = [t for t, s in enumerate(slots) if s == 3]
    assert torch.equal(y_quiver[rows], y0[rows])
    fused = next(iter(quiver._fused.values()), None)
    assert fused is None or fused.in_use == [True, True, True, False]


def test_masked_and_grouped_agree():
    """The two multi-adapter strategies give the same numbers."""
    slots = random_slots(48, (0, 1, 2), 0.3, 5)
    out_slices = LAYOUTS[0][1]
    a, b = make_layer(out_slices)
    fused = FusedLoRA(a, b, out_slices, torch.float32)
    x, y0 = torch.randn(48, D_IN), torch.randn(48, sum(out_slices))
    y_m, y_g = y0.clone(), y0.clone()
    add_lora_linear(y_m, x, build_plan(slots, masked_max_tokens=64), fused)
    add_lora_linear(y_g, x, build_plan(slots, masked_max_tokens=0), fused)
    torch.testing.assert_close(y_m, y_g, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["uniform", "decode_mixed", "decode_one_adapter_run_plus_base",
                                  "prefill_interleaved"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=[n for n, _ in LAYOUTS])
def test_low_rank_adapters_use_only_their_ranks(case, layout):
    """Slots are padded to RANK (16); with every adapter of rank <= 8 the fused weights keep 8 ranks,
    and the results are those of stock and of the per-token definition."""
    slots, _ = CASES[case]
    _, out_slices = layout
    kw = dict(occupied=(0, 1, 2), ranks=(8, 4, 8))
    y0, y_stock, y_quiver, quiver = run_both(slots, layout, **kw)
    torch.testing.assert_close(y_quiver, y_stock, rtol=1e-5, atol=1e-5)
    a, b = make_layer(out_slices, **kw)
    g = torch.Generator().manual_seed(len(slots))
    x = torch.randn(len(slots), D_IN, generator=g)
    torch.testing.assert_close(y_quiver.double(), reference(y0, x, a, b, slots, out_slices),
                               rtol=1e-5, atol=1e-5)
    assert [f.rank for f in quiver._fused.values()] == [8]


def test_used_rank():
    a, b = make_layer((96,), occupied=(1, 2), ranks=(4, 12))
    assert grouped_ops.used_rank(a, b) == 12
    empty_a, empty_b = make_layer((96,), occupied=(), ranks=())
    assert grouped_ops.used_rank(empty_a, empty_b) == 1


EMBED_HIDDEN = 64


@pytest.mark.parametrize("slots", [[1, -1, 2, 2, -1, 1, 0, 3], [2] * 8, [-1] * 8],
                         ids=["mixed_with_base", "uniform", "base_only"])
@pytest.mark.parametrize("occupied", [(), (1, 2), (0, 1, 2, 3)],
                         ids=["no_embedding_weights", "embedding_weights", "every_slot_with_weights"])
def test_embedding_lora(slots, occupied):
    """The embedding's LoRA expand: zero slots add nothing (bit for bit), slots with weights add
    x @ B^T per token, and no-adapter tokens are untouched, also when every slot (the last one
    included, which stock applies to them) has weights."""
    g = torch.Generator().manual_seed(7)
    b = torch.zeros(MAX_LORAS, 1, EMBED_HIDDEN, RANK)
    for slot in occupied:
        b[slot, 0, :, :8] = torch.randn(EMBED_HIDDEN, 8, generator=g)
    x = torch.randn(len(slots), RANK, generator=g)
    y0 = torch.randn(len(slots), EMBED_HIDDEN, generator=g)
    _, quiver = wrappers(slots)
    y = y0.clone()
    quiver.add_lora_embedding(y, x, b, add_input=True)
    expected = y0.clone().double()
    for t, s in enumerate(slots):
        if s >= 0:
            expected[t] += x[t].double() @ b[s, 0].double().t()
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    untouched = [t for t, s in enumerate(slots) if s < 0 or s not in occupied]
    assert torch.equal(y[untouched], y0[untouched])


# ------------------------------------------------------------------ registration


@pytest.fixture
def cpu_platform():
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("CPU platform only")
    cls = type(current_platform)
    saved = cls.__dict__.get("get_punica_wrapper"), cls.__dict__.get("_quiver_cpu_lora")
    yield current_platform
    for name, value in zip(("get_punica_wrapper", "_quiver_cpu_lora"), saved):
        if value is None:
            if name in cls.__dict__:
                delattr(cls, name)
        else:
            setattr(cls, name, value)


STOCK = "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"


def test_register_off_by_env(cpu_platform, monkeypatch):
    import quiver.engine_plugin as plugin

    monkeypatch.setenv("QUIVER_CPU_LORA_PLUGIN", "0")
    if getattr(type(cpu_platform), "_quiver_cpu_lora", False):
        pytest.skip("plugin already registered in this process")
    plugin.register()
    assert cpu_platform.get_punica_wrapper() == STOCK


def test_register_on_cpu_swaps_wrapper(cpu_platform, monkeypatch):
    import quiver.engine_plugin as plugin

    monkeypatch.setenv("QUIVER_CPU_LORA_PLUGIN", "1")
    plugin.register()
    plugin.register()  # idempotent
    qualname = cpu_platform.get_punica_wrapper()
    assert qualname == plugin.WRAPPER_QUALNAME
    module, _, name = qualname.rpartition(".")
    assert getattr(importlib.import_module(module), name) is QuiverPunicaWrapperCPU


def test_register_is_noop_off_cpu(monkeypatch):
    import quiver.engine_plugin as plugin
    from vllm.platforms import current_platform

    monkeypatch.setenv("QUIVER_CPU_LORA_PLUGIN", "1")
    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self=None: False)
    before = type(current_platform).__dict__.get("get_punica_wrapper")
    plugin.register()
    assert type(current_platform).__dict__.get("get_punica_wrapper") is before


def test_masked_threshold_constant():
    assert grouped_ops.MASKED_MAX_TOKENS >= 16


# ------------------------------------------------------------------ lm_head (logits)

VOCAB = 300


def make_logits_layer(nonzero_slots, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.zeros(MAX_LORAS, 1, RANK, D_IN)
    b = torch.zeros(MAX_LORAS, 1, VOCAB, RANK)
    for s in nonzero_slots:
        a[s, 0, :8] = torch.randn(8, D_IN, generator=g) / D_IN**0.5
        b[s, 0, :, :8] = torch.randn(VOCAB, 8, generator=g)
    return a, b


@pytest.mark.parametrize("nonzero", [(), (1,), (0, 2)], ids=["no_lm_head", "slot1", "slots02"])
@pytest.mark.parametrize("case", ["uniform", "all_none", "decode_mixed", "prefill_interleaved"])
def test_logits_match_stock(case, nonzero):
    slots, _ = CASES[case]
    a, b = make_logits_layer(nonzero)
    x = torch.randn(len(slots), D_IN)
    # logits may be wider than the LoRA vocab (padding), as stock allows
    y0 = torch.randn(len(slots), VOCAB + 4)
    stock, quiver = wrappers(slots)
    y_stock, y_quiver = y0.clone(), y0.clone()
    stock.add_lora_logits(y_stock, x, a, b, 1.0)
    quiver.add_lora_logits(y_quiver, x, a, b, 1.0)
    torch.testing.assert_close(y_quiver, y_stock, rtol=1e-5, atol=1e-5)
    if not nonzero:
        assert torch.equal(y_quiver, y0)


def test_logits_follow_weight_updates():
    slots = CASES["decode_mixed"][0]
    a, b = make_logits_layer(())
    g = torch.Generator().manual_seed(2)
    x, y0 = torch.randn(len(slots), D_IN, generator=g), torch.randn(len(slots), VOCAB, generator=g)
    stock, quiver = wrappers(slots)
    y = y0.clone()
    quiver.add_lora_logits(y, x, a, b, 1.0)
    assert torch.equal(y, y0)
    # an adapter with lm_head lands in slot 1 (scaled as make_logits_layer's: see the swap test below)
    a[1, 0, :4].copy_(torch.randn(4, D_IN, generator=g) / D_IN**0.5)
    b[1, 0, :, :4].copy_(torch.randn(VOCAB, 4, generator=g))
    y_stock, y_quiver = y0.clone(), y0.clone()
    stock.add_lora_logits(y_stock, x, a, b, 1.0)
    quiver.add_lora_logits(y_quiver, x, a, b, 1.0)
    assert not torch.equal(y_quiver, y0)
    torch.testing.assert_close(y_quiver, y_stock, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ many slots (many adapters)


@pytest.mark.parametrize("present", [(1, 5, 9, 14), (4, 5, 6), (15,), (0, 15)], ids=["scattered", "run", "one", "ends"])
def test_masked_path_multiplies_only_the_slots_in_use(present):
    """16 slots, a decode batch on a few of them (plus base tokens): the masked path works on those slots'
    columns only (len(present) x K, not 16 x K) and still gives the per-token definition's numbers."""
    slots_total, out_slices = 16, LAYOUTS[0][1]
    g = torch.Generator().manual_seed(7)
    a = tuple(torch.zeros(slots_total, 1, RANK, D_IN) for _ in out_slices)
    b = tuple(torch.zeros(slots_total, 1, o, RANK) for o in out_slices)
    for slot in range(slots_total):  # every slot occupied, rank 8
        for i, o in enumerate(out_slices):
            a[i][slot, 0, :8] = torch.randn(8, D_IN, generator=g) / D_IN**0.5
            b[i][slot, 0, :, :8] = torch.randn(o, 8, generator=g) / 8**0.5
    slots = random_slots(16, present, 0.25, 11)
    slots[0] = present[-1]  # at least one token on an adapter
    plan = build_plan(slots)
    used = tuple(sorted(set(s for s in slots if s >= 0)))
    if len(used) > 1 or -1 in slots:
        assert plan.kind == "masked"
    fused = FusedLoRA(a, b, out_slices, torch.float32)
    cols, rows = fused.for_slots(used)
    assert cols.shape == (D_IN, len(used) * fused.k) and rows.shape == (len(used) * fused.k, sum(out_slices))
    x, y0 = torch.randn(16, D_IN, generator=g), torch.randn(16, sum(out_slices), generator=g)
    y = y0.clone()
    add_lora_linear(y, x, plan, fused, scale=0.5)
    torch.testing.assert_close(y.double(), reference(y0, x, a, b, slots, out_slices, scale=0.5),
                               rtol=1e-5, atol=1e-5)
    add_lora_linear(y2 := y0.clone(), x, plan, fused, scale=0.5)  # the cached selection gives the same
    torch.testing.assert_close(y2, y, rtol=0, atol=0)


def test_selected_slot_columns_are_bounded():
    out_slices = LAYOUTS[2][1]
    a, b = make_layer(out_slices, occupied=(0, 1, 2, 3), ranks=(8, 8, 8, 8))
    fused = FusedLoRA(a, b, out_slices, torch.float32)
    for _ in range(3):
        for present in [(0, 2), (1, 3), (0, 3), (0, 1, 3), (0, 2, 3)]:
            fused.for_slots(present)
    assert 0 < len(fused._selected) <= 8
    cols, rows = fused.for_slots((1, 2))  # a run: views of the fused weights, nothing cached
    assert cols.data_ptr() == fused.a_t[:, fused.k:].data_ptr() and rows.data_ptr() == fused.b_t[fused.k:].data_ptr()


# ------------------------------------------------------------------ slot swaps (many adapters)


def _set_lora(a, b, slot, rank, g):
    """What vLLM's set_lora does to one slot: reset it to zeros, then copy an adapter's weights in."""
    for i in range(len(a)):
        a[i][slot] = 0
        b[i][slot] = 0
        a[i][slot, 0, :rank] = torch.randn(rank, a[i].shape[-1], generator=g) / D_IN**0.5
        b[i][slot, 0, :, :rank] = torch.randn(b[i].shape[2], rank, generator=g) / rank**0.5


def _update(wrapper, slots, layout):
    ids = [layout[s] if s >= 0 else 0 for s in slots]
    wrapper.update_metadata(LoRAMapping(tuple(ids), tuple(ids), is_prefill=False), layout, len(layout) + 1, 1000)


@pytest.mark.parametrize("slots", [[5, 1, -1, 5, 9, 1, 5, -1] * 2, [5] * 16, [5, 5, 5, -1, -1, 1, 1, 1]],
                         ids=["masked", "uniform", "grouped"])
def test_a_slot_swap_rewrites_only_the_swapped_slot(slots):
    """16 slots: an adapter swapped into slot 5 (a new id there) updates that slot's columns of the fused
    weights in place, no rebuild of the other 15, and the batch still gets exactly its adapters' deltas."""
    total, out_slices = 16, LAYOUTS[0][1]
    g = torch.Generator().manual_seed(3)
    a = tuple(torch.zeros(total, 1, RANK, D_IN) for _ in out_slices)
    b = tuple(torch.zeros(total, 1, o, RANK) for o in out_slices)
    for slot in range(total):
        _set_lora(a, b, slot, 8, g)
    layout = [100 + s for s in range(total)]
    wrapper = QuiverPunicaWrapperCPU(2048, 256, "cpu")
    _update(wrapper, [1, 5, 9, -1], layout)
    x4, y4 = torch.randn(4, D_IN), torch.zeros(4, sum(out_slices))
    wrapper.add_lora_linear(y4, x4, a, b, 1.0, out_slices)  # builds the fused weights, caches {1, 5, 9}
    fused = next(iter(wrapper._fused.values()))
    a_ptr = fused.a_t.data_ptr()
    _set_lora(a, b, 5, 4, g)  # a rank-4 adapter replaces slot 5's
    layout = layout.copy()
    layout[5] = 999
    _update(wrapper, slots, layout)
    x, y0 = torch.randn(len(slots), D_IN, generator=g), torch.randn(len(slots), sum(out_slices), generator=g)
    y = y0.clone()
    wrapper.add_lora_linear(y, x, a, b, 0.5, out_slices)
    torch.testing.assert_close(y.double(), reference(y0, x, a, b, slots, out_slices, scale=0.5),
                               rtol=1e-5, atol=1e-5)
    assert next(iter(wrapper._fused.values())) is fused and fused.a_t.data_ptr() == a_ptr  # refreshed in place
    assert fused.slot_ids == tuple(layout) and fused.is_current(a, b, out_slices, torch.float32)
    # The stale selection holding slot 5 is gone; a batch over {1, 5, 9} again gets slot 5's new weights.
    y4b = torch.zeros(4, sum(out_slices))
    _update(wrapper, [1, 5, 9, -1], layout)
    wrapper.add_lora_linear(y4b, x4, a, b, 1.0, out_slices)
    torch.testing.assert_close(y4b.double(), reference(torch.zeros(4, sum(out_slices)), x4, a, b,
                                                       [1, 5, 9, -1], out_slices), rtol=1e-5, atol=1e-5)


def test_a_swap_that_cannot_be_explained_by_the_layout_rebuilds():
    """A higher rank than any slot had, or a write with an unchanged layout: the whole layer is rebuilt."""
    out_slices = LAYOUTS[2][1]
    g = torch.Generator().manual_seed(4)
    a, b = make_layer(out_slices, occupied=(0, 1, 2, 3), ranks=(8, 8, 8, 8))
    layout = [10, 11, 12, 13]
    slots = [0, 1, 2, 3, -1, 2]
    wrapper = QuiverPunicaWrapperCPU(2048, 256, "cpu")
    _update(wrapper, slots, layout)
    x, y0 = torch.randn(len(slots), D_IN, generator=g), torch.randn(len(slots), 96, generator=g)
    wrapper.add_lora_linear(y0.clone(), x, a, b, 1.0, out_slices)
    first = next(iter(wrapper._fused.values()))
    _set_lora(a, b, 2, 16, g)  # rank 16 > 8
    _update(wrapper, slots, [10, 11, 42, 13])
    y = y0.clone()
    wrapper.add_lora_linear(y, x, a, b, 1.0, out_slices)
    rebuilt = next(iter(wrapper._fused.values()))
    assert rebuilt is not first and rebuilt.rank == 16
    torch.testing.assert_close(y.double(), reference(y0, x, a, b, slots, out_slices), rtol=1e-5, atol=1e-5)
    _set_lora(a, b, 1, 8, g)  # written in place with the same layout (not vLLM's way): still exact
    y = y0.clone()
    wrapper.add_lora_linear(y, x, a, b, 1.0, out_slices)
    assert next(iter(wrapper._fused.values())) is not rebuilt
    torch.testing.assert_close(y.double(), reference(y0, x, a, b, slots, out_slices), rtol=1e-5, atol=1e-5)


def test_logits_and_embedding_slots_follow_a_swap():
    slots = [0, 1, 2, -1, 1]
    a, b = make_logits_layer((0,))
    layout = [10, 11, 12, 13]
    stock, quiver = PunicaWrapperCPU(2048, 256, "cpu"), QuiverPunicaWrapperCPU(2048, 256, "cpu")
    for w in (stock, quiver):
        _update(w, slots, layout)
    g = torch.Generator().manual_seed(1)
    x, y0 = torch.randn(len(slots), D_IN, generator=g), torch.randn(len(slots), VOCAB, generator=g)
    quiver.add_lora_logits(y0.clone(), x, a, b, 1.0)
    in_use = quiver._logits_in_use
    # an adapter with lm_head weights swapped into slot 1, scaled as make_logits_layer's (unscaled, the deltas
    # reached ~40 and float32 rounding alone sometimes exceeded the 1e-5 tolerance: 1 run in ~30)
    a[1, 0, :4].copy_(torch.randn(4, D_IN, generator=g) / D_IN**0.5)
    b[1, 0, :, :4].copy_(torch.randn(VOCAB, 4, generator=g))
    for w in (stock, quiver):
        _update(w, slots, [10, 77, 12, 13])
    y_stock, y_quiver = y0.clone(), y0.clone()
    stock.add_lora_logits(y_stock, x, a, b, 1.0)
    quiver.add_lora_logits(y_quiver, x, a, b, 1.0)
    assert quiver._logits_in_use is in_use and in_use.nonzero[1]
    torch.testing.assert_close(y_quiver, y_stock, rtol=1e-5, atol=1e-5)
