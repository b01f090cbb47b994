"""Where a forward pass sits in the sequence, and what each query may see."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Step:
    """start: the first position (an int, or a one-element device tensor for CUDA graphs, whose
    shapes cannot depend on the position); visible: how many cache rows attention reads;
    mask: (T, visible) booleans, True where a query may look, or None when it sees every row
    (or, with causal, when the queries are the last T of the visible rows: query i sees rows
    0..start+i, a causal mask aligned to the lower right)."""

    start: int | torch.Tensor
    visible: int
    mask: torch.Tensor | None
    absorbed: bool
    causal: bool = False

    def causal_mask(self, device: torch.device) -> torch.Tensor | None:
        """The mask spelled out, for attention code that cannot take a causal flag."""
        if not self.causal:
            return self.mask
        t = self.visible - self.start
        return torch.ones(t, self.visible, dtype=torch.bool, device=device).tril(diagonal=self.start)

    @staticmethod
    def at(start: int, t: int, absorbed: bool) -> Step:
        """A step for t tokens at a known position: causal inside the new tokens."""
        visible = start + t
        if t == 1:
            return Step(start, visible, None, absorbed)
        # causal rather than a mask: SDPA picks a fused kernel instead of reading a mask
        return Step(start, visible, None, absorbed, causal=True)

    @staticmethod
    def on_device(pos: torch.Tensor, visible: int) -> Step:
        """One decode token whose position lives in device memory; attention reads `visible` rows."""
        mask = torch.arange(visible, device=pos.device)[None, :] <= pos[:, None]
        return Step(pos, visible, mask, absorbed=True)
