"""Choosing the next token: greedy, or temperature with top-k and top-p, from a seeded generator."""
from __future__ import annotations

import torch

from dscoder.events import GenerationSettings


class Sampler:
    def __init__(self, settings: GenerationSettings, device: torch.device) -> None:
        self.settings = settings
        self.generator = torch.Generator(device=device)
        if settings.seed is not None:
            self.generator.manual_seed(settings.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (1, V) fp32 -> next id (1,), on the logits' device (no host sync here)."""
        s = self.settings
        if s.temperature <= 0:
            return logits.argmax(dim=-1)
        logits = logits / s.temperature
        if s.top_k > 0 and s.top_k < logits.shape[-1]:
            kth = torch.topk(logits, s.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(dim=-1)
        if 0 < s.top_p < 1:
            probs = _top_p(probs, s.top_p)
        return torch.multinomial(probs, 1, generator=self.generator).view(-1)


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    # keep the smallest set of most likely tokens whose mass reaches top_p (at least one token)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the tokens ranked above each one
    sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p)
