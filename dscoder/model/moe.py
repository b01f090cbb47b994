"""The Mixture-of-Experts feed-forward: a softmax router, routed experts and shared experts.

Routed expert weights are stacked per layer, gate and up fused: w13 (E, 2I, H) and w2 (E, H, I),
so that a step can pick experts by index without Python loops over modules, and so an
offloading cache can swap whole experts as single flat buffers.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from dscoder.config import ModelConfig
from dscoder.model import moe_kernels, route_kernel
from dscoder.model.layers import SwiGLU
from dscoder.model.quant import dequantize


class Router(nn.Module):
    """Softmax over expert logits in fp32, then greedy or group-limited greedy top-k."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.top_k = cfg.num_experts_per_tok
        self.method, self.n_group, self.topk_group = cfg.topk_method, cfg.n_group, cfg.topk_group
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scaling = cfg.routed_scaling_factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, H) -> (expert ids (T, k), weights (T, k) fp32)."""
        one = x.shape[0] == 1 and self.method != "group_limited_greedy"
        if one and torch.compiler.is_compiling():
            # one token in the compiled decode step: the product as a sum, which Inductor makes
            # one reduction kernel (F.linear, a cuBLAS GEMV, with torch.topk, a softmax and a
            # top-k kernel took about 10 us a layer on an H100)
            logits = (x.float() * self.weight.float()).sum(dim=-1)[None]
        else:
            logits = F.linear(x.float(), self.weight.float())
        if one and route_kernel.available(logits, self.top_k):
            # softmax, top k and weights in one kernel (dscoder.model.route_kernel)
            return route_kernel.top_k(logits, self.top_k, self.top_k > 1 and self.norm_topk_prob,
                                      self.scaling)
        scores = logits.softmax(dim=-1)
        if one and torch.compiler.is_compiling():
            # no kernel (no triton): the top k by a sort, which Inductor fuses with the softmax
            weights, ids = (t[:, : self.top_k] for t in scores.sort(dim=-1, descending=True))
            return ids, self._normalise(weights)
        if self.method == "group_limited_greedy":
            scores = self._mask_groups(scores)
        weights, ids = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        return ids, self._normalise(weights)

    def _normalise(self, weights: torch.Tensor) -> torch.Tensor:
        if self.top_k > 1 and self.norm_topk_prob:
            return weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling

    def _mask_groups(self, scores: torch.Tensor) -> torch.Tensor:
        # keep only the experts of the topk_group groups whose best expert scores highest
        t, e = scores.shape
        grouped = scores.view(t, self.n_group, e // self.n_group)
        best_groups = grouped.max(dim=-1).values.topk(self.topk_group, dim=-1, sorted=False).indices
        keep = torch.zeros(t, self.n_group, dtype=torch.bool, device=scores.device)
        keep.scatter_(1, best_groups, True)
        return grouped.masked_fill(~keep[..., None], 0.0).view(t, e)


GATHER_PAIRS = 16  # up to this many (token, expert) pairs, gather the chosen weights by index


class RoutedExperts(nn.Module):
    """All routed experts of one layer, resident in one device's memory: the expert provider
    whose stacks are indexed by expert id (an offloaded layer indexes a cache by slot instead)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        e, h, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.w13 = nn.Parameter(torch.empty(e, 2 * i, h))
        self.w2 = nn.Parameter(torch.empty(e, h, i))
        # --expert-dtype int8: w13, w2 hold int8 and these their per-row scales (set_quantized)
        self.register_buffer("s13", None)
        self.register_buffer("s2", None)

    def set_quantized(self, w13: torch.Tensor, s13: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor) -> None:
        """Hold int8 stacks and their scales (dscoder.model.quant) in place of the weights."""
        self.w13 = nn.Parameter(w13, requires_grad=False)
        self.w2 = nn.Parameter(w2, requires_grad=False)
        self.s13, self.s2 = s13, s2

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if x.shape[0] * ids.shape[1] <= GATHER_PAIRS:
            return gathered_experts(x, ids, weights, self.w13, self.w2, self.s13, self.s2)
        return self._grouped(x, ids, weights)

    def _grouped(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # many tokens: sort the (token, expert) pairs by expert, then one grouped matrix product
        if self.s13 is not None or not grouped_mm_supported(x):
            # the portable path: one product per expert (the ids come to the host once a layer);
            # int8 stacks too, dequantizing one expert at a time
            groups = ExpertGroups(x, ids, weights, ids.reshape(-1).tolist())
            for e in groups.experts:
                groups.apply(e, self.w13[e], self.w2[e], *self._scales(e))
            return groups.result()
        k = ids.shape[1]
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tokens = order // k
        counts = torch.bincount(flat, minlength=self.w13.shape[0])
        y = grouped_expert_mlp(x[tokens], self.w13, self.w2, counts)
        y = y.float() * weights.reshape(-1)[order, None]
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        return out.index_add_(0, tokens, y).to(x.dtype)

    def _scales(self, e: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return (None, None) if self.s13 is None else (self.s13[e], self.s2[e])


def gathered_experts(x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
                     w13: torch.Tensor, w2: torch.Tensor, s13: torch.Tensor | None = None,
                     s2: torch.Tensor | None = None) -> torch.Tensor:
    """The routed experts of a few tokens, picked by index on the device (no host sync): token
    t's j-th expert is w13[index[t, j]], w2[index[t, j]], weighted by weights[t, j]. index is
    the expert ids for a resident layer, cache slots for an offloaded one. s13, s2: per-row
    scales when the stacks are int8 (dscoder.model.quant)."""
    if moe_kernels.available(x):
        return moe_kernels.routed_experts_decode(x, index, weights, w13, w2, s13, s2)
    t, k = index.shape
    flat = index.reshape(-1)
    xs = x.repeat_interleave(k, dim=0).unsqueeze(-1)  # (T*k, H, 1)
    gu = torch.bmm(_pick(w13, s13, flat, x.dtype), xs).squeeze(-1)  # (T*k, 2I)
    g, u = gu.chunk(2, dim=-1)
    y = torch.bmm(_pick(w2, s2, flat, x.dtype), (F.silu(g) * u).unsqueeze(-1)).squeeze(-1)  # (T*k, H)
    y = y.float() * weights.reshape(-1, 1)
    return y.view(t, k, -1).sum(dim=1).to(x.dtype)


def _pick(w: torch.Tensor, scale: torch.Tensor | None, index: torch.Tensor,
          dtype: torch.dtype) -> torch.Tensor:
    return dequantize(w[index], None if scale is None else scale[index], dtype)


class ExpertGroups:
    """Routed experts one expert at a time, for weights that are not in one stack (an offload
    cache's slots, staging buffers) or without a grouped product: the (token, expert) pairs
    sorted by expert as in RoutedExperts._grouped, each expert's rows then computed by
    apply(e, w13[e], w2[e]) in any order and summed in fp32."""

    def __init__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, flat: list[int]) -> None:
        k = ids.shape[1]
        order = torch.argsort(ids.reshape(-1), stable=True)
        self.x = x
        self.tokens = order // k
        self.pair_w = weights.reshape(-1)[order]
        counts = Counter(flat)
        self.span: dict[int, tuple[int, int]] = {}
        start = 0
        for e in sorted(counts):
            self.span[e] = (start, start + counts[e])
            start += counts[e]
        self.out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)

    @property
    def experts(self) -> list[int]:
        """The experts some token chose, in increasing order."""
        return list(self.span)

    def apply(self, e: int, w13: torch.Tensor, w2: torch.Tensor, s13: torch.Tensor | None = None,
              s2: torch.Tensor | None = None) -> None:
        """s13, s2: the expert's per-row scales when w13, w2 are int8."""
        a, b = self.span[e]
        sel = self.tokens[a:b]
        dt = self.x.dtype
        y = expert_mlp(self.x[sel], dequantize(w13, s13, dt), dequantize(w2, s2, dt))
        self.out.index_add_(0, sel, y.float() * self.pair_w[a:b, None])

    def result(self) -> torch.Tensor:
        return self.out.to(self.x.dtype)


def grouped_mm_supported(x: torch.Tensor) -> bool:
    # torch._grouped_mm runs on the CPU in any float type, on CUDA in bf16 (Hopper and later)
    if not hasattr(torch, "_grouped_mm"):
        return False
    return not x.is_cuda or (x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9)


def grouped_expert_mlp(xs: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                       counts: torch.Tensor) -> torch.Tensor:
    """Rows of xs sorted by expert, counts[e] rows each: every expert's MLP, no host sync."""
    offs = counts.cumsum(0).to(torch.int32)
    g, u = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs).chunk(2, dim=-1)
    return torch._grouped_mm(F.silu(g) * u, w2.transpose(1, 2), offs=offs)


def expert_mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    g, u = F.linear(x, w13).chunk(2, dim=-1)
    return F.linear(F.silu(g) * u, w2)


class MoE(nn.Module):
    """The router, the routed experts and the shared experts of one layer; DecoderLayer.route
    and DecoderLayer.feed_forward compose them (the offloaded decoder calls the two apart)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = Router(cfg)
        self.experts = RoutedExperts(cfg)
        self.shared_experts = (SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)

    def decode_both(self, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor | None:
        """The routed and the shared experts of one decode token together, the shared ones as
        extra experts of the routed kernel's two launches; None where that does not apply (more
        tokens, no GPU kernel, int8 or offloaded routed experts, no shared experts)."""
        routed, shared = self.experts, self.shared_experts
        if (shared is None or h.shape[0] != 1 or not isinstance(routed, RoutedExperts)
                or routed.s13 is not None or not moe_kernels.available(h)
                or not h.dtype == routed.w13.dtype == shared.gate_up_proj.weight.dtype):
            return None
        extra = moe_kernels.shared_as_experts(shared.gate_up_proj.weight, shared.down_proj.weight,
                                              routed.w13.shape[1] // 2)
        return moe_kernels.routed_experts_decode(h, ids, weights, routed.w13, routed.w2, shared=extra)
