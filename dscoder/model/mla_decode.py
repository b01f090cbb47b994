"""Absorbed multi-head latent attention for one decode token: one Triton kernel over the cache.

The torch path (MLAttention._attend_absorbed) makes four cuBLAS products and a masked softmax a
layer; at long context the two products over the cache read it far below bandwidth. Here, as in
flash-decoding and FlashMLA, the cache rows are split among many programs: each program takes a
block of heads (BLOCK_H queries as the M dimension of tensor-core products) and a share of the
rows, streams them in blocks of BLOCK_T rows ([latent | k_pe], read once for both products),
keeps an online softmax (running max and sum) and an fp32 accumulator of probs @ latent, and
writes those partials; a second small kernel combines the splits into out_lat.

Numerics follow the torch path: fp32 scores of the [q_lat | q_pe] . [latent | k_pe] product,
fp32 softmax, the probabilities rounded to the cache dtype before the product with the latents
(fp32 accumulation).

Rows: with `pos` (a one-element device tensor, as under CUDA graphs) rows <= pos are valid, else
all S. The split layout is computed inside the kernel from the valid length: a graph captured
at S = 32K with a 2K conversation spreads those 2K rows over the programs, and programs with no
rows return before loading anything. The grid depends only on the number of heads, so it is
fixed at capture and never depends on the position.

On by default where Triton and CUDA are there and the tiles fit (Hopper), with the value
projection (out_lat @ W_uv.T) folded into the combine kernel; DSCODER_TRITON_MLA=0 sends decode
attention back to the torch path, DSCODER_TRITON_MLA=nouv leaves the value projection to cuBLAS
after the kernel.

Not folded: the query's key projection (q_lat = q_nope @ W_uk, 2 MB of weights for Lite's 16
heads). Every split of a head block needs the whole q_lat of its heads, so each of the 66
programs would read those 2 MB (about 130 MB from L2 a layer) or wait for one that computed it.
"""
from __future__ import annotations

import os

import torch

from dscoder.model import custom_ops, pdl
from dscoder.model.triton_launch import launch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path
    triton = None

# On by default where a program may have the shared memory the tiles below want (Hopper: 227 kB):
# inside the compiled decode step on an H100 it took decode from 301.7 to 318.1 tok/s at a 2K
# context and from 187.3 to 272.1 at 32K (BENCHMARKS.md). Cards with less (A100: 163 kB, consumer
# cards about 99 kB) could not launch it: the torch path there. DSCODER_TRITON_MLA=0 turns it off
# everywhere, =1 on everywhere (where the tiles do not fit, the launch fails).
_SWITCH = os.environ.get("DSCODER_TRITON_MLA", "")
ENABLED = _SWITCH != "0"
FORCED = _SWITCH == "1"
SHARED_MEMORY = 200 << 10  # bytes of shared memory a program may have, enough for the tiles (164 kB)
# The W_uv product (out_lat @ W_uv.T) runs in the combine kernel: one cuBLAS launch fewer a
# layer. Decode at 2K on an H100 went from 341.3 to 350.4 tok/s, at 32K from 287.5 to 298.7
# (BENCHMARKS.md). DSCODER_TRITON_MLA=nouv: the product by cuBLAS after the kernel, to compare.
FUSE_UV = _SWITCH != "nouv"

BLOCK_H = 16  # heads a program takes: the smallest M of a tensor-core product (Lite has 16)
# Programs over the rows, per block of heads, in all: half the SMs of an H100 or H200, so that
# at 32K each streams 500 rows (580 kB). One per SM (132) was the choice before the kernels
# launched with PDL (dscoder.model.pdl); with it, the kernels around attention start on the
# SMs left free: decode on an H100 at 2K / 32K, one machine, 379.3 / 318.8 tok/s with 132 and
# 381.5 / 324.2 with 66 (BENCHMARKS.md). The grid is fixed (the same for every length: a
# captured graph serves a whole bucket); short contexts use fewer of them (MIN_ROWS), the
# others return at once.
SPLITS = 66
# Rows of one step of a program: 64 rows x 576 bf16 = 72 kB per step, and STAGES - 1 = 2 steps
# in flight (cp.async double buffering): 164 kB of the H100's 227 kB of shared memory, 138
# registers a thread at 4 warps (compiled for sm_90: no spills). One program fits on an SM,
# with 144 kB in flight.
BLOCK_T = 64
# Rows a split takes at least: below one block, a split's fixed cost (loading the queries,
# writing 16 x 512 fp32 partials for the combine, 32 kB that stay in L2) outweighs its share of
# the cache. At 2K that is 32 splits of one block each: one SM alone streams only about 100 GB/s,
# so the 2.4 MB of a short cache go faster over 32 SMs (0.7 us each) than over 16 (1.3 us).
MIN_ROWS = 64
WARPS = 4
STAGES = 3
COMBINE_SPLITS = 16  # partials the combine kernel reads at once
COMBINE_D = 128  # latent columns per combine program: 16 heads x 4 = 64 programs for Lite
# With W_uv folded in, rows of W_uv[h] per combine program: 16 heads x 4 = 64 programs for Lite
# (v = 128), each reading 32 x 512 of W_uv; each recombines its head's whole latent row, partials
# read 4 times but from L2.
COMBINE_V = 32
LOG2E = 1.4426950408889634  # the kernels take exp(x) as 2^(x log2(e)): scores arrive scaled by it


def available(q: torch.Tensor, cached: torch.Tensor) -> bool:
    """Whether the kernel takes this call: triton installed, CUDA, half precision, switch on, and
    a device with the shared memory its tiles need (or the switch forced on)."""
    return (ENABLED and triton is not None and q.is_cuda
            and q.dtype in (torch.bfloat16, torch.float16) and cached.dtype == q.dtype
            and (FORCED or fits(q.device)))


_FITS: dict[int, bool] = {}  # device index -> fits (a plain dict: compiled code reads it too)


def fits(device: torch.device) -> bool:
    """Whether a program on `device` may have the shared memory that the default tiles need (the
    opt-in limit per block; a torch without it: the SM's, which is a few kB more)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _FITS:
        props = torch.cuda.get_device_properties(index)
        limit = (getattr(props, "shared_memory_per_block_optin", 0)
                 or getattr(props, "shared_memory_per_multiprocessor", 0))
        _FITS[index] = limit >= SHARED_MEMORY
    return _FITS[index]


def _pow2(n: int) -> int:
    """The smallest power of two >= n, at least 16 (the smallest side of a tl.dot)."""
    p = 16
    while p < n:
        p *= 2
    return p


# Triton's interpreter (TRITON_INTERPRET=1, the CPU tests) multiplies bf16 operands of tl.dot as
# their raw 16-bit patterns, and rounds fp32 to bf16 toward zero: there (UPCAST) the operands go
# to fp32 first, which gives the same products (a product of two halves is exact in fp32) and
# the same fp32 sums up to their order, and roundings to bf16 are made to the nearest, as on a GPU.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

if triton is not None:

    @triton.jit
    def _dot(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        # IEEE: fp32 operands multiplied as fp32, not as tf32 (Triton's default for fp32)
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc=acc, input_precision="ieee")
        elif IEEE:
            acc = tl.dot(a, b, acc=acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc=acc)
        return acc

    @triton.jit
    def _round(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
        # fp32 x to dtype, to the nearest (even); see _INTERPRET
        if UPCAST:
            if dtype == tl.bfloat16:
                bits = x.to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                x = bits.to(tl.float32, bitcast=True)  # exact in bf16 now
        return x.to(dtype)

    @triton.jit
    def _split_rows(pos_ptr, n_rows, HAS_POS: tl.constexpr, SPLITS: tl.constexpr,
                    MIN_ROWS: tl.constexpr, BLOCK_T: tl.constexpr):
        # (valid rows, rows per split): the valid rows cut in SPLITS shares of whole blocks,
        # MIN_ROWS at least; split i takes rows [i * per, (i + 1) * per) below valid
        if HAS_POS:
            valid = tl.minimum(tl.load(pos_ptr).to(tl.int32) + 1, n_rows)
        else:
            valid = n_rows
        per = tl.maximum(tl.cdiv(valid, SPLITS), MIN_ROWS)
        return valid, tl.cdiv(per, BLOCK_T) * BLOCK_T

    @triton.jit
    def _mla_split(q_lat_ptr, q_pe_ptr, kv_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr, n_rows,
                   stride_ql, stride_qp, stride_kv, scale_log2,
                   HEADS: tl.constexpr, RANK: tl.constexpr, ROPE: tl.constexpr,
                   RANK_P: tl.constexpr, ROPE_P: tl.constexpr, HAS_POS: tl.constexpr,
                   SPLITS: tl.constexpr, MIN_ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_T: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                   PDL: tl.constexpr):
        # grid: (SPLITS, head blocks). Partials per (split, head): running max m (log2 units),
        # sum l, accumulator acc (RANK) = sum_t 2^(s_t - m) latent_t.
        if PDL:  # dscoder.model.pdl: all it reads was written just before (the query, the new row)
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        split = tl.program_id(0)
        hb = tl.program_id(1)
        valid, per = _split_rows(pos_ptr, n_rows, HAS_POS, SPLITS, MIN_ROWS, BLOCK_T)
        start = split * per
        if start < valid:  # a split beyond the valid rows loads nothing
            end = tl.minimum(start + per, valid)
            heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
            head_ok = heads < HEADS
            d = tl.arange(0, RANK_P)
            d_ok = d < RANK
            r = tl.arange(0, ROPE_P)
            r_ok = r < ROPE
            q_lat = tl.load(q_lat_ptr + heads[:, None] * stride_ql + d[None, :],
                            mask=head_ok[:, None] & d_ok[None, :], other=0.0)
            q_pe = tl.load(q_pe_ptr + heads[:, None] * stride_qp + r[None, :],
                           mask=head_ok[:, None] & r_ok[None, :], other=0.0)
            m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
            total = tl.zeros([BLOCK_H], dtype=tl.float32)
            acc = tl.zeros([BLOCK_H, RANK_P], dtype=tl.float32)
            for t0 in range(start, end, BLOCK_T):
                rows = t0 + tl.arange(0, BLOCK_T)
                row_ok = rows < end
                base = kv_ptr + rows[:, None].to(tl.int64) * stride_kv
                lat = tl.load(base + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                k_pe = tl.load(base + RANK + r[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
                s = tl.zeros([BLOCK_H, BLOCK_T], dtype=tl.float32)
                s = _dot(q_lat, tl.trans(lat), s, IEEE, UPCAST)
                s = _dot(q_pe, tl.trans(k_pe), s, IEEE, UPCAST)
                s = tl.where(row_ok[None, :], s * scale_log2, float("-inf"))  # (BLOCK_H, BLOCK_T)
                m_new = tl.maximum(m, tl.max(s, axis=1))
                alpha = tl.exp2(m - m_new)
                p = tl.exp2(s - m_new[:, None])
                total = total * alpha + tl.sum(p, axis=1)
                # the probabilities in the cache dtype, as the torch path rounds them
                acc = _dot(_round(p, lat.dtype, UPCAST), lat, acc * alpha[:, None], IEEE, UPCAST)
                m = m_new
            at = split * HEADS + heads
            tl.store(m_ptr + at, m, mask=head_ok)
            tl.store(l_ptr + at, total, mask=head_ok)
            tl.store(acc_ptr + at[:, None].to(tl.int64) * RANK + d[None, :], acc,
                     mask=head_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _mla_combine(pos_ptr, m_ptr, l_ptr, acc_ptr, w_ptr, out_ptr, n_rows, stride_wh, stride_wv,
                     HEADS: tl.constexpr, RANK: tl.constexpr, VDIM: tl.constexpr,
                     HAS_POS: tl.constexpr, HAS_UV: tl.constexpr, SPLITS: tl.constexpr,
                     SPLITS_P: tl.constexpr, MIN_ROWS: tl.constexpr, BLOCK_T: tl.constexpr,
                     CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
                     UPCAST: tl.constexpr, PDL: tl.constexpr):
        # grid: (HEADS, blocks). The splits _mla_split wrote, weighted by 2^(m - max m) and
        # normalised: out_lat; a block is BLOCK_D of its columns. HAS_UV: a block is BLOCK_V
        # rows of W_uv[h] (VDIM, RANK), BLOCK_D covers the whole latent, and the output is
        # out_lat (rounded to the output dtype, as the torch path's is) @ W_uv[h].T.
        # (Reading W_uv before the PDL wait was slower: the tile, held in registers across the
        # loop over splits, took decode at 32K on an H100 from 319 to 277 tok/s.)
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        h = tl.program_id(0)
        if HAS_UV:
            cols = tl.arange(0, BLOCK_D)
        else:
            cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < RANK
        valid, per = _split_rows(pos_ptr, n_rows, HAS_POS, SPLITS, MIN_ROWS, BLOCK_T)
        used = tl.cdiv(valid, per)
        every = tl.arange(0, SPLITS_P)
        top = tl.max(tl.load(m_ptr + every * HEADS + h, mask=every < used, other=float("-inf")), axis=0)
        total = tl.zeros([BLOCK_D], dtype=tl.float32)
        norm = tl.zeros([CHUNK], dtype=tl.float32)
        for s0 in range(0, used, CHUNK):
            s = s0 + tl.arange(0, CHUNK)
            s_ok = s < used
            w = tl.exp2(tl.load(m_ptr + s * HEADS + h, mask=s_ok, other=float("-inf")) - top)
            norm += w * tl.load(l_ptr + s * HEADS + h, mask=s_ok, other=0.0)
            part = tl.load(acc_ptr + (s[:, None] * HEADS + h).to(tl.int64) * RANK + cols[None, :],
                           mask=s_ok[:, None] & col_ok[None, :], other=0.0)
            total += tl.sum(part * w[:, None], axis=0)
        out_lat = _round(total / tl.sum(norm, axis=0), out_ptr.dtype.element_ty, UPCAST)
        if HAS_UV:
            v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
            v_ok = v < VDIM
            w_uv = tl.load(w_ptr + h * stride_wh + v[:, None] * stride_wv + cols[None, :],
                           mask=v_ok[:, None] & col_ok[None, :], other=0.0)
            y = tl.sum(w_uv.to(tl.float32) * out_lat.to(tl.float32)[None, :], axis=1)
            tl.store(out_ptr + h * VDIM + v, _round(y, out_ptr.dtype.element_ty, UPCAST), mask=v_ok)
        else:
            tl.store(out_ptr + h * RANK + cols, out_lat, mask=col_ok)


def absorbed_decode(q_lat: torch.Tensor, q_pe: torch.Tensor, cached: torch.Tensor,
                    pos: torch.Tensor | None, scale: float, w_uv: torch.Tensor | None = None, *,
                    splits: int | None = None, block_t: int | None = None,
                    min_rows: int | None = None, warps: int | None = None,
                    stages: int | None = None) -> torch.Tensor:
    """softmax(([q_lat | q_pe] . cached.T) * scale, rows > pos masked) @ cached[:, :rank].

    q_lat (H, 1, rank), q_pe (H, 1, rope); cached (S, rank + rope), rows may be strided (a view
    of the whole cache); pos: a one-element int64 device tensor, rows <= pos valid (None: all).
    Returns out_lat (H, 1, rank) in q_lat's dtype; with w_uv (H, v, rank) (rows may be strided),
    out_lat @ w_uv.T (H, 1, v), computed by the combine kernel. splits: programs over the rows
    per block of heads in all (default SPLITS shared by the head blocks); the rest: see the
    constants."""
    heads, rank, rope = q_lat.shape[0], q_lat.shape[-1], q_pe.shape[-1]
    assert cached.shape[-1] == rank + rope and cached.stride(-1) == 1
    q_lat = q_lat.reshape(heads, rank)
    q_pe = q_pe.reshape(heads, rope)
    if q_lat.stride(-1) != 1:
        q_lat = q_lat.contiguous()
    if q_pe.stride(-1) != 1:
        q_pe = q_pe.contiguous()
    head_blocks = triton.cdiv(heads, BLOCK_H)
    # the grid depends on the number of heads alone: fixed under a captured graph
    n_splits = splits or max(1, SPLITS // head_blocks)
    bt = block_t or BLOCK_T
    least = min_rows or MIN_ROWS
    n_rows = cached.shape[0]
    dev = q_lat.device
    part_m = torch.empty(n_splits, heads, device=dev, dtype=torch.float32)
    part_l = torch.empty(n_splits, heads, device=dev, dtype=torch.float32)
    part_acc = torch.empty(n_splits, heads, rank, device=dev, dtype=torch.float32)
    has_pos = pos is not None
    # unused pointers get an input no kernel writes (no aliasing of an output under torch.compile)
    pos_arg = pos if has_pos else q_lat
    use_pdl = pdl.enabled(dev)
    launch(_mla_split, (n_splits, head_blocks),
           q_lat, q_pe, cached, pos_arg, part_m, part_l, part_acc, n_rows,
           q_lat.stride(0), q_pe.stride(0), cached.stride(0), scale * LOG2E,
           HEADS=heads, RANK=rank, ROPE=rope, RANK_P=_pow2(rank), ROPE_P=_pow2(rope),
           HAS_POS=has_pos, SPLITS=n_splits, MIN_ROWS=least, BLOCK_H=BLOCK_H, BLOCK_T=bt,
           IEEE=q_lat.dtype == torch.float32, UPCAST=_INTERPRET, num_warps=warps or WARPS,
           num_stages=stages or (STAGES if q_lat.element_size() == 2 else 2),  # fp32: one buffer fits
           PDL=use_pdl, **pdl.launch_options(dev))
    if w_uv is None:
        vdim, block_d, block_v = rank, min(COMBINE_D, _pow2(rank)), 16
        blocks, w_arg, w_strides = triton.cdiv(rank, block_d), q_lat, (0, 0)
    else:
        assert w_uv.shape[0] == heads and w_uv.shape[2] == rank and w_uv.stride(2) == 1
        vdim, block_d, block_v = w_uv.shape[1], _pow2(rank), COMBINE_V
        blocks, w_arg, w_strides = triton.cdiv(vdim, block_v), w_uv, (w_uv.stride(0), w_uv.stride(1))
    out = torch.empty(heads, vdim, device=dev, dtype=q_lat.dtype)
    launch(_mla_combine, (heads, blocks),
           pos_arg, part_m, part_l, part_acc, w_arg, out, n_rows, *w_strides, HEADS=heads, RANK=rank,
           VDIM=vdim, HAS_POS=has_pos, HAS_UV=w_uv is not None, SPLITS=n_splits,
           SPLITS_P=_pow2(n_splits), MIN_ROWS=least, BLOCK_T=bt, CHUNK=COMBINE_SPLITS,
           BLOCK_D=block_d, BLOCK_V=block_v, UPCAST=_INTERPRET, num_warps=4, PDL=use_pdl,
           **pdl.launch_options(dev))
    return out.view(heads, 1, vdim)


def decode(q_lat: torch.Tensor, q_pe: torch.Tensor, cached: torch.Tensor, pos: torch.Tensor | None,
           scale: float, w_uv: torch.Tensor | None = None) -> torch.Tensor:
    """absorbed_decode with the default tiles. Under torch.compile, as one opaque operator
    (dscoder::mla_decode) that the compiled code calls rather than tracing the kernels into its
    own Triton compile, which failed on an H100 (torch 2.11, Triton 3.6: a tl.dot type assertion
    in Inductor's build of the split kernel) while the same kernel ran correctly outside it.
    Outside the compile, a plain call: the operator's first call imports Dynamo (about 1 s, on
    the way to the first reply, which decodes from the uncompiled step). The operator must be
    defined before the compile traces this (register_op)."""
    if torch.compiler.is_compiling():
        return torch.ops.dscoder.mla_decode(q_lat, q_pe, cached, pos, scale, w_uv)
    return absorbed_decode(q_lat, q_pe, cached, pos, scale, w_uv)


def register_op() -> None:
    """Define dscoder::mla_decode, the operator decode() calls under torch.compile (see
    dscoder.model.custom_ops). (A cProfile of a warm `dscoder complete` on an H100 put 0.4 s in
    the definition, but the import phase did not measurably shorten without it: probably the
    profiler's own cost.)"""
    if triton is not None:
        custom_ops.define_once("dscoder::mla_decode", _define_op)


def _define_op() -> None:
    @torch.library.custom_op("dscoder::mla_decode", mutates_args=())
    def _mla_decode_op(q_lat: torch.Tensor, q_pe: torch.Tensor, cached: torch.Tensor,
                       pos: torch.Tensor | None, scale: float, w_uv: torch.Tensor | None) -> torch.Tensor:
        return absorbed_decode(q_lat, q_pe, cached, pos, scale, w_uv)

    @_mla_decode_op.register_fake
    def _(q_lat, q_pe, cached, pos, scale, w_uv):
        vdim = q_lat.shape[-1] if w_uv is None else w_uv.shape[1]
        return q_lat.new_empty(q_lat.shape[0], 1, vdim)
