"""Where a forward pass sits in the sequence, and what each query may see."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Step:
    """start: the first position (an int, or a one-element device tensor for CUDA graphs, whose
    shapes cannot depend on the position); visible: how many cache rows attention reads;
    mask: (T, visible) booleans, True where a query may look, or None when it sees every row
    (or, with causal, when the queries are the whole sequence: query i sees rows 0..i)."""

    start: int | torch.Tensor
    visible: int
    mask: torch.Tensor | None
    absorbed: bool
    causal: bool = False

    def causal_mask(self, device: torch.device) -> torch.Tensor | None:
        """The mask spelled out, for attention code that cannot take a causal flag."""
        if not self.causal:
            return self.mask
        return torch.ones(self.visible, self.visible, dtype=torch.bool, device=device).tril()

    @staticmethod
    def at(start: int, t: int, device: torch.device, absorbed: bool) -> Step:
        """A step for t tokens at a known position: causal inside the new tokens."""
        visible = start + t
        if t == 1:
            return Step(start, visible, None, absorbed)
        if start == 0:  # lets SDPA pick a fused causal kernel instead of reading a mask
            return Step(start, visible, None, absorbed, causal=True)
        rows = torch.arange(start, visible, device=device)[:, None]
        return Step(start, visible, torch.arange(visible, device=device)[None, :] <= rows, absorbed)

    @staticmethod
    def on_device(pos: torch.Tensor, visible: int) -> Step:
        """One decode token whose position lives in device memory; attention reads `visible` rows."""
        mask = torch.arange(visible, device=pos.device)[None, :] <= pos[:, None]
        return Step(pos, visible, mask, absorbed=True)
