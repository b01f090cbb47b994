"""Routed experts at decode on the GPU: matrix-vector products (dscoder.model.gemv's kernel)
that read only the chosen experts' rows, by index, straight from the stacked weights.

Gathering `w13[ids]` with torch would first copy the chosen experts (three times the memory
traffic of reading them once) and looping over experts needs their ids on the host (a sync per
layer, which also rules out CUDA graphs). The kernel reads each chosen expert once and takes
the ids from device memory.

For one token the shared experts join the same two launches as extra experts (gemv.Extra):
their GEMVs were small enough to run far below bandwidth on their own, and each was two more
kernels a layer.
"""
from __future__ import annotations

import torch

from dscoder.model.gemv import Extra, available, expert_gemv

__all__ = ["available", "routed_experts_decode", "shared_as_experts"]


def routed_experts_decode(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                          w13: torch.Tensor, w2: torch.Tensor, s13: torch.Tensor | None = None,
                          s2: torch.Tensor | None = None,
                          shared: tuple[Extra, Extra] | None = None) -> torch.Tensor:
    """The routed experts for a few tokens, without host synchronisation. x (T, H), ids (T, k);
    s13, s2: the per-row scales of int8 stacks (None: the stacks are in x's dtype). shared:
    the shared experts as extra experts (shared_as_experts; one token only), added with
    weight 1."""
    t, k = ids.shape
    flat = ids.reshape(-1).contiguous()
    extra13, extra2 = shared if shared is not None else (None, None)
    n = extra13.count if extra13 is not None else 0
    assert n == 0 or t == 1, "shared experts join the launch for one token"
    h = expert_gemv(x.contiguous(), w13, flat, k + n, s13, extra13, glu=True)  # (T*k + n, I)
    y = expert_gemv(h, w2, flat, 1, s2, extra2).float()  # (T*k + n, H)
    out = (y[:t * k] * weights.reshape(-1, 1)).view(t, k, -1).sum(dim=1)
    if n:
        out = out + y[t * k:].sum(dim=0)
    return out.to(x.dtype)


def shared_as_experts(gate_up: torch.Tensor, down: torch.Tensor, intermediate: int) -> tuple[Extra, Extra]:
    """The shared experts' weights (gate_up (2 * n * I, H), gate rows then up rows; down (H, n * I))
    as n experts of the routed stacks' shapes, w13 (2I, H) and w2 (H, I), without a copy: expert
    p's w13 is gate rows p*I.. then up rows p*I.., its w2 the columns p*I.. of down. The sum of
    their outputs is the shared MLP's (SwiGLU is a sum over its intermediate units)."""
    i = intermediate
    n = down.shape[1] // i
    assert n * i == down.shape[1] and gate_up.shape[0] == 2 * n * i and down.stride(1) == 1
    rs = gate_up.stride(0)
    return (Extra(gate_up, n, stride_e=i * rs, stride_n=rs, stride_half=n * i * rs, half=i),
            Extra(down, n, stride_e=i, stride_n=down.stride(0), stride_half=0, half=down.shape[0]))
