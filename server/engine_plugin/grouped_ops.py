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
* masked (small decode batches over several adapters): one matmul against
  every present slot's A at once, zero the columns that belong to other slots
  with a per-token mask, one matmul against the stacked B. Costs a few extra
  flops (rank x slots is small) but a fixed, tiny number of ops;
* grouped (large prefill batches): per present slot, its rows (a slice when
  they are contiguous) through the uniform path.

Tokens with slot -1 (no adapter) get nothing added. Note that the stock ops
index `w[-1]`, i.e. they apply the adapter in the *last* slot to such tokens
whenever the batch also holds LoRA tokens; that is a bug (the GPU kernels
skip -1), visible once all `max_loras` slots are occupied.

Numerics mirror the stock ops: the shrink runs in float32 (stock buffers are
float32), the expand in the output's dtype, and `y += delta` is a separate add.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Sequence

import torch

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
    # grouped/uniform: (slot, rows); rows is a slice when contiguous
    groups: list[tuple[int, slice | torch.Tensor]] = field(default_factory=list)
    # masked: (T, slot_hi - slot_lo + 1, 1) 0/1 in SHRINK_DTYPE
    mask: torch.Tensor | None = None


def build_plan(slots: Sequence[int] | torch.Tensor,
               masked_max_tokens: int = MASKED_MAX_TOKENS) -> LoRAPlan:
    """slots[t] = adapter slot of token t, -1 for none."""
    s = torch.as_tensor(slots, dtype=torch.long).reshape(-1)
    T = int(s.numel())
    present = torch.unique(s[s >= 0]).tolist() if T else []
    if not present:
        return LoRAPlan(T, "none")
    lo, hi = present[0], present[-1]
    no_lora = bool((s < 0).any())
    if len(present) == 1 and not no_lora:
        return LoRAPlan(T, "uniform", lo, hi, groups=[(lo, slice(0, T))])
    if T <= masked_max_tokens:
        width = hi - lo + 1
        mask = (s.unsqueeze(1) == torch.arange(lo, hi + 1).unsqueeze(0))
        return LoRAPlan(T, "masked", lo, hi,
                        mask=mask.to(SHRINK_DTYPE).reshape(T, width, 1).contiguous())
    groups: list[tuple[int, slice | torch.Tensor]] = []
    for slot in present:
        rows = torch.nonzero(s == slot).reshape(-1)
        first, last = int(rows[0]), int(rows[-1])
        if last - first + 1 == rows.numel():
            groups.append((slot, slice(first, last + 1)))
        else:
            groups.append((slot, rows))
    return LoRAPlan(T, "grouped", lo, hi, groups=groups)


class FusedLoRA:
    """One layer's stacked LoRA weights, rearranged for whole-batch matmuls.

    a_t: (in, S*K) with K = n_slices * rank; column s*K + i*rank + r is row r of
         slice i's A for slot s. One matmul gives every slice's shrink.
    b_t: (S*K, sum(out_i)); per slot a block-diagonal over slices, so one
         matmul writes every slice's expand into its own column range.
    Rebuilt when any source tensor's version counter moves (set_lora/reset_lora
    write in place, which bumps it).
    """

    def __init__(self, lora_a_stacked: Sequence[torch.Tensor],
                 lora_b_stacked: Sequence[torch.Tensor],
                 output_slices: Sequence[int], expand_dtype: torch.dtype):
        self.sources = tuple(lora_a_stacked) + tuple(lora_b_stacked)
        self.versions = self._versions(self.sources)
        self.expand_dtype = expand_dtype
        self.output_slices = tuple(output_slices)
        n = len(lora_a_stacked)
        S, _, rank, d_in = lora_a_stacked[0].shape
        self.rank, self.k = rank, n * rank
        self.total_out = sum(self.output_slices)
        a = torch.stack([w[:, 0] for w in lora_a_stacked], dim=1)  # (S, n, rank, in)
        self.a_t = a.reshape(S * self.k, d_in).to(SHRINK_DTYPE).t().contiguous()
        b_t = torch.zeros(S, n, rank, self.total_out, dtype=expand_dtype)
        off = 0
        for i, (w, size) in enumerate(zip(lora_b_stacked, self.output_slices)):
            # w: (S, 1, out_i(+pad), rank); stock writes only the first `size` columns
            b_t[:, i, :, off:off + size] = w[:, 0, :size, :].transpose(1, 2).to(expand_dtype)
            off += size
        self.b_t = b_t.reshape(S * self.k, self.total_out).contiguous()

    @staticmethod
    def _versions(ts: Sequence[torch.Tensor]) -> tuple[int, ...]:
        return tuple(t._version for t in ts)

    def is_current(self, lora_a_stacked, lora_b_stacked, output_slices, expand_dtype) -> bool:
        src = self.sources
        na = len(lora_a_stacked)
        return (
            expand_dtype == self.expand_dtype
            and tuple(output_slices) == self.output_slices
            and len(src) == na + len(lora_b_stacked)
            and all(a is b for a, b in zip(src, lora_a_stacked))
            and all(a is b for a, b in zip(src[na:], lora_b_stacked))
            and self._versions(src) == self.versions
        )


def add_lora_linear(y: torch.Tensor, x: torch.Tensor, plan: LoRAPlan,
                    fused: FusedLoRA, scale: float = 1.0) -> None:
    """y[:, :sum(out_i)] += scale * (x @ A[slot(t)]^T) @ B[slot(t)]^T, in place.

    y: (T, >= sum(out_i)), x: (T, in); rows with slot -1 are left untouched.
    """
    if plan.kind == "none":
        return
    out = y if y.shape[1] == fused.total_out else y[:, :fused.total_out]
    k = fused.k
    if plan.kind == "masked":
        lo, hi = plan.slot_lo, plan.slot_hi
        a_t = fused.a_t[:, lo * k:(hi + 1) * k]
        b_t = fused.b_t[lo * k:(hi + 1) * k]
        buf = torch.mm(x.to(SHRINK_DTYPE), a_t)
        buf.view(plan.num_tokens, hi - lo + 1, k).mul_(plan.mask)
        if scale != 1.0:
            buf.mul_(scale)
        out.add_(torch.mm(buf.to(fused.expand_dtype), b_t))
        return
    for slot, rows in plan.groups:
        xs = x[rows]
        buf = torch.mm(xs.to(SHRINK_DTYPE), fused.a_t[:, slot * k:(slot + 1) * k])
        if scale != 1.0:
            buf.mul_(scale)
        delta = torch.mm(buf.to(fused.expand_dtype), fused.b_t[slot * k:(slot + 1) * k])
        if isinstance(rows, slice):
            out[rows].add_(delta)  # a view: no scatter needed
        else:
            out.index_add_(0, rows, delta)
