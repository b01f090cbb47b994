"""A decode token's cache row in one Triton kernel: the latent's RMSNorm (kv_a_layernorm) and
k_pe's rotary embedding, stored at the device position.

In the compiled decode step these were three kernels a layer (the norm, the rotation into a
concatenated row, the index_copy into the cache), each about a microsecond on an H100 for 576
numbers. H100, one machine, alternated twice: decode 381.6 -> 389.4 tok/s at 2K, 324.2 -> 330.3
at 32K, and 187.1 -> 218.9 with graphs of the uncompiled step (the first reply's), where the
torch path was many small eager kernels (BENCHMARKS.md).

The arithmetic is the torch path's (MLAttention._latent with write_cache) but for one rounding:
the norm and the weight multiply in fp32 and round once, as Inductor's fused kernel of the
compiled step did before this kernel; the eager path (and the reference) rounds the normalised
latent to the cache dtype first. Rounding it too took the prompt's last rows decoded by the
compiled step from 3.55e-2 to 3.71e-2 off fp32 (transformers' bf16: 4.20e-2; H100, one run,
BENCHMARKS.md). The rotation is in fp32 with the fp32 table, rounded once.
"""
from __future__ import annotations

import torch

from dscoder.model import custom_ops, pdl
from dscoder.model.triton_launch import launch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path
    triton = None


def available(c: torch.Tensor, kv: torch.Tensor, rank: int) -> bool:
    """Whether write() takes this row: one token on a GPU, half precision, triton installed,
    the latent and the rope pairs powers of two (a Triton block each)."""
    half = (c.shape[-1] - rank) // 2
    return (triton is not None and c.is_cuda and c.shape[0] == 1
            and c.dtype in (torch.bfloat16, torch.float16) and kv.dtype == c.dtype
            and _pow2(rank) and _pow2(half))


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


if triton is not None:

    @triton.jit
    def _latent_row(c_ptr, w_ptr, rope_ptr, pos_ptr, kv_ptr, stride_kv, eps,
                    RANK: tl.constexpr, HALF: tl.constexpr, PDL: tl.constexpr):
        # one program: c = [latent (RANK) | k_pe (2 * HALF, pairs interleaved)] of the token,
        # rope (HALF, 2) its cos and sin; row pos of kv gets [norm(latent) * w | rotated k_pe]
        if PDL:  # dscoder.model.pdl: c was written by the kernel before
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row = kv_ptr + tl.load(pos_ptr).to(tl.int64) * stride_kv
        d = tl.arange(0, RANK)
        x = tl.load(c_ptr + d).to(tl.float32)
        normed = x * tl.rsqrt(tl.sum(x * x, axis=0) / RANK + eps)  # not rounded: see the docstring
        w = tl.load(w_ptr + d).to(tl.float32)
        tl.store(row + d, (w * normed).to(kv_ptr.dtype.element_ty))
        p = tl.arange(0, HALF)
        x0 = tl.load(c_ptr + RANK + 2 * p).to(tl.float32)
        x1 = tl.load(c_ptr + RANK + 2 * p + 1).to(tl.float32)
        cos = tl.load(rope_ptr + 2 * p)
        sin = tl.load(rope_ptr + 2 * p + 1)
        tl.store(row + RANK + 2 * p, (x0 * cos - x1 * sin).to(kv_ptr.dtype.element_ty))
        tl.store(row + RANK + 2 * p + 1, (x0 * sin + x1 * cos).to(kv_ptr.dtype.element_ty))


def write(c: torch.Tensor, weight: torch.Tensor, eps: float, rope: torch.Tensor, pos: torch.Tensor,
          kv: torch.Tensor) -> None:
    """Store the cache row of c (1, rank + rope): kv[pos] = [RMSNorm(latent) * weight | k_pe
    rotated by rope (1, rope/2, 2) fp32]. pos: a one-element device tensor. Under torch.compile
    as the operator dscoder::latent_row (register_op), which mutates kv."""
    if torch.compiler.is_compiling():
        torch.ops.dscoder.latent_row(c, weight, eps, rope, pos, kv)
    else:
        _run(c, weight, eps, rope, pos, kv)


def _run(c: torch.Tensor, weight: torch.Tensor, eps: float, rope: torch.Tensor, pos: torch.Tensor,
         kv: torch.Tensor) -> None:
    rank = weight.shape[0]
    half = (c.shape[-1] - rank) // 2
    assert c.stride(-1) == 1 and kv.stride(-1) == 1
    launch(_latent_row, (1,), c, weight, rope.contiguous(), pos, kv, kv.stride(0), eps, RANK=rank,
           HALF=half, PDL=pdl.enabled(c.device), **pdl.launch_options(c.device))


def register_op() -> None:
    """Define dscoder::latent_row, which compiled code calls (see dscoder.model.custom_ops)."""
    if triton is not None:
        custom_ops.define_once("dscoder::latent_row", _define_op)


def _define_op() -> None:
    @torch.library.custom_op("dscoder::latent_row", mutates_args=("kv",))
    def _latent_row_op(c: torch.Tensor, weight: torch.Tensor, eps: float, rope: torch.Tensor,
                       pos: torch.Tensor, kv: torch.Tensor) -> None:
        _run(c, weight, eps, rope, pos, kv)

    @_latent_row_op.register_fake
    def _(c, weight, eps, rope, pos, kv):
        return None
