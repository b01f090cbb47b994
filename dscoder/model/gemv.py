"""One Triton matrix-vector kernel for the decode step: the dense projections, and the routed
experts picked by index (dscoder.model.moe_kernels).

At decode every weight multiplies one row. cuBLAS picks GEMM tiles for that and reached about
1.3 TB/s on the dense projections of Lite (H100: 3.35 TB/s), so those took more time than the
routed experts, which read twice the bytes; gathering chosen experts with torch would copy them
first. This kernel streams each matrix once, a band of rows per program, into a 2-D fp32
accumulator summed once at the end (no reduction inside the loop), the weights marked
evict-first (they are read once; the input row stays in cache).

Experts: the ids come from device memory (no host sync, so the step can be graph-captured);
int8 stacks carry one scale per row (dscoder.model.quant), applied to the row's sum.

DSCODER_TRITON_GEMV=0 sends the dense projections to cuBLAS instead, for comparison.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from dscoder.model import custom_ops, pdl
from dscoder.model.triton_launch import launch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: torch paths everywhere
    triton = None

ENABLED = os.environ.get("DSCODER_TRITON_GEMV", "1") != "0"
# Tiles: one row a program, 1024 columns a step, 4 warps; rows of at most 2048 columns that are
# not a multiple of 1024 (the experts' down projection: 1,408) two rows a program in one step
# of 2048 columns, not a full step and a mostly masked one. benchmarks/bench_gemv.py, H100,
# CUDA graphs: the experts' down projection 16.8-17.1 us against 20.6 with the first tiles; the
# first tiles within 1-3% of the best swept for every other decode shape of Lite.
BLOCK_N, BLOCK_K, WARPS = 1, 1024, 4
SHORT_ROW_TILES = (2, 2048, 4)


def default_tiles(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, warps) for rows of n_cols columns (see above)."""
    if n_cols <= SHORT_ROW_TILES[1] and n_cols % BLOCK_K:
        return SHORT_ROW_TILES
    return BLOCK_N, BLOCK_K, WARPS


def available(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda


def _takes(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether a dense product goes through the kernel: one row on a GPU, in half precision."""
    return (ENABLED and x.shape[0] == 1 and available(x)
            and x.dtype in (torch.bfloat16, torch.float16) and w.dtype == x.dtype)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) (no bias), through the kernel where it takes the call (_takes)."""
    return gemv(x, w) if _takes(x, w) else F.linear(x, w)


class Extra(NamedTuple):
    """Matrices appended to an expert stack's pairs: the shared experts, run as extra experts of
    the same launch. Pair ids.numel() + p multiplies matrix p, whose row r starts at element
    p * stride_e + (r // half) * stride_half + (r % half) * stride_n of `w` (columns contiguous,
    rows and columns as many as the stack's). `half` splits rows in two runs: the first half
    of a gate-and-up matrix comes from the gate rows, the second from the up rows."""

    w: torch.Tensor
    count: int
    stride_e: int
    stride_n: int
    stride_half: int
    half: int


if triton is not None:

    @triton.jit
    def _gemv(x_ptr, w_ptr, scale_ptr, ids_ptr, out_ptr, x_row_div, stride_we, stride_wn,
              extra_ptr, n_ids, stride_ee, stride_en, stride_ehalf,
              n_rows: tl.constexpr, n_cols: tl.constexpr, HAS_IDS: tl.constexpr,
              HAS_SCALE: tl.constexpr, EXTRA_HALF: tl.constexpr, GLU: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
              PRELOAD: tl.constexpr):
        # grid: (row blocks, pairs). Pair j < n_ids multiplies matrix ids[j] of the stack w
        # (matrix 0 without ids), pair n_ids + p matrix p of the extra stack (see Extra), by
        # input row j // x_row_div. HAS_SCALE: w is int8 and row r of matrix e is
        # w[e, r] * scale[e, r]; int8 converts exactly to fp32, so only the sum is scaled.
        # PDL: see dscoder.model.pdl. PRELOAD (one dense matrix): its first tile is read before
        # the wait, the rest of the kernel after it. GLU (0 or 1): each matrix is a gate half
        # over an up half, and output row r is silu(gate row r . x) * (up row r . x): a
        # program reads both rows of each of its BLOCK_N outputs
        if PDL and not PRELOAD:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        j = tl.program_id(1)
        if HAS_IDS:
            matrix = tl.load(ids_ptr + j, mask=j < n_ids, other=0).to(tl.int64)
        else:
            matrix = 0
        n_out: tl.constexpr = n_rows // (1 + GLU)
        out_rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        if GLU:  # weight rows in pairs: gate row r, then up row r + n_out
            i = tl.arange(0, 2 * BLOCK_N)
            rows = tl.program_id(0) * BLOCK_N + i // 2 + (i % 2) * n_out
            row_ok = tl.program_id(0) * BLOCK_N + i // 2 < n_out
        else:
            rows = out_rows
            row_ok = rows < n_rows
        r = rows[:, None].to(tl.int64)
        base = w_ptr
        offset = matrix * stride_we + r * stride_wn
        if j >= n_ids:
            base = extra_ptr
            offset = ((j - n_ids).to(tl.int64) * stride_ee + (r // EXTRA_HALF) * stride_ehalf
                      + (r % EXTRA_HALF) * stride_en)
        w_base = base + offset
        x_base = x_ptr + (j // x_row_div).to(tl.int64) * n_cols
        acc = tl.zeros([BLOCK_N * (1 + GLU), BLOCK_K], dtype=tl.float32)
        if PRELOAD:  # the first tile, then the wait; the loop takes the other tiles
            cols = tl.arange(0, BLOCK_K)
            col_ok = cols < n_cols
            w = tl.load(w_base + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0,
                        eviction_policy="evict_first")
            if PDL:
                tl.extra.cuda.gdc_wait()
                tl.extra.cuda.gdc_launch_dependents()
            x = tl.load(x_base + cols, mask=col_ok, other=0.0)
            acc += w.to(tl.float32) * x[None, :].to(tl.float32)
        for k0 in range(BLOCK_K if PRELOAD else 0, n_cols, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < n_cols
            w = tl.load(w_base + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0,
                        eviction_policy="evict_first")
            x = tl.load(x_base + cols, mask=col_ok, other=0.0)
            acc += w.to(tl.float32) * x[None, :].to(tl.float32)
        out = tl.sum(acc, axis=1)
        if HAS_SCALE:
            out *= tl.load(scale_ptr + matrix * n_rows + rows, mask=row_ok, other=0.0).to(tl.float32)
        dtype = out_ptr.dtype.element_ty
        if GLU:
            gate, up = tl.split(tl.reshape(out, [BLOCK_N, 2]))
            # rounded as the unfused step rounds: gate and up stored in the output dtype, then
            # the SwiGLU product in fp32 (as Inductor's fused kernel computes it)
            gate = gate.to(dtype).to(tl.float32)
            out = gate / (1.0 + tl.exp(-gate)) * up.to(dtype).to(tl.float32)
        tl.store(out_ptr + j.to(tl.int64) * n_out + out_rows, out.to(dtype), mask=out_rows < n_out)


def gemv(x: torch.Tensor, w: torch.Tensor, block_n: int | None = None, block_k: int | None = None,
         warps: int | None = None, glu: bool = False) -> torch.Tensor:
    """x (1, K) @ w (N, K).T -> (1, N); w's rows may be strided (a slice of a fused weight).
    glu: w is a gate half over an up half and the result silu(gate) * up, (1, N / 2)."""
    return _launch(x.contiguous(), w.unsqueeze(0), None, None, 1, 1, block_n, block_k, warps, glu=glu)


def expert_gemv(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, x_row_div: int,
                scale: torch.Tensor | None = None, extra: Extra | None = None,
                block_n: int | None = None, block_k: int | None = None,
                warps: int | None = None, glu: bool = False) -> torch.Tensor:
    """out[j] = w[ids[j]] @ x[j // x_row_div]; x (R, K) contiguous, w (E, N, K), ids (J,);
    with scale (E, N) contiguous, w is int8 and each row is multiplied by its scale. extra:
    more matrices after the J pairs (out[J + p], see Extra; not with int8 stacks). glu: each
    matrix is a gate half over an up half, out[j] = silu(gate . x) * (up . x), N / 2 wide."""
    return _launch(x, w, ids, scale, ids.numel(), x_row_div, block_n, block_k, warps, extra, glu)


def linear_glu(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of (gate, up) = F.linear(x, w) split in halves: the first half of a
    SwiGLU, one product. Through the kernel where it takes the call (_takes), which applies the
    SwiGLU product to its sums (no separate elementwise kernel)."""
    if _takes(x, w):
        return gemv(x, w, glu=True)
    gate, up = F.linear(x, w).chunk(2, dim=-1)
    return F.silu(gate) * up


def _launch(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor | None, scale: torch.Tensor | None,
            pairs: int, x_row_div: int, block_n: int | None, block_k: int | None,
            warps: int | None, extra: Extra | None = None, glu: bool = False) -> torch.Tensor:
    _, n_rows, n_cols = w.shape
    assert w.stride(2) == 1, "the kernel reads rows of contiguous columns"
    assert not glu or n_rows % 2 == 0, "a gate half over an up half"
    if extra is None:  # no pair reaches it
        extra = Extra(w, 0, 0, 0, 0, 1)
    assert scale is None or extra.count == 0, "extra matrices have no int8 scales"
    assert extra.w.dtype == w.dtype
    bn, bk, nw = default_tiles(n_cols)
    args = (x, w, ids, scale, pairs, x_row_div, block_n or bn, block_k or bk, warps or nw, glu, *extra)
    if torch.compiler.is_compiling():  # an opaque operator, see register_op
        return torch.ops.dscoder.gemv(*args)
    return _run(*args)


def _run(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor | None, scale: torch.Tensor | None,
         pairs: int, x_row_div: int, bn: int, bk: int, warps: int, glu: bool, extra_w: torch.Tensor,
         extra_count: int, stride_e: int, stride_n: int, stride_half: int, half: int) -> torch.Tensor:
    """The launch, its arguments flat (_launch's, with the tiles and the Extra's fields)."""
    _, n_rows, n_cols = w.shape
    n_out = n_rows // 2 if glu else n_rows
    out = torch.empty(pairs + extra_count, n_out, device=x.device, dtype=x.dtype)
    launch(_gemv, (triton.cdiv(n_out, bn), pairs + extra_count),
           x, w, w if scale is None else scale, w if ids is None else ids, out, x_row_div,
           w.stride(0), w.stride(1), extra_w, pairs, stride_e, stride_n, stride_half, n_rows, n_cols,
           HAS_IDS=ids is not None, HAS_SCALE=scale is not None, EXTRA_HALF=half, GLU=int(glu),
           BLOCK_N=bn, BLOCK_K=bk, PDL=pdl.enabled(x.device), PRELOAD=ids is None, num_warps=warps,
           **pdl.launch_options(x.device))
    return out


def register_op() -> None:
    """Define dscoder::gemv, which compiled code calls instead of tracing the kernel (see
    dscoder.model.custom_ops)."""
    if triton is not None:
        custom_ops.define_once("dscoder::gemv", _define_op)


def _define_op() -> None:
    @torch.library.custom_op("dscoder::gemv", mutates_args=())
    def _gemv_op(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor | None, scale: torch.Tensor | None,
                 pairs: int, x_row_div: int, bn: int, bk: int, warps: int, glu: bool,
                 extra_w: torch.Tensor, extra_count: int, stride_e: int, stride_n: int,
                 stride_half: int, half: int) -> torch.Tensor:
        return _run(x, w, ids, scale, pairs, x_row_div, bn, bk, warps, glu, extra_w, extra_count,
                    stride_e, stride_n, stride_half, half)

    @_gemv_op.register_fake
    def _(x, w, ids, scale, pairs, x_row_div, bn, bk, warps, glu, extra_w, extra_count, *rest):
        return x.new_empty(pairs + extra_count, w.shape[1] // 2 if glu else w.shape[1])
