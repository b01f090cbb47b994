"""Routed experts at decode on the GPU: matrix-vector products (dscoder.model.gemv's kernel)
that read only the chosen experts' rows, by index, straight from the stacked weights.

Gathering `w13[ids]` with torch would first copy the chosen experts (three times the memory
traffic of reading them once) and looping over experts needs their ids on the host (a sync per
layer, which also rules out CUDA graphs). The kernel reads each chosen expert once and takes
the ids from device memory.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dscoder.model.gemv import available, expert_gemv

__all__ = ["available", "routed_experts_decode"]


def routed_experts_decode(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                          w13: torch.Tensor, w2: torch.Tensor, s13: torch.Tensor | None = None,
                          s2: torch.Tensor | None = None) -> torch.Tensor:
    """The routed experts for a few tokens, without host synchronisation. x (T, H), ids (T, k);
    s13, s2: the per-row scales of int8 stacks (None: the stacks are in x's dtype)."""
    t, k = ids.shape
    flat = ids.reshape(-1).contiguous()
    gu = expert_gemv(x.contiguous(), w13, flat, k, s13)  # (T*k, 2I)
    g, u = gu.chunk(2, dim=-1)
    h = (F.silu(g) * u).contiguous()
    y = expert_gemv(h, w2, flat, 1, s2)  # (T*k, H)
    y = y.float() * weights.reshape(-1, 1)
    return y.view(t, k, -1).sum(dim=1).to(x.dtype)
