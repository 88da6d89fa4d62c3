"""The per-token definition of a LoRA linear that the engine plugin's paths are checked against."""

from __future__ import annotations


def reference(y0, x, a, b, slots, out_slices, scale=1.0):
    """y[t] += scale * x[t] @ A[s]^T @ B[s]^T per token t with slot s, none for -1; in float64.

    a, b: vLLM's stacked weights per slice, (slots, 1, rank, in) and (slots, 1, out, rank)."""
    y = y0.clone().double()
    for t, s in enumerate(slots):
        if s < 0:
            continue
        off = 0
        for i, o in enumerate(out_slices):
            h = x[t].double() @ a[i][s, 0].double().t() * scale
            y[t, off:off + o] += h @ b[i][s, 0].double().t()
            off += o
    return y
