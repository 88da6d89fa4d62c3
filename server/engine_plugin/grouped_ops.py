"""Grouped LoRA ops for vLLM's CPU platform, in plain PyTorch.

Why: vLLM's stock CPU ops (vllm/lora/ops/torch_ops) handle every token on its
own: for each of the n slices of a layer (q, k, v; gate, up; ...) and for both
halves (shrink x@A, expand buf@B) they gather a full copy of that token's
adapter weights (`w[indices]`) and run a batched einsum over those copies. For
a 30-layer model that is ~420 gather+einsum pairs per step, each copying
T x rank x width floats, which is most of a decode step on a small CPU.

Here the batch is grouped by adapter slot once per step (`LoRAPlan`), and each
LoRA layer does a handful of ordinary matmuls against weights fused once per
adapter load (`FusedLoRA`):

* uniform (all tokens on one adapter): x@A then buf@B, one matmul each;
* masked (decode batches over several adapters, or one adapter interleaved
  with base tokens): one matmul against the A of every slot the batch uses
  at once, zero the columns of other slots with a per-token mask, then one
  matmul-and-add against those slots' B, block-diagonal over the slices.
  Three ops per layer whatever the mix; the wasted flops (rank x slices x
  slots in use) are small next to the layer's width. Measured on 2 cores,
  SmolLM2 shapes, 16 tokens, 4 slots: 4-9 ms a step for all 30 layers where
  per-slot rows took 8-23 ms. Only the slots in use: with many engine slots
  (many adapters) multiplying every slot's columns grew with the slot count,
  not with the adapters a batch actually holds;
* grouped (large prefill batches, or one adapter on a contiguous run of
  rows): per present slot, its rows (a slice when they are contiguous)
  through the uniform path.

Where the engine has a C compiler, `lora_kernel.c` does the same in one call per layer (each token only
its own adapter; 2.8-10x faster than these ops, loadtests/lora_kernel_bench.py), and these torch
ops are its fallback (no compiler, or tensors that are not float32).

Tokens with slot -1 (no adapter) get nothing added. Note that the stock ops
index `w[-1]`, i.e. they apply the adapter in the *last* slot to such tokens
whenever the batch also holds LoRA tokens; that is a bug (the GPU kernels
skip -1), visible once all `max_loras` slots are occupied.

Numerics mirror the stock ops: the shrink runs in float32 (stock buffers are
float32), the expand in the output's dtype, and `y += delta` is a separate add.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from collections.abc import Sequence

import torch

from . import lora_kernel

# Above this many tokens the masked path's extra flops (all present slots for
# every token) cost more than a few extra ops per slot; below it, op count wins.
MASKED_MAX_TOKENS = 64
SHRINK_DTYPE = torch.float32


@dataclass
class LoRAPlan:
    """How one step's tokens map to adapter slots; built once per mapping."""

    num_tokens: int
    kind: str  # "none" | "uniform" | "masked" | "grouped"
    slot_lo: int = 0  # present slots lie in [slot_lo, slot_hi]
    slot_hi: int = -1
    present: tuple[int, ...] = ()  # slots used by at least one token
    # grouped/uniform: (slot, rows); rows is a slice when contiguous
    groups: list[tuple[int, slice | torch.Tensor]] = field(default_factory=list)
    slots: torch.Tensor | None = None  # per-token slot (int64, -1 for none), a copy of the mapping's
    _masks: dict[int | tuple[int, ...], torch.Tensor] = field(default_factory=dict)

    def mask_for(self, slots: tuple[int, ...]) -> torch.Tensor:
        """(T, len(slots), 1): 1 where slots[p] is token t's slot (the masked path's per-token mask)."""
        m = self._masks.get(slots)
        if m is None:
            m = self.slots.unsqueeze(1) == torch.tensor(slots, dtype=torch.long).unsqueeze(0)
            m = m.to(SHRINK_DTYPE).unsqueeze(-1).contiguous()
            self._masks[slots] = m
        return m

    def mask(self, num_slots: int) -> torch.Tensor:
        """(T, 1, num_slots, 1): 1 where column block s is token t's slot."""
        m = self._masks.get(num_slots)
        if m is None:
            m = self.slots.unsqueeze(1) == torch.arange(num_slots).unsqueeze(0)
            m = m.to(SHRINK_DTYPE).reshape(self.num_tokens, 1, num_slots, 1).contiguous()
            self._masks[num_slots] = m
        return m


def build_plan(slots: Sequence[int] | torch.Tensor,
               masked_max_tokens: int = MASKED_MAX_TOKENS) -> LoRAPlan:
    """slots[t] = adapter slot of token t, -1 for none."""
    s = torch.as_tensor(slots, dtype=torch.long).reshape(-1)
    T = int(s.numel())
    present = torch.unique(s[s >= 0]).tolist() if T else []
    if not present:
        return LoRAPlan(T, "none")
    plan = _plan_kind(s, T, present, masked_max_tokens)
    plan.present = tuple(present)
    if plan.slots is None:
        plan.slots = s.clone()
    return plan


def _plan_kind(s: torch.Tensor, T: int, present: list[int], masked_max_tokens: int) -> LoRAPlan:
    lo, hi = present[0], present[-1]
    no_lora = bool((s < 0).any())
    if len(present) == 1 and not no_lora:
        return LoRAPlan(T, "uniform", lo, hi, groups=[(lo, slice(0, T))])
    groups = _groups(s, present)
    # One adapter on one contiguous run of rows: that slice alone is cheaper than masking.
    single_run = len(groups) == 1 and isinstance(groups[0][1], slice)
    if T <= masked_max_tokens and not single_run:
        return LoRAPlan(T, "masked", lo, hi, groups=groups, slots=s.clone())
    return LoRAPlan(T, "grouped", lo, hi, groups=groups)


def _groups(s: torch.Tensor, present: list[int]) -> list[tuple[int, slice | torch.Tensor]]:
    groups: list[tuple[int, slice | torch.Tensor]] = []
    for slot in present:
        rows = torch.nonzero(s == slot).reshape(-1)
        first, last = int(rows[0]), int(rows[-1])
        if last - first + 1 == rows.numel():
            groups.append((slot, slice(first, last + 1)))
        else:
            groups.append((slot, rows))
    return groups


class FusedLoRA:
    """One layer's stacked LoRA weights, rearranged for whole-batch matmuls.

    a_t: (in, S*K) with K = n_slices * rank; column s*K + i*rank + r is row r of
         slice i's A for slot s. One matmul gives every slice's shrink.
    b_t: (S*K, sum(out_i)); per slot a block-diagonal over slices, so one
         matmul writes every slice's expand into its own column range.
    `for_slots(slots)` gives the columns of a_t and rows of b_t of some slots
    (views for a contiguous run of slots, copies cached otherwise): the
    masked path multiplies only those.
    Rebuilt when any source tensor's version counter moves (set_lora/reset_lora
    write in place, which bumps it) -- or, when the slot layout says which
    slots changed (`refresh`), only those slots' columns and rows are rewritten.
    """

    def __init__(self, lora_a_stacked: Sequence[torch.Tensor],
                 lora_b_stacked: Sequence[torch.Tensor],
                 output_slices: Sequence[int], expand_dtype: torch.dtype,
                 slot_ids: Sequence[int | None] | None = None):
        self.sources = tuple(lora_a_stacked) + tuple(lora_b_stacked)
        self.versions = self._versions(self.sources)
        # The adapter id in each slot when built (vLLM's lora_index_to_id), None if not known.
        self.slot_ids = tuple(slot_ids) if slot_ids is not None else None
        self.expand_dtype = expand_dtype
        # The kernel's copy keeps bfloat16 slots (vLLM's --lora-dtype bfloat16) in bfloat16: the same values in
        # half the bytes and memory. Other dtypes are copied as float32.
        self.kernel_dtype = torch.bfloat16 if all(t.dtype == torch.bfloat16 for t in self.sources) else torch.float32
        self.output_slices = tuple(output_slices)
        n = len(lora_a_stacked)
        S, _, _, d_in = lora_a_stacked[0].shape
        # Slots are padded to --max-lora-rank with zeros; adapters of a lower rank (the usual case) would
        # spend most of these matmuls on zero columns, so keep only the ranks some slot uses.
        rank = used_rank(lora_a_stacked, lora_b_stacked)
        self.rank, self.k = rank, n * rank
        self.total_out = sum(self.output_slices)
        a = torch.stack([w[:, 0, :rank] for w in lora_a_stacked], dim=1)  # (S, n, rank, in)
        self.a_t = a.reshape(S * self.k, d_in).to(SHRINK_DTYPE).t().contiguous()
        b_t = torch.zeros(S, n, rank, self.total_out, dtype=expand_dtype)
        off = 0
        for i, (w, size) in enumerate(zip(lora_b_stacked, self.output_slices)):
            # w: (S, 1, out_i(+pad), max_rank); stock writes only the first `size` columns
            b_t[:, i, :, off:off + size] = w[:, 0, :size, :rank].transpose(1, 2).to(expand_dtype)
            off += size
        self.b_t = b_t.reshape(S * self.k, self.total_out).contiguous()
        self.num_slots = S
        # Slots whose delta is exactly zero for this layer (empty slots, or adapters that do not train this
        # module: vLLM zeroes its slot) are skipped; adding zeros would change nothing.
        a_used = self.a_t.reshape(d_in, S, self.k).ne(0).any(0).any(1)
        b_used = self.b_t.reshape(S, self.k, self.total_out).ne(0).flatten(1).any(1)
        self.in_use = (a_used & b_used).tolist()
        self._in_use_bytes: torch.Tensor | None = None
        self._kernel_weights: tuple[torch.Tensor, torch.Tensor] | None = None
        self.slice_sizes = torch.tensor(self.output_slices, dtype=torch.int64)
        self._selected: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def refresh(self, lora_a_stacked: Sequence[torch.Tensor], lora_b_stacked: Sequence[torch.Tensor],
                output_slices: Sequence[int], expand_dtype: torch.dtype,
                slot_ids: Sequence[int | None] | None) -> bool:
        """Bring the fused weights up to date by rewriting only the slots whose adapter changed; False when
        that cannot be known (then the caller rebuilds everything).

        A slot swap (one adapter loaded into one slot) used to rebuild every slot of every layer: ~24 ms a
        decoder layer at 16 slots here, ~0.7 s a swap for SmolLM2's 30 layers, inside the engine's step.
        vLLM writes a slot's weights only when it activates an adapter there, and an id names immutable
        weights, so the slots whose id differs from when these were built are all that can have changed.
        """
        changed = changed_slots(self.slot_ids, slot_ids)
        if not changed or not self._same_sources(lora_a_stacked, lora_b_stacked, output_slices, expand_dtype):
            return False  # an in-place write the layout does not explain (or nothing known): rebuild
        n, rank, k = len(lora_a_stacked), self.rank, self.k
        for slot in changed:
            if _slot_rank(lora_a_stacked, lora_b_stacked, slot) > rank:
                return False  # a higher rank than any slot had: every slot's columns widen
        d_in = self.a_t.shape[0]
        a_cols = self.a_t.view(d_in, self.num_slots, k)
        b_rows = self.b_t.view(self.num_slots, n, rank, self.total_out)
        for slot in changed:
            a_cols[:, slot] = torch.cat([w[slot, 0, :rank] for w in lora_a_stacked]).to(SHRINK_DTYPE).t()
            b_rows[slot].zero_()
            off = 0
            for i, (w, size) in enumerate(zip(lora_b_stacked, self.output_slices)):
                b_rows[slot, i, :, off:off + size] = w[slot, 0, :size, :rank].t().to(expand_dtype)
                off += size
            self.in_use[slot] = bool(a_cols[:, slot].ne(0).any()) and bool(b_rows[slot].ne(0).any())
            if self._kernel_weights is not None:
                self._write_kernel_slot(slot)
        self._in_use_bytes = None
        for selected in [key for key in self._selected if set(key) & set(changed)]:
            del self._selected[selected]
        self.versions = self._versions(self.sources)
        self.slot_ids = tuple(slot_ids)  # type: ignore[arg-type]
        return True

    def _same_sources(self, lora_a_stacked, lora_b_stacked, output_slices, expand_dtype) -> bool:
        src, na = self.sources, len(lora_a_stacked)
        return (expand_dtype == self.expand_dtype and tuple(output_slices) == self.output_slices
                and len(src) == na + len(lora_b_stacked)
                and all(a is b for a, b in zip(src, lora_a_stacked))
                and all(a is b for a, b in zip(src[na:], lora_b_stacked)))

    def kernel_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """a_t and b_t as lora_kernel.c reads them, one contiguous block per slot: A (S, in, K) and B compact,
        (S, rank, sum(out_i)) with slice i's B^T rows in its own columns (b_t's zero blocks dropped). In the
        engine a slot's LoRA weights come from memory, not cache (the base model's weights stream through
        every cache between two LoRA layers), and read as one stream they took ~25 % less time than strided
        out of a_t's interleaved columns (30 layers' qkv and o, 16 tokens, caches evicted between calls).
        In `kernel_dtype`: float32, or bfloat16 where the slots are (a_t and b_t hold those values exactly)."""
        if self._kernel_weights is None:
            self._kernel_weights = (torch.empty(self.num_slots, self.a_t.shape[0], self.k, dtype=self.kernel_dtype),
                                    torch.empty(self.num_slots, self.rank, self.total_out, dtype=self.kernel_dtype))
            for slot in range(self.num_slots):
                self._write_kernel_slot(slot)
        return self._kernel_weights

    def _write_kernel_slot(self, slot: int) -> None:
        a, b = self._kernel_weights
        k, rank = self.k, self.rank
        a[slot] = self.a_t[:, slot * k:(slot + 1) * k]
        off = 0
        for i, size in enumerate(self.output_slices):
            b[slot, :, off:off + size] = self.b_t[slot * k + i * rank:slot * k + (i + 1) * rank, off:off + size]
            off += size

    def in_use_bytes(self) -> torch.Tensor:
        """`in_use` as a uint8 tensor, for the kernel."""
        if self._in_use_bytes is None:
            self._in_use_bytes = torch.tensor(self.in_use, dtype=torch.uint8)
        return self._in_use_bytes

    def for_slots(self, slots: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(in, len(slots)*K) columns of a_t and (len(slots)*K, sum(out_i)) rows of b_t, slot after slot."""
        k = self.k
        if slots == tuple(range(slots[0], slots[0] + len(slots))):  # a run of slots: views, no copy
            lo, hi = slots[0] * k, (slots[-1] + 1) * k
            return self.a_t[:, lo:hi], self.b_t[lo:hi]
        selected = self._selected.get(slots)
        if selected is None:
            # Copied once per set of slots a batch uses (it changes as requests come and go, not per step);
            # a few sets are kept, the oldest dropped first.
            index = torch.tensor([s * k + j for s in slots for j in range(k)], dtype=torch.long)
            selected = (self.a_t.index_select(1, index), self.b_t.index_select(0, index))
            if len(self._selected) >= 8:
                self._selected.pop(next(iter(self._selected)))
            self._selected[slots] = selected
        return selected

    @staticmethod
    def _versions(ts: Sequence[torch.Tensor]) -> tuple[int, ...]:
        return tuple(t._version for t in ts)

    def is_current(self, lora_a_stacked, lora_b_stacked, output_slices, expand_dtype) -> bool:
        return (self._same_sources(lora_a_stacked, lora_b_stacked, output_slices, expand_dtype)
                and self._versions(self.sources) == self.versions)


def changed_slots(built: Sequence[int | None] | None, now: Sequence[int | None] | None) -> list[int]:
    """Slots whose adapter id differs between two slot layouts; [] when either is unknown or they differ in
    length (callers then rebuild all)."""
    if built is None or now is None or len(built) != len(now):
        return []
    return [slot for slot, (old, new) in enumerate(zip(built, now)) if old != new]


def _slot_rank(lora_a_stacked: Sequence[torch.Tensor], lora_b_stacked: Sequence[torch.Tensor], slot: int) -> int:
    """`used_rank` of one slot."""
    used = torch.zeros(lora_a_stacked[0].shape[2], dtype=torch.bool)
    for a in lora_a_stacked:
        used |= a[slot, 0].ne(0).any(-1)
    for b in lora_b_stacked:
        used |= b[slot, 0].ne(0).any(0)
    nonzero = torch.nonzero(used).reshape(-1)
    return int(nonzero[-1]) + 1 if nonzero.numel() else 0


def used_rank(lora_a_stacked: Sequence[torch.Tensor], lora_b_stacked: Sequence[torch.Tensor]) -> int:
    """The highest rank any slot uses: rows of A or columns of B past it are zero in every slot and slice,
    so dropping them leaves every product unchanged. At least 1, so that empty layers keep their shapes."""
    used = torch.zeros(lora_a_stacked[0].shape[2], dtype=torch.bool)
    for a in lora_a_stacked:  # (S, 1, max_rank, in)
        used |= a.ne(0).any(-1).flatten(0, 1).any(0)
    for b in lora_b_stacked:  # (S, 1, out, max_rank)
        used |= b.ne(0).any(-2).flatten(0, 1).any(0)
    nonzero = torch.nonzero(used).reshape(-1)
    return int(nonzero[-1]) + 1 if nonzero.numel() else 1


def bind_kernel(kernel: ctypes.CDLL, fused: FusedLoRA, scale: float,
                step: lora_kernel.Step) -> lora_kernel.Layer | None:
    """The kernel's call for this layer's fused weights, the tokens' slots read from `step` (None: not a layout
    it reads). Valid while the weights and scale are: the engine's wrapper keeps one per layer until they
    change, and sets its one `step` at each new mapping."""
    a, b = fused.kernel_weights()
    return lora_kernel.bind(kernel, a, b, fused.slice_sizes, fused.in_use_bytes(), scale, step)


def add_lora_linear(y: torch.Tensor, x: torch.Tensor, plan: LoRAPlan,
                    fused: FusedLoRA, scale: float = 1.0, kernel: ctypes.CDLL | None = None) -> None:
    """y[:, :sum(out_i)] += scale * (x @ A[slot(t)]^T) @ B[slot(t)]^T, in place.

    y: (T, >= sum(out_i)), x: (T, in); rows with slot -1 are left untouched. `kernel` (lora_kernel.load())
    does it in one call for float32 tensors (2.8-10x faster than the torch ops below from 1 to 2,048 tokens,
    loadtests/lora_kernel_bench.py); otherwise torch ops. The engine's wrapper binds the call once per layer
    and weights instead (bind_kernel).
    """
    if plan.kind == "none" or not any(fused.in_use[slot] for slot in plan.present):
        return
    if kernel is not None:
        layer = bind_kernel(kernel, fused, scale, lora_kernel.Step(plan.slots))
        if layer is not None and layer(y, x):
            return
    out = y if y.shape[1] == fused.total_out else y[:, :fused.total_out]
    k = fused.k
    if plan.kind == "masked":
        used = tuple(slot for slot in plan.present if fused.in_use[slot])
        a, b = fused.for_slots(used)
        buf = torch.mm(x.to(SHRINK_DTYPE), a)  # (T, len(used)*K)
        buf.view(plan.num_tokens, len(used), k).mul_(plan.mask_for(used))
        if scale != 1.0:
            buf.mul_(scale)
        out.addmm_(buf.to(fused.expand_dtype), b)
        return
    for slot, rows in plan.groups:
        if not fused.in_use[slot]:
            continue
        xs = x[rows]
        buf = torch.mm(xs.to(SHRINK_DTYPE), fused.a_t[:, slot * k:(slot + 1) * k])
        if scale != 1.0:
            buf.mul_(scale)
        b = fused.b_t[slot * k:(slot + 1) * k]
        if isinstance(rows, slice):
            out[rows].addmm_(buf.to(fused.expand_dtype), b)  # a view: no scatter needed
        else:
            _add_to_rows(out, rows, torch.mm(buf.to(fused.expand_dtype), b))


class SlotsInUse:
    """Which slots of stacked LoRA weights (A and B, or the embedding's B alone) are non-zero in all of them.

    vLLM always wraps the lm_head and the embedding in LoRA layers and runs their (vocab-wide) LoRA every
    step, although most adapters train neither and their slots stay zero. Adding an all-zero delta changes
    nothing, so such slots can be skipped. Cached by the tensors' version counters like FusedLoRA.
    """

    def __init__(self, *stacked: torch.Tensor, slot_ids: Sequence[int | None] | None = None):
        self.stacked = stacked
        self.versions = tuple(t._version for t in stacked)
        self.slot_ids = tuple(slot_ids) if slot_ids is not None else None
        nonzero = stacked[0].flatten(1).ne(0).any(1)
        for t in stacked[1:]:
            nonzero &= t.flatten(1).ne(0).any(1)
        self.nonzero = nonzero.tolist()

    def is_current(self, *stacked: torch.Tensor) -> bool:
        return self._same(stacked) and tuple(t._version for t in stacked) == self.versions

    def _same(self, stacked: tuple[torch.Tensor, ...]) -> bool:
        return len(stacked) == len(self.stacked) and all(a is b for a, b in zip(stacked, self.stacked))

    def refresh(self, *stacked: torch.Tensor, slot_ids: Sequence[int | None] | None) -> bool:
        """Re-read only the slots whose adapter changed (see FusedLoRA.refresh); False: rebuild instead."""
        changed = changed_slots(self.slot_ids, slot_ids)
        if not changed or not self._same(stacked):
            return False
        for slot in changed:
            self.nonzero[slot] = all(bool(t[slot].ne(0).any()) for t in stacked)
        self.versions = tuple(t._version for t in stacked)
        self.slot_ids = tuple(slot_ids)  # type: ignore[arg-type]
        return True

    def used_by(self, plan: LoRAPlan) -> bool:
        """Whether any slot the plan's tokens use has weights here (if not, the whole delta is zero)."""
        return plan.kind != "none" and any(self.nonzero[s] for s in plan.present)


def _add_to_rows(y: torch.Tensor, rows: slice | torch.Tensor, delta: torch.Tensor) -> None:
    """y[rows, :width of delta] += delta, for a contiguous slice of rows (a view) or an index tensor."""
    cols = delta.shape[1]
    if isinstance(rows, slice):
        y[rows, :cols].add_(delta)
    else:
        # The rows are distinct: read, add, write back. index_add_ sorts its index on every call (fbgemm's
        # parallel radix sort); under mixed traffic that sort was ~5 % of the engine's time (py-spy --native).
        target = y[:, :cols]
        target.index_put_((rows,), target.index_select(0, rows).add_(delta))


def add_lora_embedding(y: torch.Tensor, x: torch.Tensor, plan: LoRAPlan, lora_b: torch.Tensor,
                       in_use: SlotsInUse) -> None:
    """y[t, :H] += x[t] @ B[s]^T per token t with slot s: the embedding LoRA's expand (its shrink, A, is a
    row lookup vLLM has already done into x). lora_b: (S, 1, H, rank). Rows with slot -1 and all-zero
    slots are skipped."""
    if not in_use.used_by(plan):
        return
    common = min(y.shape[1], lora_b.shape[2])
    for slot, rows in plan.groups:
        if in_use.nonzero[slot]:
            _add_to_rows(y, rows, torch.mm(x[rows].to(y.dtype), lora_b[slot, 0, :common].to(y.dtype).t()))


def add_lora_logits(y: torch.Tensor, x: torch.Tensor, plan: LoRAPlan,
                    lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                    in_use: SlotsInUse) -> None:
    """y[t, :V] += scale * (x[t] @ A[s]^T) @ B[s]^T per request row t with slot s.

    lora_a: (S, 1, rank, hidden), lora_b: (S, 1, V, rank). Rows with slot -1
    and slots whose weights are all zero are skipped (their delta is zero).
    """
    if not in_use.used_by(plan):
        return
    common = min(y.shape[1], lora_b.shape[2])
    for slot, rows in plan.groups:
        if not in_use.nonzero[slot]:
            continue
        buf = torch.mm(x[rows].to(SHRINK_DTYPE), lora_a[slot, 0].to(SHRINK_DTYPE).t())
        if scale != 1.0:
            buf.mul_(scale)
        _add_to_rows(y, rows, torch.mm(buf.to(y.dtype), lora_b[slot, 0, :common].to(y.dtype).t()))

