"""A Triton matrix-vector product for the decode step's dense projections.

At decode a projection multiplies one row by a matrix of 4-15 MB (Lite); cuBLAS picks GEMM
tiles for it and reached about 1.3 TB/s of the H100's 3.35 (BENCHMARKS.md, kernel profile), so
the dense projections took more time than the routed experts, which read twice the bytes.
This kernel streams the matrix once, each program a band of rows, accumulating in fp32.

DSCODER_TRITON_GEMV=0 turns it off (cuBLAS everywhere), for comparison.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

ENABLED = os.environ.get("DSCODER_TRITON_GEMV", "1") != "0"
BLOCK_N, BLOCK_K, WARPS = 2, 1024, 4  # the best of bench_gemv.py's sweep on an H100 for every Lite shape


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) (no bias); one row on a GPU in half precision goes through the kernel."""
    if (triton is None or not ENABLED or x.shape[0] != 1 or not x.is_cuda
            or x.dtype not in (torch.bfloat16, torch.float16) or w.dtype != x.dtype):
        return F.linear(x, w)
    return gemv(x, w)


if triton is not None:

    @triton.jit
    def _gemv(x_ptr, w_ptr, out_ptr, n_rows, stride_wn, n_cols: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        w_base = w_ptr + rows[:, None].to(tl.int64) * stride_wn
        # a 2-D accumulator, reduced once at the end: no reduction inside the loop
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, n_cols, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < n_cols
            w = tl.load(w_base + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0,
                        eviction_policy="evict_first")
            x = tl.load(x_ptr + cols, mask=col_ok, other=0.0)
            acc += w.to(tl.float32) * x[None, :].to(tl.float32)
        tl.store(out_ptr + rows, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=row_ok)


def gemv(x: torch.Tensor, w: torch.Tensor, block_n: int | None = None, block_k: int | None = None,
         warps: int | None = None) -> torch.Tensor:
    """x (1, K) @ w (N, K).T -> (1, N); w's rows may be strided (a slice of a fused weight)."""
    n, k = w.shape
    assert w.stride(1) == 1, "the kernel reads rows of contiguous columns"
    x = x.contiguous()
    out = torch.empty(1, n, device=x.device, dtype=x.dtype)
    bn, bk = block_n or BLOCK_N, block_k or BLOCK_K
    _gemv[(triton.cdiv(n, bn),)](x, w, out, n, w.stride(0), k, BLOCK_N=bn, BLOCK_K=bk,
                                 num_warps=warps or WARPS)
    return out
