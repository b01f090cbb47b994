"""A decode token's routing after the router's product in one Triton kernel: the softmax of the
expert logits, the top k experts and their weights (dscoder.model.moe.Router, greedy top-k).

In the compiled decode step these were two Inductor kernels a layer after the product (a
softmax with a sort, then the weights' normalisation), 2.2 and 1.6 us on an H100, the second
waiting for the first. One program of one warp does it all on the E logits. (A kernel that
also took the product in one program was far slower: 256 KB of router weights through one
SM, about 20 us a layer; Inductor's reduction spreads the product over many.)

The arithmetic is the compiled path's: softmax in fp32, the k largest in decreasing order (ties
to the lower expert id), then normalised to sum 1 (norm_topk_prob) or scaled by
routed_scaling_factor.
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

MAX_EXPERTS = 256  # the logits of one token in one warp's registers


def available(logits: torch.Tensor, top_k: int) -> bool:
    """Whether top_k() takes these logits (1, E) fp32: on a GPU, triton installed, k <= E."""
    return (triton is not None and logits.is_cuda and logits.shape[0] == 1
            and logits.dtype == torch.float32 and top_k <= logits.shape[-1] <= MAX_EXPERTS)


if triton is not None:

    @triton.jit
    def _top_k(logits_ptr, ids_ptr, weights_ptr, n_experts, scaling, BLOCK_E: tl.constexpr,
               TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # the logits come from the kernel before (dscoder.model.pdl)
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        e = tl.arange(0, BLOCK_E)
        e_ok = e < n_experts
        scores = tl.load(logits_ptr + e, mask=e_ok, other=float("-inf"))
        p = tl.exp(scores - tl.max(scores, axis=0))
        p = p / tl.sum(p, axis=0)
        p = tl.where(e_ok, p, -1.0)  # below every probability: never picked
        slot = tl.arange(0, BLOCK_K)
        top_p = tl.zeros([BLOCK_K], dtype=tl.float32)
        top_id = tl.zeros([BLOCK_K], dtype=tl.int64)
        for j in tl.static_range(TOP_K):  # the largest left, ties to the lower id
            best = tl.max(p, axis=0)
            pick = tl.min(tl.where(p == best, e, BLOCK_E), axis=0)
            top_p = tl.where(slot == j, best, top_p)
            top_id = tl.where(slot == j, pick.to(tl.int64), top_id)
            p = tl.where(e == pick, -1.0, p)
        if NORM:
            top_p = top_p / (tl.sum(top_p, axis=0) + 1e-20)
        else:
            top_p = top_p * scaling
        tl.store(ids_ptr + slot, top_id, mask=slot < TOP_K)
        tl.store(weights_ptr + slot, top_p, mask=slot < TOP_K)


def top_k(logits: torch.Tensor, k: int, norm: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (1, E) fp32 -> (ids (1, k) int64, weights (1, k) fp32): the k largest softmax
    probabilities in decreasing order, normalised to sum 1 when `norm`, else multiplied by
    `scaling`. Under torch.compile the operator dscoder::route."""
    if torch.compiler.is_compiling():
        return torch.ops.dscoder.route(logits, k, norm, scaling)
    return _run(logits, k, norm, scaling)


def _run(logits: torch.Tensor, k: int, norm: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    assert logits.stride(-1) == 1
    ids = torch.empty(1, k, dtype=torch.int64, device=logits.device)
    weights = torch.empty(1, k, dtype=torch.float32, device=logits.device)
    n = logits.shape[-1]
    launch(_top_k, (1,), logits, ids, weights, n, scaling, BLOCK_E=triton.next_power_of_2(n),
           TOP_K=k, BLOCK_K=triton.next_power_of_2(k), NORM=norm, PDL=pdl.enabled(logits.device),
           num_warps=1, **pdl.launch_options(logits.device))
    return ids, weights


def register_op() -> None:
    """Define dscoder::route, which compiled code calls (see dscoder.model.custom_ops)."""
    if triton is not None:
        custom_ops.define_once("dscoder::route", _define_op)


def _define_op() -> None:
    @torch.library.custom_op("dscoder::route", mutates_args=())
    def _route_op(logits: torch.Tensor, k: int, norm: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        return _run(logits, k, norm, scaling)

    @_route_op.register_fake
    def _(logits, k, norm, scaling):
        return (logits.new_empty(1, k, dtype=torch.int64), logits.new_empty(1, k, dtype=torch.float32))
