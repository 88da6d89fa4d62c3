"""Punica wrapper for vLLM's CPU platform that runs LoRA linears as grouped matmuls.

vLLM's LoRA layers call `punica_wrapper.add_lora_linear` once per wrapped
linear per forward (4 per Llama layer: qkv, o, gate_up, down). The stock CPU
wrapper fans that out into 2 x n_slices per-token gather+einsum ops and also
allocates fresh float32 buffers every call, even when no token uses an adapter.

This subclass keeps all of vLLM's metadata (the parent's `update_metadata`
still runs, so embeddings, logits and anything we do not override behave as
stock), and adds:

* `update_metadata`: builds a `LoRAPlan` from the per-token slot indices.
  vLLM only calls it when the batch's LoRA mapping or slot layout changes, so
  a steady decode batch pays nothing per step.
* `add_lora_logits`: the lm_head LoRA. Stock gathers a (vocab x rank) B per
  request every step (~50 MB for a 49k vocab, 16 requests), even for base-only
  batches and for adapters without lm_head weights (all-zero slots). Here it
  skips zero slots and no-adapter rows, and does one matmul pair per slot.
* `add_lora_embedding`: the same for the embedding's LoRA (stock gathers a
  B per token every step): zero slots and no-adapter rows are skipped.
* `add_lora_linear`: uses the plan and per-layer fused weights (rebuilt only
  when an adapter is loaded into a slot) to do 2-3 matmuls per layer instead
  of 4-12 gathers+einsums -- or, where a C compiler is found, one call into
  the compiled kernel (`lora_kernel.c`), bound once per layer and weights
  (the step's slots reach every layer through one shared `lora_kernel.Step`,
  set at each new mapping) so that a call checks only its rows; returns at
  once when no token has an adapter.

Anything outside what the plan covers (shapes it was not built for, other
tensor layouts) falls back to the stock implementation.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from . import lora_kernel
from .grouped_ops import (
    FusedLoRA,
    LoRAPlan,
    SlotsInUse,
    add_lora_embedding,
    add_lora_linear,
    add_lora_logits,
    bind_kernel,
    build_plan,
)


class _BoundLinear:
    """One layer's kernel call (lora_kernel.Layer) and what it was bound for: the layer's weight tuples and
    their version counters (vLLM writes a slot's weights in place, which moves them), the scale. The step's
    slots are not part of it: the wrapper's one lora_kernel.Step carries them to every layer."""

    __slots__ = ("lora_a", "lora_b", "scale", "sources", "versions", "layer", "idle")

    def __init__(self, lora_a: tuple[torch.Tensor, ...], lora_b: tuple[torch.Tensor, ...], scale: float,
                 versions: tuple[int, ...], layer: lora_kernel.Layer, idle: bool) -> None:
        self.lora_a, self.lora_b, self.scale = lora_a, lora_b, scale
        self.sources = (*lora_a, *lora_b)  # the order of FusedLoRA.sources, whose versions these are
        self.versions, self.layer = list(versions), layer
        # No slot has weights for this layer (the usual case for the MLP's linears: adapters trained on the
        # attention projections leave them zero): its delta is zero for every token, so the call is skipped.
        # New weights in any slot move the versions, and the layer is bound again.
        self.idle = idle

    def serves(self, lora_a: tuple[torch.Tensor, ...], lora_b: tuple[torch.Tensor, ...], scale: float) -> bool:
        return (lora_a is self.lora_a and lora_b is self.lora_b and scale == self.scale
                and [t._version for t in self.sources] == self.versions)

    def __call__(self, y: torch.Tensor, x: torch.Tensor, lora_a: tuple[torch.Tensor, ...],
                 lora_b: tuple[torch.Tensor, ...], scale: float) -> bool:
        """The layer's delta added to y (or nothing to add: idle); False when these are not the weights it was
        bound for, or the kernel declines the rows. One call, for the ~120 a step makes: each Python frame
        and lookup in it runs on caches the base model's weights have just evicted."""
        return self.serves(lora_a, lora_b, scale) and (self.idle or self.layer(y, x))


class QuiverPunicaWrapperCPU(PunicaWrapperCPU):
    def __init__(self, max_num_batched_tokens: int, max_batches: int,
                 device: torch.device | str, **kwargs):
        super().__init__(max_num_batched_tokens, max_batches, device, **kwargs)
        self._plan: LoRAPlan | None = None
        # id(layer.lora_a_stacked[0]) -> fused weights; FusedLoRA.is_current
        # guards against id reuse and in-place weight updates.
        self._fused: dict[int, FusedLoRA] = {}
        self._sampler_plan: LoRAPlan | None = None
        self._logits_in_use: SlotsInUse | None = None
        self._embedding_in_use: SlotsInUse | None = None
        # The adapter id in each slot (vLLM's lora_index_to_id, given with every new layout): which slots a
        # swap changed, so that only those are re-read (FusedLoRA.refresh).
        self._slot_ids: tuple[int | None, ...] | None = None
        # The compiled one-call path (None: torch ops only; see lora_kernel.py); per layer (keyed by its
        # lora_a_stacked tuple, which the entry keeps alive) its call bound for its current weights; and the
        # step's slots, which every bound call reads: one write at each new mapping, no layer re-bound.
        self._kernel = lora_kernel.load()
        self._bound: dict[int, _BoundLinear] = {}
        self._step = lora_kernel.Step()

    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        self._slot_ids = tuple(lora_index_to_id)
        # token_lora_indices: slot per scheduled token, -1 = no adapter (what
        # the stock ops index with), so the plan agrees with stock by design.
        self._plan = build_plan(self.token_lora_indices)
        self._step.set(self._plan.slots)
        # sampler_indices: slot per request row of the logits (-1 = none).
        self._sampler_plan = build_plan(self.sampler_indices)

    def _fused_for(self, lora_a_stacked, lora_b_stacked, output_slices,
                   dtype: torch.dtype) -> FusedLoRA:
        key = id(lora_a_stacked[0])
        fused = self._fused.get(key)
        if fused is None or not fused.is_current(lora_a_stacked, lora_b_stacked,
                                                 output_slices, dtype):
            if fused is None or not fused.refresh(lora_a_stacked, lora_b_stacked, output_slices, dtype,
                                                  self._slot_ids):
                fused = FusedLoRA(lora_a_stacked, lora_b_stacked, output_slices, dtype, self._slot_ids)
                self._fused[key] = fused
        return fused

    def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor,
                        lora_a_stacked: tuple[torch.Tensor, ...],
                        lora_b_stacked: tuple[torch.Tensor, ...],
                        scale: float, output_slices: tuple[int, ...], *,
                        buffer: tuple[torch.Tensor, ...] | None = None,
                        **kwargs: Any) -> None:
        plan = self._plan
        if plan is not None and plan.kind == "none" and x.dim() == 2 and x.shape[0] == plan.num_tokens:
            return None  # no token has an adapter (every step of base-only traffic): nothing to add
        # The hot path: this layer's kernel call, bound for these weights (identity and version checks only),
        # reading the step's slots from self._step. The general path below costs ~15-25 us a call in checks and
        # lookups, and a step makes ~120 calls: ~2 % of a decode step here, or ~2.3 ms at every new mapping
        # (a request joining or leaving the batch) when a plan change re-bound every layer.
        bound = self._bound.get(id(lora_a_stacked))
        if bound is not None and bound(y, x, lora_a_stacked, lora_b_stacked, scale):
            return None
        x2 = x.view(-1, x.shape[-1])
        if (
            plan is None
            or x2.shape[0] != plan.num_tokens
            or len(lora_a_stacked) != len(lora_b_stacked)
            or any(w.dim() != 4 for w in lora_a_stacked)
            or any(w.dim() != 4 for w in lora_b_stacked)
        ):
            return super().add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale,
                                           output_slices, buffer=buffer, **kwargs)
        if plan.kind == "none":
            return None
        y2 = y.view(-1, y.shape[-1])
        fused = self._fused_for(lora_a_stacked, lora_b_stacked, output_slices, y.dtype)
        layer = bind_kernel(self._kernel, fused, scale, self._step) if self._kernel is not None else None
        if layer is not None:
            self._bound[id(lora_a_stacked)] = _BoundLinear(lora_a_stacked, lora_b_stacked, scale, fused.versions,
                                                           layer, idle=not any(fused.in_use))
            if layer(y2, x2):
                return None
        add_lora_linear(y2, x2, plan, fused, scale)  # the torch ops
        return None

    def add_lora_logits(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: torch.Tensor,
                        lora_b_stacked: torch.Tensor, scale, *,
                        buffer: torch.Tensor | None = None, **kwargs: Any) -> None:
        plan = self._sampler_plan
        y2, x2 = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
        if (
            plan is None
            or x2.shape[0] != plan.num_tokens
            or lora_a_stacked.dim() != 4
            or lora_b_stacked.dim() != 4
        ):
            return super().add_lora_logits(y, x, lora_a_stacked, lora_b_stacked, scale,
                                           buffer=buffer, **kwargs)
        in_use = self._logits_in_use
        if in_use is None or not in_use.is_current(lora_a_stacked, lora_b_stacked):
            if in_use is None or not in_use.refresh(lora_a_stacked, lora_b_stacked, slot_ids=self._slot_ids):
                in_use = self._logits_in_use = SlotsInUse(lora_a_stacked, lora_b_stacked, slot_ids=self._slot_ids)
        add_lora_logits(y2, x2, plan, lora_a_stacked, lora_b_stacked, scale, in_use)
        return None

    def add_lora_embedding(self, y: torch.Tensor, x: torch.Tensor, lora_b_stacked: torch.Tensor,
                           add_inputs: bool = True, **kwargs: Any) -> None:
        plan = self._plan
        y2, x2 = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
        if plan is None or not add_inputs or x2.shape[0] != plan.num_tokens or lora_b_stacked.dim() != 4:
            return super().add_lora_embedding(y, x, lora_b_stacked, add_inputs, **kwargs)
        in_use = self._embedding_in_use
        if in_use is None or not in_use.is_current(lora_b_stacked):
            if in_use is None or not in_use.refresh(lora_b_stacked, slot_ids=self._slot_ids):
                in_use = self._embedding_in_use = SlotsInUse(lora_b_stacked, slot_ids=self._slot_ids)
        add_lora_embedding(y2, x2, plan, lora_b_stacked, in_use)
        return None
