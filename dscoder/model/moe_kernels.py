"""A Triton kernel for routed experts at decode: matrix-vector products that read only the
chosen experts' rows, by index, straight from the stacked weights.

Gathering `w13[ids]` with torch would first copy the chosen experts (three times the memory
traffic of reading them once) and looping over experts needs their ids on the host (a sync per
layer, which also rules out CUDA graphs). This kernel reads each chosen expert once and takes
the ids from device memory.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path below is used
    triton = None


def available(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda


if triton is not None:

    @triton.jit
    def _expert_gemv(x_ptr, w_ptr, scale_ptr, ids_ptr, out_ptr, x_row_div, stride_we, stride_wn,
                     n_rows: tl.constexpr, n_cols: tl.constexpr, HAS_SCALE: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # grid: (row blocks, chosen pairs). Pair j multiplies expert ids[j] by input row j // x_row_div.
        # HAS_SCALE: w is int8 and row r of expert e is w[e, r] * scale[e, r] (dscoder.model.quant);
        # the int8 values convert exactly to fp32, so only the accumulator is scaled.
        pid_n = tl.program_id(0)
        j = tl.program_id(1)
        expert = tl.load(ids_ptr + j).to(tl.int64)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        w_base = w_ptr + expert * stride_we + rows[:, None].to(tl.int64) * stride_wn
        x_base = x_ptr + (j // x_row_div).to(tl.int64) * n_cols
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, n_cols, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < n_cols
            w = tl.load(w_base + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            x = tl.load(x_base + cols, mask=col_ok, other=0.0)
            acc += tl.sum(w.to(tl.float32) * x[None, :].to(tl.float32), axis=1)
        if HAS_SCALE:
            acc *= tl.load(scale_ptr + expert * n_rows + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + j.to(tl.int64) * n_rows + rows, acc.to(out_ptr.dtype.element_ty), mask=row_ok)


def expert_gemv(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, x_row_div: int,
                scale: torch.Tensor | None = None) -> torch.Tensor:
    """out[j] = w[ids[j]] @ x[j // x_row_div]; x (R, K) contiguous, w (E, N, K), ids (J,);
    with scale (E, N) contiguous, w is int8 and each row is multiplied by its scale."""
    n_pairs, (_, n_rows, n_cols) = ids.numel(), w.shape
    out = torch.empty(n_pairs, n_rows, device=x.device, dtype=x.dtype)
    block_n, block_k = 16, 256
    grid = (triton.cdiv(n_rows, block_n), n_pairs)
    _expert_gemv[grid](x, w, w if scale is None else scale, ids, out, x_row_div, w.stride(0),
                       w.stride(1), n_rows, n_cols, HAS_SCALE=scale is not None,
                       BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out


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
