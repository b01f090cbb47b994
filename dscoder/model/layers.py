"""Small building blocks shared by attention and the feed-forward layers."""
from __future__ import annotations

import torch
from torch import nn

from dscoder.model.gemv import linear, linear_glu


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32, round to the activation dtype, then scale: the reference's order
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Linear(nn.Module):
    """A bias-free linear layer whose parameter is named like the checkpoint's (`.weight`)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


class FusedLinear(nn.Module):
    """Bias-free projections of one input stacked into one weight: at decode one matrix-vector
    product reads them all (a few small GEMVs each run far below memory bandwidth). The
    checkpoint keeps them apart: `parts` names each (its module name beside this one) and its
    rows, and dscoder.weights reads each checkpoint tensor into its rows."""

    def __init__(self, in_features: int, parts: dict[str, int]) -> None:
        super().__init__()
        self.parts = dict(parts)
        self.weight = nn.Parameter(torch.empty(sum(self.parts.values()), in_features))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return linear(x, self.weight).split(list(self.parts.values()), dim=-1)


class SwiGLU(nn.Module):
    """The dense MLP and the shared experts: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_up_proj = FusedLinear(hidden, {"gate_proj": intermediate, "up_proj": intermediate})
        self.down_proj = Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # gate and up are the two halves of one fused weight (FusedLinear's order)
        return self.down_proj(linear_glu(x, self.gate_up_proj.weight))
